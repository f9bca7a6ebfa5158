"""Chapter 7 exercises: a selection rule for a scenario. Whether a footprint fits a card (the usable-memory
rule of ``companion.select``), which method ``companion.select.recommend`` picks for a card, a model and a
priority, and what an adapter costs to train beyond its base model (``companion.memory.footprint``)."""

from __future__ import annotations

import random
import warnings
from fractions import Fraction

from .core import Case, Exercise, compare_equal, register

DECODER_NAMES = ("llama-2-7b", "mistral-7b", "qwen2.5-0.5b", "qwen2.5-1.5b", "tinyllama-1.1b", "llama-2-13b",
                 "llama-2-70b", "llama-65b")
CARDS = (8, 12, 16, 24, 40, 48, 80, 94, 141)  # GB of common single cards (T4 16, RTX 4090 24, A100 40/80, H100 ...)
SCENARIOS = ((24, "llama-2-7b"), (16, "qwen2.5-1.5b"), (80, "llama-2-13b"), (48, "llama-65b"), (24, "llama-2-70b"))
PRIORITIES = ("accuracy", "memory", "speed")


# ---------------------------------------------------------------------------------------------------------
# 7.1 Does it fit?

def reference_fits_on_card(total_bytes: int, gpu_memory_gb: float) -> bool:
    """``companion.select.recommend``'s rule: a method fits when ``total_bytes <= USABLE_FRACTION *
    gpu_memory_gb * 1e9`` (decimal GB, 90% of the card; the rest is left for the CUDA context and allocator
    fragmentation, which ``footprint`` does not count)."""
    from ..select import USABLE_FRACTION

    return bool(total_bytes <= USABLE_FRACTION * gpu_memory_gb * 1e9)


def _unambiguous(total_bytes: int, gpu_memory_gb: float) -> bool:
    """True when every natural way to write the rule in floating point gives the exact answer."""
    exact = Fraction(total_bytes) <= Fraction(9, 10) * Fraction(repr(gpu_memory_gb)) * 10**9
    g = gpu_memory_gb
    forms = (total_bytes <= 0.9 * g * 1e9, total_bytes <= g * 1e9 * 0.9, total_bytes / 1e9 <= 0.9 * g,
             total_bytes / (g * 1e9) <= 0.9, total_bytes <= g * 9e8, total_bytes / 1e9 / g <= 0.9)
    return all(f == exact for f in forms)


def _limit_is_exact(gpu_memory_gb: int) -> bool:
    """Whether 90% of the card, written in any natural order in floating point, is exactly its integer bytes
    (not so for 94 GB: 0.9 * 94 * 1e9 rounds above 84.6e9, and a strict < would pass at the limit)."""
    exact, g = 9 * gpu_memory_gb * 10**8, gpu_memory_gb
    return all(x == exact for x in (0.9 * g * 1e9, g * 1e9 * 0.9, g * 9e8, 0.9 * (g * 1e9), 0.9 * g * 10**9))


def _total(model: str, method: str) -> int:
    """The total bytes ``recommend`` computes for ``method`` (its recipe, with gradient checkpointing)."""
    from ..select import recommend

    return round(recommend(1024, model).footprint_gb[method] * 1e9)


def _fits_cases(rng: random.Random):
    compare = lambda g, e: compare_equal(g, e, what="whether it fits")  # noqa: E731

    def case(total, card, note):
        return Case((total, card), reference_fits_on_card(total, card), compare, note=note)

    yield case(_total("llama-2-7b", "lora"), 24, "the chapter's RTX 4090: Llama-2-7B, 16-bit LoRA")
    yield case(_total("llama-2-7b", "adalora"), 16, "the chapter's erratum: Llama-2-7B, 16-bit AdaLoRA on 16 GB")
    yield case(_total("llama-2-70b", "qlora"), 24, "Llama-2-70B in QLoRA on a 24 GB card")
    card = rng.choice([c for c in CARDS if _limit_is_exact(c)])
    yield case(9 * card * 10**8, card, "exactly 90% of the card (fits)")
    yield case(9 * card * 10**8 + 1, card, "one byte over 90% of the card")
    card = rng.choice(CARDS)
    yield case(int(card * 1e9 * rng.uniform(0.91, 0.96)), card,
               "above 90% of the card in GB, below 90% of it in GiB (2**30 bytes)")
    card = rng.choice(CARDS)
    yield case(int(card * 1e9 * rng.uniform(0.91, 0.99)), card, "between 90% and 100% of the card")
    for _ in range(4):
        card = round(rng.uniform(1, 200), rng.choice((0, 1, 2)))
        total = int(card * 1e9 * rng.uniform(0.5, 1.2))
        while not _unambiguous(total, card):  # on the limit to the last bit: move off it
            total -= 1
        yield case(total, card, "a card of any size")


register(Exercise(
    id="ch07.fits_on_card", chapter=7, title="Does it fit on the card?", level="warm-up",
    signature="fn(total_bytes: int, gpu_memory_gb: float) -> bool  # total_bytes: a footprint in bytes; "
              "gpu_memory_gb: one card's memory in GB as its maker states it",
    task="Decide whether a training run whose footprint (companion.memory.footprint(...).total_bytes) is "
         "total_bytes fits on one card of gpu_memory_gb, with the rule companion.select.recommend applies.",
    hint="a card's GB are decimal (1 GB = 10**9 bytes, not 2**30), and only 90% of it counts as usable: the CUDA "
         "context and allocator fragmentation take the rest. A footprint exactly at the limit fits.",
    cases=_fits_cases))


# ---------------------------------------------------------------------------------------------------------
# 7.2 The selection rule

def reference_choose_method(gpu_memory_gb: float, model: str, priority: str) -> str:
    """``companion.select.recommend(gpu_memory_gb, model, priority=priority).method``: the leaf of the
    chapter's decision tree (``companion.select.RULES``) at seq_len 512, batch 1 and PEFT's default ranks."""
    from ..select import recommend

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return recommend(gpu_memory_gb, model, priority=priority).method


def _between(low_bytes: int, high_bytes: int) -> float:
    """A card (GB, 2 decimals) whose usable 90% lies between two footprints."""
    return round((low_bytes + high_bytes) / 2 / 0.9 / 1e9, 2)


def _recipe_bytes(model: str, method: str, r: int) -> int:
    """``footprint`` total of ``method`` at rank ``r`` with ``recommend``'s recipe (``companion.select._settings``)."""
    from ..memory import PUBLISHED_CONFIGS, footprint

    quantized = method.startswith("qlora")
    encoder = PUBLISHED_CONFIGS[model]["model_type"] in ("bert", "roberta")
    return footprint(model, method, r=r, target_modules="all-linear", compute_dtype="bfloat16", double_quant=quantized,
                     optimizer="paged_adamw_32bit" if quantized else "adamw",
                     skip_modules=["classifier"] if quantized and encoder else None,
                     gradient_checkpointing=True).total_bytes


def _choose_cases(rng: random.Random):
    compare = lambda g, e: compare_equal(g, e, what="the method")  # noqa: E731

    def case(card, model, priority, note):
        return Case((card, model, priority), reference_choose_method(card, model, priority), compare, note=note)

    for card, model in SCENARIOS:
        yield case(card, model, rng.choice(PRIORITIES), f"the chapter's scenario: {card} GB, {model}")
    yield case(16, "llama-2-7b", "accuracy", "the erratum: AdaLoRA does not fit 16 GB, LoRA does")
    model = rng.choice(DECODER_NAMES[:6])
    yield case(_between(_recipe_bytes(model, "adalora", 8), _total(model, "adalora")), model, "accuracy",
               "AdaLoRA would fit at target_r=8 but is counted at init_r=12")
    model = rng.choice(DECODER_NAMES)
    yield case(_between(_total(model, "qlora-adalora"), _total(model, "lora")), model, "accuracy",
               "16-bit LoRA does not fit, QLoRA + AdaLoRA does")
    model = rng.choice(DECODER_NAMES[:6])
    yield case(_between(_total(model, "qlora"), _total(model, "qlora-adalora")), model, "accuracy",
               "QLoRA fits, QLoRA + AdaLoRA does not")
    model = rng.choice(DECODER_NAMES[:6])
    yield case(_between(_total(model, "qlora"), _total(model, "lora")), model, rng.choice(("speed", "memory")),
               "16-bit LoRA does not fit: the 4-bit branch")
    model = rng.choice(DECODER_NAMES)
    yield case(max(1.0, _between(0, _total(model, "qlora"))), model, rng.choice(PRIORITIES),
               "nothing fits on one card")
    yield case(rng.choice((80, 94, 141)), rng.choice(("qwen2.5-0.5b", "tinyllama-1.1b", "roberta-large")), "memory",
               "memory first on a big card: QLoRA although everything fits")
    for _ in range(2):
        yield case(rng.choice(CARDS + (round(rng.uniform(1, 200), 1),)),
                   rng.choice(DECODER_NAMES + ("roberta-base", "bert-base-uncased", "llama-33b")),
                   rng.choice(PRIORITIES), "a random card, model and priority")


register(Exercise(
    id="ch07.choose_method", chapter=7, title="Choosing a method for a card, a model and a priority", level="core",
    signature="fn(gpu_memory_gb: float, model: str, priority: str) -> str  # model: a name in "
              "companion.memory.PUBLISHED_CONFIGS; priority: 'accuracy' | 'speed' | 'memory'; returns 'lora' | "
              "'adalora' | 'qlora' | 'qlora-adalora' | 'none'",
    task="Return the method the chapter's decision tree picks (sequences of 512 tokens, batch 1): size every method "
         "with companion.memory.footprint under the chapter's recipes, then ask whether 16-bit LoRA fits, what "
         "the priority is, and whether AdaLoRA fits; on the 4-bit branch the same of QLoRA; 'none' when not even "
         "QLoRA fits. You may use companion.memory, not companion.select.",
    hint="footprint(model, method, r=r, target_modules='all-linear', compute_dtype='bfloat16', "
         "gradient_checkpointing=True) with r=8 for LoRA and init_r=12 for AdaLoRA, optimizer 'adamw' for the "
         "16-bit methods and double_quant=True, optimizer='paged_adamw_32bit' for the 4-bit ones (encoders: also "
         "skip_modules=['classifier']); then speed first picks (Q)LoRA, memory first QLoRA, and accuracy first "
         "the AdaLoRA variant when it fits.",
    forbidden=("companion.select", "bitsandbytes", "peft"),
    cases=_choose_cases))


# ---------------------------------------------------------------------------------------------------------
# 7.3 What the adapter costs to train

def reference_adapter_memory_bytes(config: dict, method: str, r: int) -> int:
    """``companion.memory.footprint(config, method, r=r, target_modules="all-linear", optimizer=...)``: its
    ``adapter_bytes + grad_bytes + optimizer_bytes + importance_bytes`` with fp32 adapters (PEFT's default)
    and the chapter's optimizers (AdamW; ``paged_adamw_32bit`` for the 4-bit methods)."""
    from ..memory import footprint

    optimizer = "paged_adamw_32bit" if method.startswith("qlora") else "adamw"
    report = footprint(config, method, r=r, target_modules="all-linear", optimizer=optimizer,
                       double_quant=method.startswith("qlora"))
    return report.adapter_bytes + report.grad_bytes + report.optimizer_bytes + report.importance_bytes


def _random_decoder(rng: random.Random) -> tuple[dict, str]:
    heads = rng.choice((4, 8, 12, 16))
    kv_heads = rng.choice([k for k in (1, 2, 4, heads) if heads % k == 0])
    head_dim = rng.choice((16, 32, 64))
    cfg = dict(model_type=rng.choice(("llama", "mistral", "qwen2")), hidden_size=heads * head_dim,
               num_hidden_layers=rng.randint(1, 6), num_attention_heads=heads, num_key_value_heads=kv_heads,
               intermediate_size=rng.choice((2, 3, 4)) * heads * head_dim + rng.choice((0, 8)),
               vocab_size=rng.randint(100, 1000), tie_word_embeddings=rng.random() < 0.5)
    note = "grouped-query attention (k, v narrower than q)" if kv_heads < heads else "multi-head attention"
    if rng.random() < 0.3:
        cfg["head_dim"] = head_dim * 2  # q_dim = heads * head_dim != hidden_size, as in Gemma or Qwen3
        note += ", head_dim given, heads * head_dim != hidden_size"
    return cfg, note


def _adapter_cases(rng: random.Random):
    from ..memory import PUBLISHED_CONFIGS

    compare = lambda g, e: compare_equal(g, e, what="the bytes")  # noqa: E731

    def case(cfg, method, r, note):
        return Case((cfg, method, r), reference_adapter_memory_bytes(cfg, method, r), compare, note=note)

    yield case(dict(PUBLISHED_CONFIGS["llama-2-7b"]), "lora", 8, "Llama-2-7B, LoRA r=8 (the chapter's recipe)")
    yield case(dict(PUBLISHED_CONFIGS["llama-2-7b"]), "adalora", 12,
               "Llama-2-7B, AdaLoRA at init_r=12: importance scores and ranknum")
    name = rng.choice(("mistral-7b", "qwen2.5-0.5b", "tinyllama-1.1b", "llama-2-70b"))
    yield case(dict(PUBLISHED_CONFIGS[name]), rng.choice(("qlora", "qlora-adalora")), rng.choice((8, 12, 16)),
               f"{name}: grouped-query attention, on a 4-bit base")
    for method in ("lora", "adalora", "qlora", "qlora-adalora"):
        cfg, note = _random_decoder(rng)
        yield case(cfg, method, rng.randint(1, 16), note)
    cfg, note = _random_decoder(rng)
    yield case(cfg, "adalora", 1, note + ", rank 1")


register(Exercise(
    id="ch07.adapter_memory_bytes", chapter=7, title="What an adapter costs to train", level="warm-up",
    signature="fn(config: dict, method: str, r: int) -> int  # config: a decoder's transformers config as a dict "
              "(hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, "
              "optional head_dim); method: 'lora' | 'adalora' | 'qlora' | 'qlora-adalora'; r: LoRA r or AdaLoRA "
              "init_r; returns bytes",
    task="Adapters on every Linear of a decoder layer (q, k, v, o, gate, up, down; not lm_head), in fp32 as PEFT "
         "keeps them, trained with a 32-bit AdamW: count the bytes of the adapter weights, their gradients, the two "
         "optimizer states and, for AdaLoRA, its importance scores and ranknum, over all layers.",
    hint="k and v map hidden_size to num_key_value_heads * head_dim (head_dim = hidden_size // num_attention_heads "
         "unless given). Per adapter parameter: 4 + 4 + 8 bytes, plus 12 for AdaLoRA's three importance tensors; "
         "AdaLoRA adds lora_E (r values) and a 4-byte ranknum per matrix, and its r is init_r. The 4-bit base "
         "changes nothing here.",
    cases=_adapter_cases))
