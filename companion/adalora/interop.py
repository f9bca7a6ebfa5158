"""Move between the companion's AdaLoRA and PEFT's, and name layers the way the paper does.

PEFT's names carry the adapter name and live under the ``PeftModel`` wrapper:
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default``; the allocator's
names (``config.rank_pattern`` keys) are relative to the inner model:
``bert.encoder.layer.0.attention.self.query.lora_E.default``. The companion names the layer
itself: ``bert.encoder.layer.0.attention.self.query``.
"""

from __future__ import annotations

import re

import pandas as pd
import torch
from torch import nn

from .layer import adalora_layers

# The paper's names for the six matrices of a Transformer block (§3.2, Fig. 3), by module path.
PAPER_NAMES = {
    "attention.self.query": "W_q", "attention.self.key": "W_k", "attention.self.value": "W_v",
    "attention.self.query_proj": "W_q", "attention.self.key_proj": "W_k", "attention.self.value_proj": "W_v",
    "attention.output.dense": "W_o", "intermediate.dense": "W_f1", "output.dense": "W_f2",
    "self_attn.q_proj": "W_q", "self_attn.k_proj": "W_k", "self_attn.v_proj": "W_v", "self_attn.o_proj": "W_o",
    "mlp.gate_proj": "W_gate", "mlp.up_proj": "W_f1", "mlp.down_proj": "W_f2",
}
_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.(.+)$")
_PEFT_SUFFIX = re.compile(r"\.lora_E(\.[^.]+)?$")


def layer_name_from_peft(key: str) -> str:
    """``...query.lora_E.default`` (a ``rank_pattern`` key) -> ``...query``."""
    name = _PEFT_SUFFIX.sub("", key)
    return name.removeprefix("base_model.model.")


def ranks_from_peft(rank_pattern: dict[str, list[bool]] | None) -> dict[str, int]:
    """PEFT's ``config.rank_pattern`` -> ``{layer name: rank}``.

    ``rank_pattern`` is ``None`` until the first allocation: the telltale sign that
    ``update_and_allocate`` was never called.
    """
    if rank_pattern is None:
        raise ValueError("rank_pattern is None: PEFT has not allocated yet. Call "
                         "model.base_model.update_and_allocate(global_step) after every optimizer.step() "
                         "(with HF Trainer: companion.adalora.AdaLoraCallback)")
    return {layer_name_from_peft(k): int(sum(bool(b) for b in v)) for k, v in rank_pattern.items()}


@torch.no_grad()
def copy_adapter_weights_from_peft(model: nn.Module, peft_model: nn.Module, adapter_name: str = "default",
                                   *, probe_rows: int = 4, rtol: float = 1e-5) -> None:
    """Copy PEFT's ``lora_A``, ``lora_B``, ``lora_E`` into the companion layers of the same name.

    Use it to start both implementations from identical adapters: PEFT draws ``randn`` for A, E
    and B and then redraws A and B, so seeding alone does not give equal weights.

    Equal tensors do not make equal layers (``lora_alpha``, ``init_r`` or the base weights may differ),
    so the copy is verified on the result: ``probe_rows`` random rows go through each pair of layers
    (dropout off), and an output difference above ``rtol`` times the largest output raises
    ``ValueError`` naming the layer. A shape mismatch (different ``init_r``) is refused before copying.
    """
    peft_params, peft_modules = dict(peft_model.named_parameters()), dict(peft_model.named_modules())
    layers, copies, peft_layers = adalora_layers(model), [], {}
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B", "lora_E"):
            key = next((k for k in (f"base_model.model.{name}.{part}.{adapter_name}", f"{name}.{part}.{adapter_name}")
                        if k in peft_params), None)
            if key is None:
                raise ValueError(f"PEFT model has no {part} for layer {name!r} (adapter {adapter_name!r}); were "
                                 "both models built with the same target_modules?")
            ours, theirs = getattr(layer, part), peft_params[key]
            if ours.shape != theirs.shape:
                raise ValueError(f"{name}.{part}: companion shape {tuple(ours.shape)}, PEFT {tuple(theirs.shape)}; "
                                 "build both with the same init_r")
            copies.append((ours, theirs))
        peft_layers[name] = peft_modules.get(f"base_model.model.{name}", peft_modules.get(name))
    with torch.no_grad():
        for ours, theirs in copies:
            ours.copy_(theirs)
    _check_same_outputs(layers, peft_layers, probe_rows, rtol)


@torch.no_grad()
def _check_same_outputs(ours: dict[str, nn.Module], theirs: dict[str, nn.Module], rows: int, rtol: float) -> None:
    generator = torch.Generator().manual_seed(0)
    for name, layer in ours.items():
        other = theirs[name]
        modes = layer.training, other.training
        layer.eval(), other.eval()
        try:
            weight = layer.lora_A
            x = torch.randn(rows, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
            a, b = layer(x).float(), other(x).float()
        finally:
            layer.train(modes[0]), other.train(modes[1])
        diff, allowed = (a - b).abs().max(), rtol * b.abs().max().clamp_min(1e-30)
        if not diff <= allowed:
            raise ValueError(f"after copying, layer {name!r} computes outputs {float(diff):.3g} away from PEFT's "
                             f"(allowed {float(allowed):.3g}): the tensors are equal but the layers are not; check "
                             "lora_alpha and the base weights of both models")


def freeze_ranknum(model: nn.Module) -> int:
    """Set ``requires_grad=False`` on every PEFT AdaLoRA ``ranknum``; return how many were trainable.

    ``ranknum`` holds r0 (``init_r``) of the constant output scale alpha / r0 (Chapter 2) and must
    never train. PEFT 0.21.2 creates it frozen in ``AdaLoraLayer.update_layer`` and then calls
    ``_move_adapter_to_device_of_base_layer``, which stores ``ranknum.to(device, dtype)`` back in its
    ``nn.ParameterDict`` whenever the base layer's device *or* dtype differs from the fresh float32
    CPU tensor: a bf16/fp16/fp64 base, a 4-bit base whose ``compute_dtype`` is not float32, a base
    on a GPU (or on ``meta``), even in float32. ``Tensor.to`` then returns a plain tensor and
    ``ParameterDict`` re-wraps it as an ``nn.Parameter`` with ``requires_grad=True``, so every
    optimizer built from the trainable parameters (``Trainer``'s included) trains the scale. A
    float32 base on the CPU, including a 4-bit base with float32 compute, is not moved and keeps it
    frozen; a later ``model.to(...)`` keeps whatever ``requires_grad`` it has.

    Call it after ``get_peft_model`` and before building the optimizer (``Trainer`` builds its own
    in ``train()``). Returns 0 when nothing was trainable. Raises ``ValueError`` when ``model`` has no
    PEFT AdaLoRA layer at all (the companion's ``SVDLinear`` keeps ``ranknum`` as a buffer).
    """
    from peft.tuners.adalora import AdaLoraLayer

    ranknums = [p for m in model.modules() if isinstance(m, AdaLoraLayer) for p in m.ranknum.values()]
    if not ranknums:
        raise ValueError("freeze_ranknum(model): model has no PEFT AdaLoRA layer, so there is no ranknum to "
                         "freeze; pass the model returned by peft.get_peft_model(..., AdaLoraConfig(...)) "
                         "(the companion's SVDLinear keeps ranknum as a buffer, which never trains)")
    trainable = [p for p in ranknums if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    return len(trainable)


def paper_position(name: str) -> tuple[int, str]:
    """``bert.encoder.layer.3.attention.self.query`` -> ``(3, "W_q")``; unknown modules keep their path."""
    match = _LAYER.search(name)
    if match is None:
        raise ValueError(f"cannot find a layer index in {name!r}; expected '...layer.<i>.<module>'")
    return int(match.group(1)), PAPER_NAMES.get(match.group(2), match.group(2))


def rank_grid(ranks: dict[str, int]) -> pd.DataFrame:
    """Ranks as a (layer x matrix) table, the layout of the paper's Fig. 3."""
    rows = [(*paper_position(name), rank) for name, rank in ranks.items()]
    grid = pd.DataFrame(rows, columns=["layer", "matrix", "rank"]).pivot(index="layer", columns="matrix",
                                                                           values="rank")
    order = [m for m in dict.fromkeys(PAPER_NAMES.values()) if m in grid.columns]
    return grid[order + [c for c in grid.columns if c not in order]]

