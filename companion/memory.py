"""Memory accounting for full, LoRA, AdaLoRA and QLoRA fine-tuning, from a model config alone.

``footprint(config, method)`` counts, with plain integer arithmetic, the bytes a training run holds:

- **weights**: every parameter and buffer of the base model as transformers stores it. For the 4-bit methods
  each quantised ``nn.Linear`` weight is packed NF4, ``ceil(n/2)`` bytes, plus its ``QuantState``
  (``bitsandbytes.functional.quantize_4bit``): one fp32 ``absmax`` per block of ``blocksize``; with double
  quantisation (QLoRA paper §3, Eq. 5-6) a uint8 ``absmax`` per block, an fp32 ``state2.absmax`` per 256
  blocks and one fp32 ``offset`` per tensor. The shared code tables are not counted. Which Linears stay
  unquantised follows transformers ``get_keys_to_not_convert`` (tied weights, the module of the last named
  parameter, the output embedding) unless ``skip_modules`` replaces that list, as ``llm_int8_skip_modules``
  does. Everything else is stored in ``compute_dtype`` (load with ``dtype=compute_dtype``); the rotary
  ``inv_freq`` buffers stay fp32 and BERT/RoBERTa ``position_ids``/``token_type_ids`` are int64.
- **adapter**: LoRA ``lora_A`` (r, in) and ``lora_B`` (out, r); AdaLoRA adds ``lora_E`` (r, 1) and the frozen
  ``ranknum`` (1,), in ``adapter_dtype``: fp32 by default, as PEFT keeps them (``autocast_adapter_dtype=True``);
  artidoro/qlora casts its LoRA layers to bf16 (``adapter_dtype="bfloat16"``). For AdaLoRA ``r`` is
  PEFT's ``init_r``: shapes never shrink during training (masking zeroes ``lora_E``), so ``target_r`` does
  not change memory. With ``head="seq-cls"`` PEFT (``task_type="SEQ_CLS"``) also trains a copy of the
  classification head (``modules_to_save``, stored in the base dtype); it is counted here, so
  ``trainable_params = adapter_params + head params``, which equals PEFT's ``get_nb_trainable_parameters``.
  (peft 0.21.2 quirk: on a bf16/fp16 base ``ranknum`` is left ``requires_grad=True`` and PEFT then reports
  one more trainable parameter per AdaLoRA module; it is not an adapter parameter and is not counted.)
- **full fine-tuning** convention: weights and gradients in ``compute_dtype``, AdamW's two states in fp32.
  That is 12 B/param in bf16, the QLoRA paper's ">780 GB" for LLaMA-65B. ``master_weights=True`` adds
  an fp32 master copy (+4 B/param, the 16 B/param mixed-precision recipe of ZeRO, Rajbhandari et al. 2020).
- **optimizer**: ``adamw``/``paged_adamw_32bit``: two fp32 states (torch AdamW on fp32 parameters, bnb's 32-bit
  optimizers on any; paging moves them to CPU only under memory pressure). ``adamw-8bit``/``paged_adamw_8bit``:
  two uint8 states plus an fp32 absmax per 256 values for every tensor of at least 4096 values, fp32 states
  below that (``bitsandbytes.optim.Optimizer8bit``, ``min_8bit_size=4096``). ``sgd`` (no momentum): none.
- **activations** (an estimate, not a measurement): the tensors autograd saves for backward, per layer and
  token, in units of ``compute_dtype`` elements, with a fused attention kernel (SDPA/flash: no seq x seq
  matrices kept)::

      decoder (pre-RMSNorm, SwiGLU):   8*h + 2*q_dim + 2*kv_dim + 4*i
          2 norms x (input upcast to fp32 = 2h, normalised h, output h), q and k after rotary, v,
          attention output, then gate, up, silu(gate) and their product (i each)
      encoder (post-LayerNorm, GELU):  4*h + 2*q_dim + 2*kv_dim + 2*i   (q_dim = kv_dim = h)

  times batch x seq x layers. With gradient checkpointing only each layer's input (h) is kept, plus one
  layer recomputed during backward. A causal-LM head adds its logits, batch x seq x vocab, in
  ``compute_dtype`` (returned) and in fp32 (the loss's log-softmax). Dropout masks, temporaries and
  allocator fragmentation are not counted.
- **AdaLoRA importance scores**: ``RankAllocator.update_ipt`` keeps ``ipt``, ``exp_avg_ipt`` and
  ``exp_avg_unc`` (AdaLoRA paper Eq. 10-12), three fp32 tensors shaped like each adapter tensor.

**Several cards** (``world_size`` > 1): every ``*_bytes`` field is per card, the parameter counts stay the whole
model's. With ``world_size=1`` every ``sharding`` is the single-card run above.

- ``sharding="ddp"`` (torch ``DistributedDataParallel``): each card holds the whole single-card footprint, with
  activations for ``batch_size`` sequences per card, plus DDP's gradient buckets: one more copy of the trainable
  gradients (``gradient_as_bucket_view=False``, the default).
- ``sharding="fsdp"`` (PyTorch FSDP2 ``fully_shard`` on each decoder layer, then on the root; FULL_SHARD): every
  parameter, its gradient and its optimizer states are chunked on dim 0 into ``world_size`` pieces padded to
  ``ceil(dim0 / world_size)`` rows, so a rank holds ``ceil(dim0 / world_size) * numel / dim0`` elements of each
  (``fully_shard`` docs: DTensors "sharded on dim-0"; ``FSDPParam`` pads every rank to ``torch.chunk``'s first
  chunk, ``padded_sharded_param_size``). A 4-bit weight is its packed bytes viewed in
  ``quant_storage``, shape ``(ceil(n/2) / itemsize, 1)`` (bitsandbytes ``Params4bit(quant_storage=...)``); its
  ``QuantState`` and the model's buffers are not parameters and stay whole on every rank. The default uint8
  storage cannot be sharded (FSDP1 through transformers/accelerate: "Cannot flatten integer dtype tensors";
  accelerate's FSDP2 leaves non-float ``Params4bit`` out of sharding), hence
  ``BitsAndBytesConfig(bnb_4bit_quant_storage=torch.bfloat16)`` (bitsandbytes docs, "FSDP-QLoRA"). Activations
  are those of ``batch_size`` sequences per card, plus what FSDP gathers to compute: the unsharded root group
  (everything outside the layers: embeddings, final norm, head), which stays gathered from forward through
  backward (``reshard_after_forward=None`` resolves to False for the root), the unsharded parameters of the largest
  layer twice (the one computing and the one prefetched, FSDP2's default), and the unsharded gradients of the
  root's and that layer's trainable parameters before their reduce-scatter. Collective buffers are not counted.
- ``sharding="device_map"`` (accelerate big-model inference, ``device_map="auto"``: one process, the cards take
  turns): the layers are split in order as evenly as possible, the first ``num_hidden_layers % world_size`` cards
  taking one more; card 0 also holds the embeddings (and the rotary or position buffers), the last card the final
  norm and the head. The report is the most loaded card's: weights, adapter, gradients, optimizer states and
  importance scores of its modules, and the activations of its layers (and of the logits, on the last card) for
  ``batch_size`` sequences, the whole batch.

``gb`` formats decimal gigabytes (1 GB = 1e9 bytes), the unit of the QLoRA paper's tables.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import NamedTuple

from .architectures import (DECODERS, ENCODERS, PUBLISHED_CONFIGS, _as_dict, _attention_dims, _Module,  # noqa: F401
                            _modules, published_config)

METHODS = ("full", "lora", "adalora", "qlora", "qlora-adalora")
HEADS = ("causal-lm", "seq-cls", "none")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# optimizer name -> bits per Adam state (0: no state)
OPTIMIZERS = {"adamw": 32, "paged_adamw_32bit": 32, "adamw-8bit": 8, "paged_adamw_8bit": 8, "sgd": 0}
# peft.utils.constants TRANSFORMERS_MODELS_TO_{LORA,ADALORA}_TARGET_MODULES_MAPPING (peft 0.21.2)
DEFAULT_TARGET_MODULES = {
    "lora": {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
             "bert": ["query", "value"], "roberta": ["query", "value"]},
    "adalora": {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                "bert": ["query", "value"], "roberta": ["query", "key", "value", "dense"]},
}
NESTED_BLOCKSIZE = 256  # bitsandbytes quantize_4bit(compress_statistics=True), hard-coded
SHARDINGS = ("ddp", "fsdp", "device_map")
QUANT_STORAGE_BYTES = {"uint8": 1, "bfloat16": 2, "float16": 2, "float32": 4}  # bnb_4bit_quant_storage choices


def gb(n_bytes: float) -> str:
    """Decimal gigabytes (1 GB = 1e9 bytes), e.g. ``gb(3_870_000_000) == '3.87 GB'``."""
    return f"{n_bytes / 1e9:.2f} GB"


def _check_blocksize(blocksize: int) -> None:
    if not (isinstance(blocksize, int) and 32 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0):
        raise ValueError(f"blocksize must be a power of two in [32, 4096] (bitsandbytes quantize_4bit), "
                         f"got {blocksize!r}")


def bytes_4bit(numel: int, *, blocksize: int = 64, double_quant: bool = False) -> int:
    """Bytes of one 4-bit tensor as bitsandbytes stores it: packed codes plus ``QuantState`` tensors."""
    _check_blocksize(blocksize)
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)  # two 4-bit codes per uint8
    if not double_quant:
        return packed + 4 * blocks  # fp32 absmax per block
    # uint8 absmax per block + fp32 state2.absmax per 256 blocks + one fp32 offset (QLoRA §3, Eq. 6)
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4


def bits_per_parameter(numel: int = 4096 * 4096, *, blocksize: int = 64, double_quant: bool = False) -> float:
    """Storage bits per weight of a 4-bit tensor: 4.5 at blocksize 64, about 4.127 with double quantisation."""
    return 8 * bytes_4bit(numel, blocksize=blocksize, double_quant=double_quant) / numel


@dataclass(frozen=True)
class MemoryReport:
    """Bytes one card holds in a training run; ``total_bytes`` is their sum. Parameter counts are logical (unpacked)
    and the whole model's, on any number of cards."""

    method: str
    weight_bytes: int  # base model: parameters, buffers, 4-bit quantisation state
    adapter_bytes: int  # everything get_peft_model adds: adapter, AdaLoRA ranknum, trainable head copy
    grad_bytes: int
    optimizer_bytes: int  # optimizer states (+ fp32 master weights if asked for)
    importance_bytes: int  # AdaLoRA RankAllocator: ipt, exp_avg_ipt, exp_avg_unc, fp32 per adapter value
    activation_bytes: int  # an estimate, see the module docstring
    adapter_params: int  # lora_A + lora_B (+ lora_E): PEFT's trainable count without the head
    trainable_params: int
    total_params: int  # base model + adapter
    world_size: int = 1  # cards; with more than one, every *_bytes field is per card (module docstring)
    sharding: str | None = None  # None (one card), "ddp", "fsdp" or "device_map"

    @property
    def total_bytes(self) -> int:
        return sum(v for k, v in asdict(self).items() if k.endswith("_bytes"))

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}

    def to_gb(self) -> dict:
        """The byte fields in decimal GB."""
        return {k: v / 1e9 for k, v in self.as_dict().items() if k.endswith("_bytes")}

    def __str__(self) -> str:
        rows = [f"{k.removesuffix('_bytes'):<12}{gb(v):>12}" for k, v in self.as_dict().items() if k.endswith("_bytes")]
        params = (f"trainable {self.trainable_params:,} of {self.total_params:,} params "
                  f"(adapter {self.adapter_params:,})")
        if self.world_size > 1:
            params += f", per card of {self.world_size} ({self.sharding})"
        return "\n".join([f"{self.method}: {params}", *rows])


@functools.lru_cache(maxsize=1 << 16)
def _unquantized(name: str, patterns: tuple[str, ...]) -> bool:
    """Negated transformers ``should_convert_module``: a pattern matches up to a module boundary, or a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{key}){boundary}", name) or name.endswith(key) for key in patterns)


def _default_skip_modules(mods: list[_Module], head: str) -> list[str]:
    """transformers ``get_keys_to_not_convert``: tied weights, last named parameter, output embedding."""
    last = next(m for m in reversed(mods) if not m.tied)
    last_param = f"{last.name}.bias" if last.bias else last.name  # ".weight" is stripped there, ".bias" is not
    return [last_param] + (["lm_head", mods[0].name] if head == "causal-lm" else [])


def _targeted(linears: list[_Module], target_modules, excluded: set[str]) -> list[_Module]:
    """peft ``check_target_module_exists``: a list entry matches a name or a ``.``-suffix; a string is a regex."""
    names = sorted({m.name.rsplit(".", 1)[-1] for m in linears})
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        return [m for m in linears if m.name not in excluded]
    if isinstance(target_modules, str):
        hits = [m for m in linears if re.fullmatch(target_modules, m.name)]
        if not hits:
            raise ValueError(f"target_modules regex {target_modules!r} matches no Linear module; names: {names}")
        return [m for m in hits if m.name not in excluded]
    for key in target_modules:
        if not any(m.name == key or m.name.endswith("." + key) for m in linears):
            raise ValueError(f"target module {key!r} does not exist in this architecture; Linear modules: {names}")
    return [m for m in linears if m.name not in excluded
            and any(m.name == key or m.name.endswith("." + key) for key in target_modules)]


def _optimizer_bytes(tensors: list[int], bits: int) -> int:
    """Adam's exp_avg and exp_avg_sq per tensor; bnb's 8-bit states: uint8 + fp32 absmax per 256 values."""
    if bits == 0:
        return 0
    if bits == 32:
        return 8 * sum(tensors)
    return sum(8 * n if n < 4096 else 2 * (n + 4 * math.ceil(n / 256)) for n in tensors)


def _activation_bytes(cfg: dict, head: str, tokens: int, checkpointing: bool, wb: int, layers: int | None = None,
                      logits: bool = True) -> int:
    """Saved-for-backward estimate of the module docstring: (layers x per-layer, or checkpoints) x tokens, for
    ``layers`` of the model (all of them by default), with the logits when ``logits`` (the card with the head)."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    layers = cfg["num_hidden_layers"] if layers is None else layers
    if cfg["model_type"] in DECODERS:
        _, q, kv = _attention_dims(cfg)
        per_layer = 8 * h + 2 * q + 2 * kv + 4 * inter
    else:
        per_layer = 4 * h + 2 * h + 2 * h + 2 * inter  # 4h + 2 q_dim + 2 kv_dim + 2i, q_dim = kv_dim = h
    kept = layers * h + per_layer if checkpointing else layers * per_layer
    # + the fp32 log-softmax of the loss
    logit_bytes = tokens * cfg["vocab_size"] * (wb + 4) if head == "causal-lm" and logits else 0
    return tokens * kept * wb + logit_bytes


class _Tensor(NamedTuple):
    """One tensor a card may hold. ``field``: the report field it counts in; ``dim0``: the dimension FSDP shards;
    ``grad_itemsize`` 0 for a frozen tensor; ``sharded=False`` for what FSDP leaves whole on every rank (buffers, a
    4-bit weight's QuantState, counted as ``dim0 = numel`` bytes of one byte)."""

    field: str  # "weight" | "adapter"
    dim0: int
    numel: int
    itemsize: int  # bytes per element
    grad_itemsize: int = 0
    importance: bool = False  # AdaLoRA's RankAllocator keeps ipt, exp_avg_ipt, exp_avg_unc shaped like it
    sharded: bool = True

    def on_rank(self, world_size: int) -> int:
        """Elements one FSDP rank holds: dim 0 chunked into ``world_size`` pieces, padded to ceil(dim0 / world_size)."""
        if world_size == 1 or not self.sharded:
            return self.numel
        return math.ceil(self.dim0 / world_size) * (self.numel // self.dim0)


_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")  # model.layers.3.mlp / roberta.encoder.layer.3.output


def _layer_index(mods: list[_Module], n_layers: int) -> list[int]:
    """Each module's layer; -1 before the first layer, ``n_layers`` after the last (module order is forward order)."""
    out: list[int] = []
    for m in mods:
        hit = _LAYER.search(m.name)
        out.append(int(hit[1]) if hit else (n_layers if out and out[-1] >= 0 else -1))
    return out


@functools.lru_cache(maxsize=1024)
def _module_tensors(out: int, in_: int, sizes: tuple, quantized: bool, head_copy: bool, adapted: bool, r: int,
                    svd: bool, wb: int, ab: int, qs: int, grad: int, blocksize: int,
                    double_quant: bool) -> tuple[_Tensor, ...]:
    """The tensors of one module of ``sizes`` (numel of its weight, bias) and of what PEFT adds to it."""
    tensors = []
    if quantized:  # Params4bit: packed codes viewed in quant_storage, shape (ceil(n/2) / itemsize, 1)
        packed = math.ceil(out * in_ / 2)
        state = bytes_4bit(out * in_, blocksize=blocksize, double_quant=double_quant) - packed
        tensors += [_Tensor("weight", packed // qs, packed // qs, qs),
                    _Tensor("weight", state, state, 1, sharded=False)]
    tensors += [_Tensor("weight", out, n, wb, grad) for n in sizes[quantized:]]  # weight (out, in), bias (out,)
    if head_copy:  # PEFT modules_to_save: a trained copy of the head
        tensors += [_Tensor("adapter", out, n, wb, wb) for n in sizes]
    if adapted:  # lora_A (r, in), lora_B (out, r); AdaLoRA: lora_E (r, 1), frozen ranknum (1,)
        tensors += [_Tensor("adapter", r, r * in_, ab, ab, svd), _Tensor("adapter", out, out * r, ab, ab, svd)]
        if svd:
            tensors += [_Tensor("adapter", r, r, ab, ab, True), _Tensor("adapter", 1, 1, ab)]
    return tuple(tensors)


def _held(blocks: dict[tuple, int], world_size: int, bits: int, master: bool) -> dict:
    """Bytes per report field, without activations, on one rank of ``world_size`` (FSDP; 1: unsharded) of ``blocks``,
    which maps the tensors of one layer (or of the modules outside the layers) to how many such blocks there are."""
    weight = adapter = grad = optimizer = importance = 0
    for block, count in blocks.items():
        for t in block:
            n = t.on_rank(world_size)
            if t.field == "weight":
                weight += count * n * t.itemsize
            else:
                adapter += count * n * t.itemsize
            if t.grad_itemsize:
                grad += count * n * t.grad_itemsize
                optimizer += count * (_optimizer_bytes([n], bits) + (4 * n if master else 0))
            if t.importance:
                importance += count * 3 * n * t.itemsize
    return {"weight_bytes": weight, "adapter_bytes": adapter, "grad_bytes": grad, "optimizer_bytes": optimizer,
            "importance_bytes": importance}


def _gathered_bytes(root: tuple, layers: list[tuple]) -> int:
    """What FSDP holds unsharded at its peak (module docstring): the root group's parameters and trainable gradients,
    the largest layer's parameters twice (computing, prefetched) and its trainable gradients once."""
    def params_grads(block: tuple) -> tuple[int, int]:
        return (sum(t.numel * t.itemsize for t in block if t.sharded),
                sum(t.numel * t.grad_itemsize for t in block if t.sharded))

    return sum(params_grads(root)) + max((2 * p + g for p, g in map(params_grads, set(layers))), default=0)


def _check_cards(world_size, sharding, quant_storage) -> str:
    """Validate the multi-card arguments; returns quant_storage as a dtype name."""
    if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer number of cards (1 for one card), got {world_size!r}")
    if sharding is not None and sharding not in SHARDINGS:
        raise ValueError(f"unknown sharding {sharding!r}; choose one of None (one card), 'ddp', 'fsdp' or 'device_map'")
    if sharding is None and world_size > 1:
        raise ValueError(f"world_size={world_size} needs a sharding: 'ddp' (every card holds the whole model), 'fsdp' "
                         "(cards share parameters, gradients and optimizer states) or 'device_map' (cards hold "
                         "consecutive layers and take turns); pass sharding=...")
    storage = str(quant_storage).removeprefix("torch.")
    if storage not in QUANT_STORAGE_BYTES:
        raise ValueError(f"unknown quant_storage {quant_storage!r} (bnb_4bit_quant_storage); choose one of "
                         f"{sorted(QUANT_STORAGE_BYTES)}")
    return storage


def footprint(config, method: str, *, r: int = 8, target_modules=None, double_quant: bool = False,
              blocksize: int = 64, compute_dtype="bfloat16", skip_modules=None, optimizer: str = "adamw",
              batch_size: int = 1, seq_len: int = 512, gradient_checkpointing: bool = False,
              head: str | None = None, master_weights: bool = False, adapter_dtype="float32",
              world_size: int = 1, sharding: str | None = None, quant_storage="uint8") -> MemoryReport:
    """Memory of fine-tuning ``config`` with ``method``, per card; the conventions are in the module docstring.

    ``config``: a transformers config (llama, mistral, qwen2, bert, roberta), a dict of its kwargs with
    ``model_type``, or a name in ``PUBLISHED_CONFIGS``. ``r`` is LoRA's ``r`` and AdaLoRA's ``init_r``.
    ``target_modules`` as in peft: names, a regex, or ``"all-linear"``; None takes peft's per-architecture
    default. ``head``: ``"causal-lm"`` (decoder default), ``"seq-cls"`` (encoder default) or ``"none"``.
    ``skip_modules`` is ``llm_int8_skip_modules``; ``blocksize`` other than 64 is a what-if (transformers
    always uses 64). ``master_weights`` adds an fp32 master copy to full fine-tuning in 16 bit.
    ``world_size`` cards with ``sharding`` ``"ddp"``, ``"fsdp"`` or ``"device_map"`` (module docstring, "Several
    cards"); ``batch_size`` is per card for DDP and FSDP, the whole batch for device_map. ``quant_storage`` is
    ``bnb_4bit_quant_storage``, the dtype the packed 4-bit bytes are viewed in; FSDP needs a float one.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer (LoRA r, AdaLoRA init_r), got {r!r}")
    _check_blocksize(blocksize)
    dtype = str(compute_dtype).removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown compute_dtype {compute_dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    adapter_dtype = str(adapter_dtype).removeprefix("torch.")
    if adapter_dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown adapter_dtype {adapter_dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
    storage, ws = _check_cards(world_size, sharding, quant_storage), int(world_size)
    if sharding == "fsdp" and method.startswith("qlora") and storage == "uint8":
        raise ValueError(f"FSDP cannot shard 4-bit weights stored as uint8: FSDP1 (transformers/accelerate) fails with "
                         "'Cannot flatten integer dtype tensors' and accelerate's FSDP2 leaves non-float Params4bit "
                         f"whole on every card; load with BitsAndBytesConfig(bnb_4bit_quant_storage=torch.{dtype}), "
                         f"the compute dtype, and pass quant_storage='{dtype}'")
    cfg = _as_dict(config)
    mt, n_layers = cfg["model_type"], cfg["num_hidden_layers"]
    if sharding == "device_map" and ws > n_layers:
        raise ValueError(f"device_map cannot split {n_layers} layers over {ws} cards, each card needs a layer; "
                         f"pass world_size <= {n_layers}")
    head = head or ("causal-lm" if mt in DECODERS else "seq-cls")
    if head not in HEADS or (head == "causal-lm" and mt in ENCODERS):
        raise ValueError(f"unknown head {head!r} for {mt}; choose one of {HEADS} ('causal-lm' for decoders only)")
    wb = DTYPE_BYTES[dtype]
    mods = _modules(cfg, head)
    linears = [m for m in mods if m.kind == "linear"]
    head_mods = [m for m in mods if head == "seq-cls" and m.name.split(".")[0] in ("score", "classifier")]
    base_params = sum(sum(m.tensors) for m in mods)

    quantized: set[str] = set()
    if method.startswith("qlora"):
        skip = _default_skip_modules(mods, head) if skip_modules is None else list(skip_modules)
        quantized = {m.name for m in linears if not m.tied and not _unquantized(m.name, tuple(skip))}
        if bad := sorted(quantized & {m.name for m in head_mods}):
            raise ValueError(f"the classification head {bad} would be quantised to 4 bit and could not be trained; "
                             "pass skip_modules=['classifier'] (BitsAndBytesConfig llm_int8_skip_modules)")

    svd, full = method.endswith("adalora"), method == "full"
    adapted: list[_Module] = []
    if not full:
        if target_modules is None:
            defaults = DEFAULT_TARGET_MODULES["adalora" if svd else "lora"]
            if mt not in defaults:
                raise ValueError(f"peft has no default target_modules for {method} on {mt}; pass target_modules")
            target_modules = defaults[mt]
        all_linear = isinstance(target_modules, str) and target_modules.lower() == "all-linear"
        # SEQ_CLS: the head is trained whole (modules_to_save); "all-linear" also leaves out the output embedding
        excluded = {m.name for m in head_mods} | ({"lm_head"} if all_linear and head == "causal-lm" else set())
        adapted = _targeted(linears, target_modules, excluded)

    if mt in DECODERS:  # rotary_emb.inv_freq and original_inv_freq: fp32, head_dim / 2 each
        buffers = 2 * 4 * math.ceil(_attention_dims(cfg)[0] / 2)
    else:  # embeddings.position_ids and token_type_ids: int64, max_position_embeddings each
        buffers = 2 * 8 * cfg.get("max_position_embeddings", 512)
    blocks: list[list[_Tensor]] = [[] for _ in range(n_layers + 2)]  # blocks[layer + 1]; -1 before, n_layers after
    blocks[0].append(_Tensor("weight", buffers, buffers, 1, sharded=False))
    ab, qs, grad = DTYPE_BYTES[adapter_dtype], QUANT_STORAGE_BYTES[storage], wb if full else 0
    head_names = set() if full else {m.name for m in head_mods}
    adapted_names = {m.name for m in adapted}
    for m, layer in zip(mods, _layer_index(mods, n_layers)):
        if m.name in quantized and math.ceil(m.out * m.in_ / 2) % qs:
            raise ValueError(f"{m.name}: {m.out * m.in_} 4-bit codes pack into {math.ceil(m.out * m.in_ / 2)} bytes, "
                             f"not a multiple of {qs}, so bitsandbytes cannot view them as {storage}; "
                             "pass quant_storage='uint8'")
        blocks[layer + 1] += _module_tensors(m.out, m.in_, m.tensors, m.name in quantized, m.name in head_names,
                                             m.name in adapted_names, r, svd, wb, ab, qs, grad, blocksize, double_quant)
    first, *layers, last = map(tuple, blocks)

    bits, master = OPTIMIZERS[optimizer], full and master_weights and wb < 4
    tokens = batch_size * seq_len
    if sharding == "device_map" and ws > 1:  # the most loaded card; layers in order, the first cards take one more
        per_card = [n_layers // ws + (c < n_layers % ws) for c in range(ws)]
        cards, start = [], 0
        for c, k in enumerate(per_card):
            on_card = Counter(layers[start:start + k]) + Counter([first] * (c == 0) + [last] * (c == ws - 1))
            held = _held(on_card, 1, bits, master)
            held["activation_bytes"] = _activation_bytes(cfg, head, tokens, gradient_checkpointing, wb, k,
                                                         logits=c == ws - 1)
            cards.append(held)
            start += k
        fields = max(cards, key=lambda held: sum(held.values()))
    else:
        fields = _held(Counter([first, last, *layers]), ws if sharding == "fsdp" else 1, bits, master)
        fields["activation_bytes"] = _activation_bytes(cfg, head, tokens, gradient_checkpointing, wb)
        if sharding == "ddp" and ws > 1:
            fields["grad_bytes"] *= 2  # DDP's gradient buckets: a second copy of the trainable gradients
        elif sharding == "fsdp" and ws > 1:
            fields["activation_bytes"] += _gathered_bytes(first + last, layers)
    adapter_params = sum(r * m.in_ + m.out * r + (r if svd else 0) for m in adapted)  # lora_A, lora_B (, lora_E)
    trainable = sum(t.numel for block in blocks for t in block if t.grad_itemsize)
    return MemoryReport(method, adapter_params=adapter_params, trainable_params=trainable,
                        total_params=base_params + adapter_params, world_size=ws, sharding=sharding, **fields)
