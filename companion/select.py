"""Which method to fine-tune with: a decision tree over ``companion.memory.footprint`` and cited trade-offs.

``recommend(gpu_memory_gb, model, ...)`` walks :data:`RULES`, and ``mermaid()`` draws the same structure, so the
book's figure is the function (``tests/test_select.py`` walks the drawn text and checks they agree)::

    N1 Does LoRA on the 16-bit model fit?           yes -> N2            no -> N4
    N2 Priority?                                    accuracy -> N3       speed -> LoRA     memory -> QLoRA
    N3 Does AdaLoRA fit, and does it gain accuracy?  yes -> AdaLoRA       no -> LoRA
    N4 Does QLoRA (NF4 + double quantization) fit?  yes -> N5            no -> nothing fits on one card
    N5 Priority?                                    accuracy -> N6       speed, memory -> QLoRA
    N6 Does QLoRA + AdaLoRA fit, and does AdaLoRA gain accuracy?  yes -> QLoRA + AdaLoRA   no -> QLoRA

**Fits** means ``footprint(...).total_bytes <= USABLE_FRACTION * gpu_memory_gb * 1e9`` with adapters on every
Linear (``target_modules="all-linear"``), bf16 compute, gradient checkpointing, AdamW (fp32 states) for the 16-bit
methods and ``paged_adamw_32bit`` on an NF4 + double-quantized base for the 4-bit ones (the QLoRA recipe).
``USABLE_FRACTION = 0.9`` is an allowance for the CUDA context and allocator fragmentation, which ``footprint``
does not count. The recommended config says whether gradient checkpointing is needed: it is switched off when
the method also fits without it.

**Several cards** (``n_gpus`` > 1): every footprint is per card, ``footprint(..., world_size=n_gpus, sharding=...)``,
and fits means at most ``USABLE_FRACTION`` of one card. The sharding is FSDP unless ``sharding`` says ``"ddp"`` or
``"device_map"``; with FSDP the 4-bit methods store their packed weights in the compute dtype
(``bnb_4bit_quant_storage=torch.bfloat16``, the FSDP-QLoRA recipe), which FSDP needs to shard them.
``batch_size`` is per card for FSDP and DDP, the whole batch for device_map. When nothing fits, the advice counts
the cards of this size that would hold QLoRA with device_map and with FSDP.

**Ranks**: LoRA ``r=8``; AdaLoRA ``init_r=12``, ``target_r=8`` (PEFT's ``AdaLoraConfig`` defaults). With a
``trainable_budget`` of B adapter parameters, ``r = B // (adapter parameters per rank)`` and AdaLoRA's
``target_r = B // (per rank, lora_E included)``, ``init_r = ceil(1.5 * target_r)`` (AdaLoRA paper §3.3 starts from
1.5 times the final budget). AdaLoRA's memory is counted at ``init_r``: masking zeroes ``lora_E`` but never
shrinks a tensor. An encoder's classification head is trained in addition (PEFT ``modules_to_save``).

**Limits** (clamped, with a note in ``Recommendation.notes`` and a warning): a rank above ``min(out, in)`` of the
smallest adapted matrix adds parameters but no rank (``rank(B A) <= min(out, in)``) and leaves AdaLoRA without
``init_r`` orthonormal triplets (``companion.migrate.lora_to_adalora`` refuses it), so ``r`` and ``init_r`` are cut
to it (``target_r`` to the largest value with ``ceil(1.5 * target_r)`` within it); and a rank whose footprint is
not below full fine-tuning's is not parameter-efficient, so ranks are cut until every adapter method needs less
memory than full fine-tuning (footprints grow with the rank: bisection). Refused: a card below 1 GB or above
``MAX_GPU_MEMORY_GB`` (no single accelerator; MB passed for GB), and a model so small that rank 1 already costs
more than full fine-tuning.

**Evidence** (:class:`Tradeoffs`, replaceable by measurements with :meth:`Tradeoffs.from_results`):

- AdaLoRA gains 0.97 accuracy points over LoRA at about the same budget: GLUE average 89.31 (1.27M parameters)
  vs 88.34 (LoRA r=8, 1.33M), DeBERTaV3-base, AdaLoRA paper (Zhang et al. 2023) Table 1; it trains
  116/105 = 1.105 times as long per epoch (MNLI on a V100, App. H Table 15).
- QLoRA with NF4 + double quantization matches 16-bit LoRA: MMLU mean 53.1 vs 53.0 with BF16 (QLoRA paper,
  Dettmers et al. 2023, Table 4). The paper does not report its time per step.
- Full fine-tuning is outside the guide's choices, only reported (a scope choice: this is a course on
  adapters, and full fine-tuning needs several times their memory). The papers do not make it redundant:
  adapters match or beat it on GLUE (AdaLoRA Table 1: full 88.09 vs AdaLoRA 89.31; QLoRA Table 3,
  RoBERTa-large: full BF16 88.6 vs LoRA BF16 88.8), but on Super-NaturalInstructions full fine-tuning leads
  (QLoRA Table 3, T5-11B: 62.0 vs LoRA 60.7 and QLoRA NF4 + DQ 60.9; T5-780M: 48.0 vs 47.1 / 47.7).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import numbers
import warnings
from dataclasses import dataclass

from .memory import DECODERS, ENCODERS, PUBLISHED_CONFIGS, SHARDINGS, _modules, footprint, gb

USABLE_FRACTION = 0.9  # CUDA context + allocator fragmentation, not counted by footprint
MIN_GPU_MEMORY_GB, MAX_GPU_MEMORY_GB = 1, 1024  # one accelerator; the largest hold 288 GB (B300, MI355X) in 2025
PRIORITIES = ("accuracy", "memory", "speed")
LEAF_LABELS = {"lora": "LoRA (16-bit)", "adalora": "AdaLoRA (16-bit)", "qlora": "QLoRA (NF4 + DQ)",
               "qlora-adalora": "QLoRA + AdaLoRA", "none": "Nothing fits on one card"}
DEFAULT_R, DEFAULT_INIT_R, DEFAULT_TARGET_R = 8, 12, 8  # peft LoraConfig.r, AdaLoraConfig.init_r / target_r
SHARDING_LABELS = {"fsdp": "FSDP", "ddp": "DDP", "device_map": "device_map"}
MAX_FSDP_CARDS = 512  # the most cards of one size the "what would fit" advice counts up to


@dataclass(frozen=True)
class Question:
    """A node of the tree: ``fact_key`` names the fact it reads, ``edges`` maps each answer to a node id or a
    leaf (a method). ``{gain}`` in ``text`` is filled with ``Tradeoffs.adalora_accuracy_gain``."""

    text: str
    fact_key: str
    edges: dict[str, str]


ROOT = "N1"
RULES = {
    "N1": Question("Does LoRA on the 16-bit model fit?", "lora_fits", {"yes": "N2", "no": "N4"}),
    "N2": Question("Priority?", "priority", {"accuracy": "N3", "speed": "lora", "memory": "qlora"}),
    "N3": Question("Does AdaLoRA fit, and does it gain accuracy over LoRA ({gain:+.2f} points)?",
                   "adalora_fits_and_gains", {"yes": "adalora", "no": "lora"}),
    "N4": Question("Does QLoRA (NF4 + double quantization) fit?", "qlora_fits", {"yes": "N5", "no": "none"}),
    "N5": Question("Priority?", "priority", {"accuracy": "N6", "speed": "qlora", "memory": "qlora"}),
    "N6": Question("Does QLoRA + AdaLoRA fit, and does AdaLoRA gain accuracy ({gain:+.2f} points)?",
                   "qlora_adalora_fits_and_gains", {"yes": "qlora-adalora", "no": "qlora"}),
}


@dataclass(frozen=True)
class Tradeoffs:
    """The accuracy and time trade-offs the rules use; the defaults are the papers' (module docstring)."""

    adalora_accuracy_gain: float = 89.31 - 88.34  # points, AdaLoRA Table 1, GLUE avg., DeBERTaV3-base
    adalora_time_ratio: float | None = 116 / 105  # AdaLoRA / LoRA time per epoch, App. H Table 15, MNLI, V100
    qlora_accuracy_gain: float = 53.1 - 53.0  # points, QLoRA Table 4, MMLU mean, NF4 + DQ vs BF16
    qlora_time_ratio: float | None = None  # not reported by the QLoRA paper
    source: str = "AdaLoRA paper Table 1 (GLUE, DeBERTaV3-base) and App. H Table 15; QLoRA paper Table 4 (MMLU)"

    def __post_init__(self):
        for name in ("adalora_accuracy_gain", "qlora_accuracy_gain"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number of accuracy points, got {value!r}")
        for name in ("adalora_time_ratio", "qlora_time_ratio"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name} must be a positive finite ratio of times, or None when not measured, "
                                 f"got {value!r}")

    @classmethod
    def from_results(cls, frame, accuracy: str = "accuracy") -> Tradeoffs:
        """From the comparison harness's tidy results: one row per (method, seed) with an accuracy column named
        ``accuracy`` (a fraction in [0, 1] or a percentage, used as is and converted to points; for
        ``companion.bench.BenchResults.runs`` pass ``accuracy="test_accuracy"``) and ``seconds_per_step``. Gains
        are differences of mean accuracy to LoRA, time ratios are ratios of mean seconds per step."""
        if accuracy in frame.columns:
            frame = frame.assign(accuracy=frame[accuracy])
        missing = {"method", "seed", "accuracy", "seconds_per_step"} - set(frame.columns)
        if missing:
            raise ValueError(f"results lack the column(s) {sorted(missing)}; expected one row per (method, seed) "
                             "with 'method', 'seed', 'accuracy', 'seconds_per_step'")
        means = frame.groupby("method")[["accuracy", "seconds_per_step"]].mean()
        absent = [m for m in ("lora", "adalora", "qlora") if m not in means.index]
        if absent:
            raise ValueError(f"results lack the method(s) {absent}; Tradeoffs.from_results needs rows for 'lora', "
                             f"'adalora' and 'qlora', got {sorted(means.index)}")
        fraction = bool((frame["accuracy"] <= 1).all())
        to_points = 100 if fraction else 1
        acc, sps = means["accuracy"], means["seconds_per_step"]
        seeds = frame.groupby("method")["seed"].nunique()
        counts = ", ".join(f"{m} {seeds[m]}" for m in ("lora", "adalora", "qlora"))
        return cls(adalora_accuracy_gain=float((acc["adalora"] - acc["lora"]) * to_points),
                   adalora_time_ratio=float(sps["adalora"] / sps["lora"]),
                   qlora_accuracy_gain=float((acc["qlora"] - acc["lora"]) * to_points),
                   qlora_time_ratio=float(sps["qlora"] / sps["lora"]),
                   source=f"measured: means over seeds ({counts}), accuracy given as a "
                          f"{'fraction, x100' if fraction else 'percentage'} -> points")


@dataclass(frozen=True)
class Recommendation:
    """What to train with, why (one sentence per question answered), and the numbers behind it."""

    method: str  # "lora" | "adalora" | "qlora" | "qlora-adalora" | "none"
    reasons: tuple[str, ...]
    path: tuple[tuple[str, str], ...]  # (node id, answer) per question, from the root
    facts: dict  # fact_key -> bool (yes/no questions) or the priority
    footprint_gb: dict[str, float]  # total GB of every method, with gradient checkpointing
    config: dict  # settings to start from; {} when nothing fits
    alternatives: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # what was clamped, and why (ranks beyond the matrices or beyond full fine-tuning)
    n_gpus: int = 1
    sharding: str | None = None  # None on one card, else "fsdp", "ddp" or "device_map"
    layout: str = ""  # the cards and what the method needs on each, e.g. "2 x 24 GB, FSDP: 20.10 GB per card"

    def __str__(self) -> str:
        several = self.n_gpus > 1
        label = (f"Nothing fits on {self.layout.split(':')[0]}" if several and self.method == "none"
                 else LEAF_LABELS[self.method])
        lines = [f"Recommendation: {label}"] + ([f"Layout: {self.layout}"] if several else []) + ["Why:"]
        lines += [f"  {node} -> {answer}: {reason}" for (node, answer), reason in zip(self.path, self.reasons)]
        lines.append(f"Footprint{' per card' if several else ''} with gradient checkpointing: "
                     + ", ".join(f"{m} {v:.2f} GB" for m, v in self.footprint_gb.items()))
        if self.config:
            lines.append("Start from: " + ", ".join(f"{k}={v!r}" for k, v in self.config.items()))
        lines += [f"Alternative: {a}" for a in self.alternatives]
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)


def _walk(facts: dict) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Follow RULES from the root; a yes/no question reads a bool fact, the priority questions its value."""
    node, path = ROOT, []
    while node in RULES:
        question = RULES[node]
        fact = facts[question.fact_key]
        answer = fact if isinstance(fact, str) else ("yes" if fact else "no")
        path.append((node, answer))
        node = question.edges[answer]
    return node, tuple(path)


def mermaid(tradeoffs: Tradeoffs | None = None) -> str:
    """The decision tree as a mermaid ``flowchart TD``, generated from :data:`RULES`."""
    gain = (tradeoffs or Tradeoffs()).adalora_accuracy_gain
    lines = ["flowchart TD", "    %% generated by python -m companion.select --mermaid from companion.select.RULES",
             f"    %% fits: footprint total <= {USABLE_FRACTION} x card memory, with gradient checkpointing"]
    lines += [f'    {node}{{"{question.text.format(gain=gain)}"}}' for node, question in RULES.items()]
    leaves = {t for question in RULES.values() for t in question.edges.values()} - set(RULES)
    lines += [f'    {_leaf_id(m)}["{label}"]' for m, label in LEAF_LABELS.items() if m in leaves]
    for node, question in RULES.items():
        lines += [f"    {node} -->|{answer}| {target if target in RULES else _leaf_id(target)}"
                  for answer, target in question.edges.items()]
    return "\n".join(lines) + "\n"


def _leaf_id(method: str) -> str:
    return "L_" + method.replace("-", "_")


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value > 0


def _check(gpu_memory_gb, priority, seq_len, batch_size, trainable_budget, n_gpus, sharding) -> None:
    if isinstance(gpu_memory_gb, bool) or not isinstance(gpu_memory_gb, numbers.Real) \
            or not math.isfinite(gpu_memory_gb) or gpu_memory_gb <= 0:
        raise ValueError(f"gpu_memory_gb must be a positive number of GB (e.g. 24 for an RTX 4090), "
                         f"got {gpu_memory_gb!r}")
    if not MIN_GPU_MEMORY_GB <= gpu_memory_gb <= MAX_GPU_MEMORY_GB:
        raise ValueError(f"gpu_memory_gb={gpu_memory_gb:g} is outside [{MIN_GPU_MEMORY_GB}, {MAX_GPU_MEMORY_GB}] GB, "
                         "the memory of one accelerator (the largest hold 288 GB); pass one card's memory in GB "
                         "(24, not 24576 MB), and for several cards the memory of one with n_gpus")
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}; choose one of {PRIORITIES}")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if not _positive_int(value):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if trainable_budget is not None and not _positive_int(trainable_budget):
        raise ValueError(f"trainable_budget must be a positive integer number of adapter parameters or None "
                         f"(PEFT defaults: r=8, init_r=12, target_r=8), got {trainable_budget!r}")
    if not _positive_int(n_gpus):
        raise ValueError(f"n_gpus must be a positive integer number of cards of gpu_memory_gb each, got {n_gpus!r}")
    if sharding is not None and sharding not in SHARDINGS:
        raise ValueError(f"unknown sharding {sharding!r}; choose one of {SHARDINGS}, or None for FSDP on several "
                         "cards")


def _config(model) -> tuple[dict, str]:
    """(config dict, display name) of a PUBLISHED_CONFIGS name, a config dict or a transformers config."""
    if isinstance(model, str):
        if model not in PUBLISHED_CONFIGS:
            raise ValueError(f"unknown model {model!r}; choose one of {sorted(PUBLISHED_CONFIGS)}, "
                             "or pass a config dict with model_type or a transformers config")
        return dict(PUBLISHED_CONFIGS[model]), model
    cfg = dict(model) if isinstance(model, dict) else model.to_dict() if hasattr(model, "to_dict") else None
    if cfg is None:
        raise ValueError(f"model must be a name in PUBLISHED_CONFIGS, a config dict or a transformers config, "
                         f"got {type(model).__name__}")
    try:
        footprint(cfg, "full")
    except ValueError as err:
        raise ValueError(f"recommend cannot size this model: {err}") from err
    return cfg, f"this {cfg['model_type']} model"


def _check_seq_len(cfg: dict, name: str, seq_len: int) -> None:
    """Encoders have learned positions: RoBERTa's first two are reserved for padding (``padding_idx + 1``)."""
    if cfg["model_type"] in ENCODERS:
        limit = cfg.get("max_position_embeddings", 512) - (2 if cfg["model_type"] == "roberta" else 0)
        if seq_len > limit:
            raise ValueError(f"seq_len={seq_len} exceeds the {limit} positions {name} was trained with; "
                             f"pass seq_len <= {limit}")


def _settings(cfg: dict, method: str, ranks: dict, cards: dict | None = None) -> dict:
    """The footprint/PEFT settings of one method (the QLoRA recipe for the 4-bit ones) on ``cards``
    (``{"world_size": n, "sharding": ...}``; None: one card)."""
    quantized, svd = method.startswith("qlora"), method.endswith("adalora")
    out = ({"init_r": ranks["init_r"], "target_r": ranks["target_r"]} if svd else {"r": ranks["r"]})
    out |= {"target_modules": "all-linear", "quantization": "nf4+dq" if quantized else None,
            "optimizer": "paged_adamw_32bit" if quantized else "adamw", "compute_dtype": "bfloat16"}
    if quantized and cfg["model_type"] in ENCODERS:
        out["skip_modules"] = ["classifier"]  # keep the trained head out of 4 bit (llm_int8_skip_modules)
    if quantized and cards and cards["sharding"] == "fsdp":
        out["quant_storage"] = "bfloat16"  # BitsAndBytesConfig(bnb_4bit_quant_storage=torch.bfloat16): FSDP shards it
    return out


class _Key:
    """A dict or list as an ``lru_cache`` argument: equal when their JSON is."""

    def __init__(self, value):
        self.value, self.text = value, json.dumps(value, sort_keys=True, default=repr)

    def __hash__(self) -> int:
        return hash(self.text)

    def __eq__(self, other) -> bool:
        return self.text == other.text


def _total(cfg, method, settings, seq_len, batch_size, checkpointing, cards: dict | None = None) -> int:
    """Bytes per card of ``method`` with ``settings`` on ``cards`` (None: one card); footprint is pure, so cached."""
    return _cached_total(_Key(cfg), method, _Key(settings), seq_len, batch_size, checkpointing, _Key(cards or {}))


@functools.lru_cache(maxsize=1 << 14)
def _cached_total(cfg: _Key, method, settings: _Key, seq_len, batch_size, checkpointing, cards: _Key) -> int:
    cfg, settings, cards = cfg.value, settings.value, cards.value
    if method == "full":
        return footprint(cfg, "full", batch_size=batch_size, seq_len=seq_len,
                         gradient_checkpointing=checkpointing, **cards).total_bytes
    r = settings.get("init_r", settings.get("r"))
    return footprint(cfg, method, r=r, target_modules="all-linear", compute_dtype="bfloat16",
                     double_quant=settings["quantization"] is not None, optimizer=settings["optimizer"],
                     skip_modules=settings.get("skip_modules"), batch_size=batch_size, seq_len=seq_len,
                     gradient_checkpointing=checkpointing, quant_storage=settings.get("quant_storage", "uint8"),
                     **cards).total_bytes


def _ranks(cfg: dict, trainable_budget: int | None) -> dict:
    if trainable_budget is None:
        return {"r": DEFAULT_R, "init_r": DEFAULT_INIT_R, "target_r": DEFAULT_TARGET_R}
    per_rank = footprint(cfg, "lora", r=1, target_modules="all-linear").adapter_params
    per_rank_svd = footprint(cfg, "adalora", r=1, target_modules="all-linear").adapter_params  # + lora_E
    if trainable_budget < per_rank_svd:
        raise ValueError(f"trainable_budget={trainable_budget:,} is below one rank on the adapted matrices; "
                         f"rank 1 needs {per_rank:,} LoRA / {per_rank_svd:,} AdaLoRA parameters, so pass at "
                         f"least {per_rank_svd:,}")
    target_r = trainable_budget // per_rank_svd
    return {"r": trainable_budget // per_rank, "init_r": math.ceil(1.5 * target_r), "target_r": target_r}


def _smallest_adapted(cfg: dict) -> tuple[str, int, int]:
    """(name, out, in) of the adapted matrix with the smallest min(out, in) under ``target_modules="all-linear"``
    (every Linear but the head, as ``footprint`` counts them)."""
    head = "causal-lm" if cfg["model_type"] in DECODERS else "seq-cls"
    linears = [m for m in _modules(cfg, head) if m.kind == "linear"
               and m.name.split(".")[0] not in ("lm_head", "score", "classifier")]
    m = min(linears, key=lambda m: min(m.out, m.in_))
    return m.name.rsplit(".", 1)[-1], m.out, m.in_


def _sized(cfg, ranks, trainable_budget, seq_len, batch_size, cards=None) -> tuple[dict, dict, dict, list[str]]:
    """(ranks, settings, total bytes per method, notes): the ranks clamped to what the matrices and the memory of
    full fine-tuning allow (module docstring), the settings and totals (per card on ``cards``) at those ranks."""
    name, out, in_ = _smallest_adapted(cfg)
    full = footprint(cfg, "full", batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=True, **(cards or {}))
    ranks, notes = dict(ranks), []
    if trainable_budget is not None and trainable_budget >= full.total_params:
        notes.append(f"trainable_budget={trainable_budget:,} is at least the model's own {full.total_params:,} "
                     "parameters: an adapter cannot use it, and full fine-tuning trains fewer parameters")

    def clamp(key: str, limit: int, why: str) -> None:
        if key == "r" and ranks["r"] > limit:
            notes.append(f"LoRA r={ranks['r']} clamped to {why}.")
            ranks["r"] = limit
        elif key == "init_r" and ranks["init_r"] > limit:
            target_r = max(1, 2 * limit // 3)  # the largest target_r with ceil(1.5 * target_r) <= limit
            init_r = min(limit, math.ceil(1.5 * target_r))
            notes.append(f"AdaLoRA init_r={ranks['init_r']}, target_r={ranks['target_r']} clamped to init_r={init_r}, "
                         f"target_r={target_r}: init_r is at most {why}.")
            ranks.update(init_r=init_r, target_r=target_r)

    for key in ("r", "init_r"):
        clamp(key, min(out, in_), f"min(out, in) = {min(out, in_)} of the smallest adapted matrix, {name} ({out} x "
                                  f"{in_}): a larger rank adds parameters but no rank")
    methods = {"r": ("lora", "qlora"), "init_r": ("adalora", "qlora-adalora")}
    settings = {m: _settings(cfg, m, ranks, cards) for m in ("lora", "adalora", "qlora", "qlora-adalora")}
    total = {m: _total(cfg, m, settings[m], seq_len, batch_size, True, cards) for m in settings}
    for key, pair in methods.items():
        if all(total[m] < full.total_bytes for m in pair):
            continue

        def below_full(rank: int) -> bool:
            return all(_total(cfg, m, settings[m] | {key: rank}, seq_len, batch_size, True, cards) < full.total_bytes
                       for m in pair)

        for m in pair:
            one = _total(cfg, m, settings[m] | {key: 1}, seq_len, batch_size, True, cards)
            if one >= full.total_bytes:
                raise ValueError(f"{LEAF_LABELS[m]} at rank 1 on every Linear already needs {one:,} bytes, not "
                                 f"less than full fine-tuning's {full.total_bytes:,}: this model is too small for an "
                                 "adapter to save memory; fine-tune it fully (companion.memory.footprint(model, "
                                 "'full'))")
        limit, high = 1, ranks[key]  # footprints grow with the rank: bisect, below_full(limit) and not (high)
        while high - limit > 1:
            mid = (limit + high) // 2
            limit, high = (mid, high) if below_full(mid) else (limit, mid)
        clamp(key, limit, f"{limit}, the largest rank at which {' and '.join(LEAF_LABELS[m] for m in pair)} need "
                          f"less memory than full fine-tuning ({gb(full.total_bytes)})")
        for m in pair:
            settings[m] = _settings(cfg, m, ranks, cards)
            total[m] = _total(cfg, m, settings[m], seq_len, batch_size, True, cards)
    return ranks, settings, {"full": full.total_bytes, **total}, notes


def recommend(gpu_memory_gb, model, *, n_gpus: int = 1, sharding: str | None = None,
              trainable_budget: int | None = None, priority: str = "accuracy", seq_len: int = 512, batch_size: int = 1,
              tradeoffs: Tradeoffs | None = None) -> Recommendation:
    """The method to fine-tune ``model`` with on ``n_gpus`` cards of ``gpu_memory_gb`` GB each, sharded with
    ``sharding`` (None: FSDP on several cards), by the rules of the module docstring."""
    _check(gpu_memory_gb, priority, seq_len, batch_size, trainable_budget, n_gpus, sharding)
    cfg, name = _config(model)
    _check_seq_len(cfg, name, seq_len)
    if sharding == "device_map" and n_gpus > cfg["num_hidden_layers"]:
        layers = cfg["num_hidden_layers"]
        raise ValueError(f"device_map cannot split the {layers} layers of {name} over {n_gpus} cards, each card needs "
                         f"a layer; pass n_gpus <= {layers} or sharding='fsdp'")
    t = tradeoffs or Tradeoffs()
    usable = USABLE_FRACTION * gpu_memory_gb * 1e9
    seq_len, batch_size, n_gpus = int(seq_len), int(batch_size), int(n_gpus)
    trainable_budget = None if trainable_budget is None else int(trainable_budget)
    sharding = sharding or ("fsdp" if n_gpus > 1 else None)
    cards = {"world_size": n_gpus, "sharding": sharding} if sharding else None
    ranks, settings, total, notes = _sized(cfg, _ranks(cfg, trainable_budget), trainable_budget, seq_len, batch_size,
                                           cards)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    fits = {m: total[m] <= usable for m in settings}
    gains = t.adalora_accuracy_gain > 0
    facts = {"lora_fits": fits["lora"], "priority": priority, "qlora_fits": fits["qlora"],
             "adalora_fits_and_gains": fits["adalora"] and gains,
             "qlora_adalora_fits_and_gains": fits["qlora-adalora"] and gains}
    method, path = _walk(facts)

    per = " per card" if n_gpus > 1 else ""
    where = (f"on each card of {n_gpus} x {gpu_memory_gb:g} GB with {SHARDING_LABELS[sharding]}" if n_gpus > 1 else
             f"on this {gpu_memory_gb:g} GB card" + (f" with {SHARDING_LABELS[sharding]}" if sharding else ""))

    def need(m: str) -> str:
        return f"{gb(total[m])}{per}, which {'fits' if fits[m] else 'does not fit'}"

    gain = f"{t.adalora_accuracy_gain:+.2f} accuracy points over LoRA at the same budget ({t.source})"
    time = (f"{t.adalora_time_ratio:.3f}x LoRA's training time" if t.adalora_time_ratio else "time not reported")
    qtime = f"{t.qlora_time_ratio:.3f}x LoRA's time per step" if t.qlora_time_ratio else "time per step not reported"
    # LoRA's step is a subset of both others' work; a measured ratio below 1 is noise or another bottleneck
    noise = (" (a measured ratio below 1 is noise or another bottleneck, not less work)"
             if min(t.adalora_time_ratio or 2, t.qlora_time_ratio or 2) < 1 else "")
    smaller = total["qlora"] <= total["qlora-adalora"]
    say = {
        "N1": f"LoRA (r={ranks['r']}) on the 16-bit {name} needs {gb(total['lora'])}{per} with gradient "
              f"checkpointing and {gb(usable)} are usable {where} "
              f"({USABLE_FRACTION:.0%}), so it {'fits' if fits['lora'] else 'does not fit'}; full fine-tuning "
              f"({gb(total['full'])}{per}, more than every adapter method here) is outside this guide's choices: "
              "adapters match it on GLUE (AdaLoRA paper Table 1: AdaLoRA 89.31 vs full 88.09; QLoRA paper "
              "Table 3: LoRA 88.8 vs full 88.6) but trail it on T5 instruction tuning (QLoRA Table 3, T5-11B: "
              "full 62.0 vs LoRA 60.7).",
        "N2": f"The priority is {priority}: "
              + {"accuracy": "check whether AdaLoRA's budget allocation can be afforded.",
                 "speed": f"16-bit LoRA does a subset of the others' work per step: AdaLoRA adds lora_E, the "
                          f"orthogonality regulariser and importance scores ({time}), QLoRA dequantizes every "
                          f"weight ({qtime}){noise}.",
                 "memory": f"QLoRA needs {gb(total['qlora'])}{per} instead of {gb(total['lora'])}, at "
                           f"{t.qlora_accuracy_gain:+.2f} accuracy points ({t.source})."}[priority],
        "N3": f"AdaLoRA (init_r={ranks['init_r']}, target_r={ranks['target_r']}) needs {need('adalora')} and "
              f"changes accuracy by {gain}, at {time}.",
        "N4": f"QLoRA (NF4 + double quantization, r={ranks['r']}) needs {need('qlora')}; it changes accuracy by "
              f"{t.qlora_accuracy_gain:+.2f} points against 16-bit LoRA, {qtime} ({t.source}).",
        "N5": f"The priority is {priority}: "
              + ("check whether AdaLoRA fits on the 4-bit base too." if priority == "accuracy" else
                 f"plain QLoRA ({gb(total['qlora'])}{per}) does less work per step than QLoRA + AdaLoRA "
                 f"({gb(total['qlora-adalora'])}{', which needs more memory' if smaller else ''}; AdaLoRA: "
                 f"{time}{noise})."),
        "N6": f"QLoRA + AdaLoRA (init_r={ranks['init_r']}, target_r={ranks['target_r']}) needs "
              f"{need('qlora-adalora')} and changes accuracy by {gain}.",
    }
    reasons = tuple(say[node] for node, _ in path)
    cards_text = f"{n_gpus} x {gpu_memory_gb:g} GB" + (f", {SHARDING_LABELS[sharding]}" if sharding else "")
    if method == "none":
        config, alternatives = {}, _elsewhere(cfg, total["qlora"], usable, seq_len, batch_size, cards, ranks["r"])
        layout = f"{cards_text}: nothing fits (QLoRA needs {gb(total['qlora'])} per card)"
    else:
        config = {**settings[method], "gradient_checkpointing":
                  _total(cfg, method, settings[method], seq_len, batch_size, False, cards) > usable}
        if cards:
            config |= {"n_gpus": n_gpus, "sharding": sharding}
        alternatives = tuple(f"{LEAF_LABELS[m]} also fits: {gb(total[m])}{per}" for m in settings
                             if fits[m] and m != method)
        layout = f"{cards_text}: {gb(total[method])} per card ({LEAF_LABELS[method]})"
    return Recommendation(method, reasons, path, facts, {m: v / 1e9 for m, v in total.items()}, config,
                          alternatives, tuple(notes), n_gpus, sharding, layout)


@functools.lru_cache(maxsize=None)
def _params(name: str) -> int:
    """Parameters of a published model."""
    return footprint(name, "full").total_params


def _smallest_fitting(lowest: int, highest: int, needs, usable: float) -> int | None:
    """The fewest cards in [lowest, highest] on which ``needs(cards)`` bytes per card fit; per-card needs do not grow
    with the number of cards (bisection). None when even ``highest`` cards are too few."""
    if needs(highest) > usable:
        return None
    while lowest < highest:
        mid = (lowest + highest) // 2
        lowest, highest = (lowest, mid) if needs(mid) <= usable else (mid + 1, highest)
    return lowest


def _elsewhere(cfg: dict, qlora_bytes: int, usable: float, seq_len: int, batch_size: int,
               cards: dict | None = None, r: int = DEFAULT_R) -> tuple[str, ...]:
    """What fits when nothing fits on these cards: bigger cards, more of these (device_map, FSDP, QLoRA at rank
    ``r``), a smaller model (QLoRA at PEFT's default rank)."""
    card = math.ceil(qlora_bytes / USABLE_FRACTION / 1e8) / 10  # GB, rounded up to 0.1
    n_gpus = cards["world_size"] if cards else 1
    kind = DECODERS if cfg["model_type"] in DECODERS else ENCODERS
    fitting = []
    for other, other_cfg in PUBLISHED_CONFIGS.items():
        if other_cfg["model_type"] in kind and not (cards and cards["sharding"] == "device_map"
                                                    and other_cfg["num_hidden_layers"] < n_gpus):
            settings = _settings(other_cfg, "qlora", {"r": DEFAULT_R}, cards)
            report_total = _total(other_cfg, "qlora", settings, seq_len, batch_size, True, cards)
            if report_total <= usable:
                fitting.append((_params(other), other, report_total))
    here = "this card" if n_gpus == 1 else "these cards"
    largest = (f"The largest published model whose QLoRA (r={DEFAULT_R}) fits {here} is {max(fitting)[1]} "
               f"({gb(max(fitting)[2])}{' per card' if n_gpus > 1 else ''})." if fitting else
               f"No published model of this kind fits {here} in QLoRA.")
    if n_gpus == 1:
        single = (f"QLoRA needs {gb(qlora_bytes)}: " + (f"a single card of at least {card:g} GB holds it."
                  if card <= MAX_GPU_MEMORY_GB else f"more than any single card holds ({card:g} GB would be needed)."))
    else:
        single = (f"QLoRA needs {gb(qlora_bytes)} per card on {n_gpus} cards with "
                  f"{SHARDING_LABELS[cards['sharding']]}: "
                  + (f"{n_gpus} cards of at least {card:g} GB hold it." if card <= MAX_GPU_MEMORY_GB else
                     f"more than any single card holds ({card:g} GB per card would be needed)."))
    def needs(sharding: str):
        settings = _settings(cfg, "qlora", {"r": r}, {"sharding": sharding})
        return lambda n: _total(cfg, "qlora", settings, seq_len, batch_size, True,
                                {"world_size": n, "sharding": sharding})

    layers = cfg["num_hidden_layers"]
    split = _smallest_fitting(min(2, layers), layers, needs("device_map"), usable)
    split_text = (f"On cards of this size, device_map='auto' would split it over {split} cards (naive model "
                  f"parallelism: one card computes at a time): {gb(needs('device_map')(split))} on the most loaded."
                  if split else
                  f"On cards of this size, device_map='auto' cannot hold it: split over all {layers} layers, the most "
                  f"loaded card still needs {gb(needs('device_map')(layers))}.")
    shard = _smallest_fitting(2, MAX_FSDP_CARDS, needs("fsdp"), usable)
    shard_text = (f"With FSDP (BitsAndBytesConfig(bnb_4bit_quant_storage=torch.bfloat16)), {shard} cards of this "
                  f"size hold QLoRA: {gb(needs('fsdp')(shard))} per card." if shard else
                  f"With FSDP no number of these cards holds QLoRA: on {MAX_FSDP_CARDS} each still needs "
                  f"{gb(needs('fsdp')(MAX_FSDP_CARDS))} (activations, quantization constants and the gathered layers "
                  "are not shared).")
    return single, split_text, largest, shard_text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Recommend a PEFT method, or print the decision tree.")
    parser.add_argument("--mermaid", action="store_true", help="print the mermaid flowchart of the rules")
    parser.add_argument("--gpu-memory-gb", type=float, default=24.0)
    parser.add_argument("--model", default="llama-2-7b", help=f"one of {sorted(PUBLISHED_CONFIGS)}")
    parser.add_argument("--priority", default="accuracy", choices=PRIORITIES)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--trainable-budget", type=int, default=None)
    parser.add_argument("--n-gpus", type=int, default=1, help="cards of --gpu-memory-gb each")
    parser.add_argument("--sharding", default=None, choices=SHARDINGS, help="default: FSDP on several cards")
    args = parser.parse_args(argv)
    if args.mermaid:
        print(mermaid(), end="")
        return
    print(recommend(args.gpu_memory_gb, args.model, n_gpus=args.n_gpus, sharding=args.sharding,
                    trainable_budget=args.trainable_budget, priority=args.priority, seq_len=args.seq_len,
                    batch_size=args.batch_size))


if __name__ == "__main__":
    main()
