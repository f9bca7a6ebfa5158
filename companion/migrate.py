"""Two-stage fine-tuning done right: turn a trained (Q)LoRA adapter into an AdaLoRA adapter.

The two-stage recipe (train LoRA or QLoRA first, then let AdaLoRA redistribute the rank) needs the
LoRA update carried over. Loading the state dict does not do it: PEFT stores LoRA's factors as
``...query.lora_A.default.weight`` (an ``nn.Linear``, shape (r, in)) and AdaLoRA's as
``...query.lora_A.default`` (a bare ``Parameter``, shape (init_r, in)) next to ``lora_E``, so
``adalora_model.load_state_dict(lora_model.state_dict(), strict=False)`` matches no adapter key and
reports them all as unexpected/missing. :func:`seed_transfer` runs that call and counts what it did.

:func:`lora_to_adalora` moves the update itself. For each layer, PEFT's LoRA update
(``peft.tuners.lora.layer.Linear.get_delta_weight``) is ``Delta = s_lora * B A`` with
``s_lora = lora_alpha / r``, and PEFT's AdaLoRA update (``peft.tuners.adalora.layer.SVDLinear``) is
``Delta = P (Q * Lambda) * alpha / (ranknum + 1e-5)``, where ``P = lora_B`` (out, init_r),
``Q = lora_A`` (init_r, in), ``Lambda = lora_E`` (init_r, 1), AdaLoRA's ``scaling`` is ``lora_alpha``
itself (not divided by r) and ``ranknum`` stays ``init_r`` for the whole run. With the SVD
``Delta = U S V^T`` (computed in float64), setting

    P = U[:, :init_r],   Q = V^T[:init_r],   Lambda = S[:init_r] * (ranknum + 1e-5) / lora_alpha

gives the same ``Delta`` (AdaLoRA paper, Zhang et al. 2023, Eq. 3). ``Delta`` is formed in float64 from
PEFT's factors and has rank <= r, so the triplets beyond r get singular values that are zero up to
float64 rounding (~1e-16) and orthonormal vectors. That is the right start for AdaLoRA's extra ranks:
they change nothing, the orthogonality regulariser's value (Eq. 4) is already ~0, and since
``lambda_i ~ 0`` the task loss gives their ``P`` column and ``Q`` row (numerically) zero gradient, so
their sensitivity and score (Eq. 9-13) are the smallest and the allocator prunes them first.

One PEFT detail breaks that last step. PEFT's regulariser is the *plain* Frobenius norm
``||Q Q^T - I||_F``, whose gradient at an orthonormal point is a unit-size matrix in an arbitrary
direction (the norm has a kink at 0). With ``orth_reg_weight > 0`` every ``P`` and ``Q`` then gets a
gradient of size ~``orth_reg_weight / (2n)`` whatever the task says; on a model whose task gradients
are smaller than that, this noise decides the ranking and migrated triplets can be pruned
(tests/test_migrate.py checks that gradient, and the kept ranks with ``orth_reg_weight=0``). Use a
small ``orth_reg_weight`` while ranks are allocated (0 keeps exactly the migrated triplets) and check
``config.rank_pattern`` when the migrated directions must survive.

Caveats. After migration AdaLoRA's importance scores start from zero: keep ``tinit`` warm-up steps
before the first pruning (paper §3.3) so they are averaged over real gradients. The learning rate of
the second stage is a choice to tune; the paper does not prescribe one for this workflow. The bases
must be the same weights (a fresh copy of the model the LoRA was trained on, in the same precision);
only shapes can be checked here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from peft.tuners.adalora import AdaLoraLayer, AdaLoraModel
from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils.other import ModulesToSaveWrapper
from torch import nn


@dataclass(frozen=True)
class TransferReport:
    """What ``adalora_model.load_state_dict(lora_model.state_dict(), strict=False)`` did."""

    lora_adapter_tensors: int  # lora_A / lora_B tensors in the LoRA state dict
    adapter_tensors_loaded: int  # of those, how many found a key in the AdaLoRA model
    other_tensors_loaded: int  # base weights and modules_to_save whose names happen to match
    unexpected_keys: tuple[str, ...]
    missing_adapter_keys: tuple[str, ...]  # AdaLoRA lora_A/B/E and ranknum keys left untouched

    def __str__(self) -> str:
        return (f"LoRA adapter tensors: {self.lora_adapter_tensors}, loaded: {self.adapter_tensors_loaded}; "
                f"other tensors loaded: {self.other_tensors_loaded}; unexpected keys: {len(self.unexpected_keys)} "
                f"(e.g. {list(self.unexpected_keys[:2])}); AdaLoRA adapter keys missing: "
                f"{len(self.missing_adapter_keys)} (e.g. {list(self.missing_adapter_keys[:2])})")


def _is_adapter_key(key: str) -> bool:
    return any(f".{part}." in key for part in ("lora_A", "lora_B", "lora_E", "ranknum"))


def seed_transfer(lora_model: nn.Module, adalora_model: nn.Module) -> TransferReport:
    """The source tutorial's transfer, exactly: ``load_state_dict(lora_state, strict=False)``, and its count."""
    state = lora_model.state_dict()
    result = adalora_model.load_state_dict(state, strict=False)
    unexpected = set(result.unexpected_keys)
    adapter_keys = [k for k in state if _is_adapter_key(k)]
    return TransferReport(
        lora_adapter_tensors=len(adapter_keys),
        adapter_tensors_loaded=sum(k not in unexpected for k in adapter_keys),
        other_tensors_loaded=sum(k not in unexpected for k in state if not _is_adapter_key(k)),
        unexpected_keys=tuple(result.unexpected_keys),
        missing_adapter_keys=tuple(k for k in result.missing_keys if _is_adapter_key(k)))


def lora_delta_weight(layer, adapter_name: str = "default") -> torch.Tensor:
    """``s_lora * B A``, shape (out, in), in the adapter dtype: PEFT ``lora.Linear.get_delta_weight`` (no transpose)."""
    # (out, r) @ (r, in) -> (out, in)
    return layer.lora_B[adapter_name].weight @ layer.lora_A[adapter_name].weight * layer.scaling[adapter_name]


def adalora_delta_weight(layer, adapter_name: str = "default") -> torch.Tensor:
    """``P (Q * Lambda) * alpha / (ranknum + 1e-5)``, shape (out, in): PEFT ``SVDLinear.get_delta_weight``
    (no transpose), also for ``SVDLinear4bit``, which has no such method."""
    # (out, init_r) @ ((init_r, in) * (init_r, 1)) -> (out, in)
    return (layer.lora_B[adapter_name] @ (layer.lora_A[adapter_name] * layer.lora_E[adapter_name])
            * layer.scaling[adapter_name] / (layer.ranknum[adapter_name] + 1e-5))


def _layers(model: nn.Module, layer_type, adapter_name: str, exclude=None) -> dict[str, nn.Module]:
    """Adapter layers holding ``adapter_name``, by module name relative to the wrapped model."""
    inner = model.base_model.model
    return {name: m for name, m in inner.named_modules()
            if isinstance(m, layer_type) and not (exclude and isinstance(m, exclude)) and adapter_name in m.lora_A}


def _check_models(lora_model, adalora_model, adapter_name):
    if not isinstance(getattr(adalora_model, "base_model", None), AdaLoraModel):
        raise ValueError(f"adalora_model must be a PEFT AdaLoRA model, got {type(adalora_model).__name__}; build it "
                         "with peft.get_peft_model(fresh_base, AdaLoraConfig(init_r=..., target_modules=..., "
                         "total_step=...)) on a fresh copy of the LoRA model's base")
    base = getattr(lora_model, "base_model", None)
    if not isinstance(base, LoraModel) or isinstance(base, AdaLoraModel):
        raise ValueError(f"lora_model must be a PEFT LoRA model (get_peft_model(base, LoraConfig(...))), got "
                         f"{type(lora_model).__name__} wrapping {type(base).__name__}")
    lora = _layers(lora_model, LoraLayer, adapter_name, exclude=AdaLoraLayer)
    ada = _layers(adalora_model, AdaLoraLayer, adapter_name)
    if not lora:
        raise ValueError(f"the LoRA model has no layer with adapter {adapter_name!r}; pass adapter_name=...")
    only_lora, only_ada = sorted(set(lora) - set(ada)), sorted(set(ada) - set(lora))
    if only_lora or only_ada:
        raise ValueError(f"LoRA and AdaLoRA adapt different layers: only in LoRA {only_lora}, only in AdaLoRA "
                         f"{only_ada}; build AdaLoraConfig with the LoRA config's target_modules")
    return lora, ada


def _check_layer(name: str, lora_layer, ada_layer, adapter_name: str) -> None:
    """Every reason a layer cannot be migrated, checked for all layers before any is changed."""
    if not isinstance(lora_layer.lora_A[adapter_name], nn.Linear):
        raise ValueError(f"layer {name!r}: only linear LoRA layers can be migrated, got "
                         f"{type(lora_layer).__name__}")
    if lora_layer.use_dora.get(adapter_name) or lora_layer.merged:
        raise ValueError(f"layer {name!r}: the LoRA update is not B A (DoRA) or is merged into the base; "
                         "use a plain, unmerged LoRA adapter")
    r, init_r = lora_layer.r[adapter_name], ada_layer.r[adapter_name]
    lora_shape = (lora_layer.lora_B[adapter_name].out_features, lora_layer.lora_A[adapter_name].in_features)
    ada_shape = (ada_layer.lora_B[adapter_name].shape[0], ada_layer.lora_A[adapter_name].shape[1])
    fan_in_fan_out = (getattr(lora_layer, "fan_in_fan_out", False), getattr(ada_layer, "fan_in_fan_out", False))
    if lora_shape != ada_shape or fan_in_fan_out[0] != fan_in_fan_out[1]:
        raise ValueError(f"layer {name!r}: the LoRA update has shape {lora_shape} but AdaLoRA's is {ada_shape} "
                         "(or fan_in_fan_out differs); build both models on the same base model")
    if init_r < r:
        raise ValueError(f"layer {name!r}: AdaLoRA init_r={init_r} is smaller than the LoRA r={r}, so the update "
                         "cannot be carried over; set init_r >= r")
    if init_r > min(ada_shape):
        raise ValueError(f"layer {name!r}: init_r={init_r} exceeds min(out, in)={min(ada_shape)}, so there are "
                         "not enough orthonormal singular vectors; set init_r <= min(out, in)")


@torch.no_grad()
def _migrate_layer(name: str, lora_layer, ada_layer, adapter_name: str) -> dict:
    r, init_r = lora_layer.r[adapter_name], ada_layer.r[adapter_name]
    # Delta = s_lora * B A in float64 from PEFT's factors: exactly rank <= r, so the extra singular values
    # are ~1e-16 rather than float32 rounding noise. (out, r) @ (r, in) -> (out, in)
    B, A = lora_layer.lora_B[adapter_name].weight.double(), lora_layer.lora_A[adapter_name].weight.double()
    delta = float(lora_layer.scaling[adapter_name]) * B @ A
    lora_A, lora_B, lora_E = (ada_layer.lora_A[adapter_name], ada_layer.lora_B[adapter_name],
                              ada_layer.lora_E[adapter_name])
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in)
    # PEFT's forward divides by (ranknum + 1e-5) in the adapter dtype: use that exact number.
    denom = float((ada_layer.ranknum[adapter_name] + 1e-5).item())
    scaling = float(ada_layer.scaling[adapter_name])
    lora_B.copy_(U[:, :init_r])  # P: (out, init_r)
    lora_A.copy_(Vh[:init_r])  # Q: (init_r, in)
    lora_E.copy_((S[:init_r] * denom / scaling)[:, None])  # Lambda: (init_r, 1)
    return {"name": name, "kind": "lora", "lora r": r, "init_r": init_r,
            "rank of delta": int(torch.linalg.matrix_rank(delta)),
            "max abs diff": float((lora_delta_weight(lora_layer, adapter_name).double()
                                   - adalora_delta_weight(ada_layer, adapter_name).double()).abs().max())}


def _modules_to_save_pairs(lora_model, adalora_model, adapter_name: str) -> dict[str, tuple[nn.Module, nn.Module]]:
    """``{name: (LoRA's trained copy, AdaLoRA's copy)}`` for every ``modules_to_save`` of the LoRA model."""
    lora = {n: m for n, m in lora_model.base_model.model.named_modules()
            if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save}
    ada = {n: m for n, m in adalora_model.base_model.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    pairs = {}
    for name, module in lora.items():
        if name not in ada or adapter_name not in ada[name].modules_to_save:
            leaf = name.rsplit(".", 1)[-1]
            raise ValueError(f"the LoRA model trains {name!r} (modules_to_save) but the AdaLoRA model does not; "
                             f"add modules_to_save=[{leaf!r}] or the same task_type to AdaLoraConfig")
        pairs[name] = (module.modules_to_save[adapter_name], ada[name].modules_to_save[adapter_name])
    return pairs


@torch.no_grad()
def _copy_module(name: str, source: nn.Module, target: nn.Module) -> dict:
    target.load_state_dict(source.state_dict())
    diff = max((float((a - b).abs().max()) for a, b in zip(source.state_dict().values(),
                                                            target.state_dict().values())), default=0.0)
    return {"name": name, "kind": "modules_to_save", "lora r": None, "init_r": None,
            "rank of delta": None, "max abs diff": diff}


def lora_to_adalora(lora_model: nn.Module, adalora_model: nn.Module, adapter_name: str = "default") -> pd.DataFrame:
    """Set every AdaLoRA layer of ``adalora_model`` so that its update equals the LoRA update (module docstring).

    ``lora_model``: a PEFT LoRA model on a 16/32-bit or bitsandbytes 4-bit base. ``adalora_model``: a PEFT
    AdaLoRA model on a fresh copy of the same base, same target modules, ``init_r >= r``. Trained
    ``modules_to_save`` (e.g. a classifier head) are copied too. Modifies ``adalora_model`` in place and
    returns one row per layer: name, kind (``lora`` or ``modules_to_save``), LoRA r, init_r, numerical rank
    of the LoRA update, and max |Delta_lora - Delta_adalora| (float64).
    """
    lora, ada = _check_models(lora_model, adalora_model, adapter_name)
    for name, layer in lora.items():
        _check_layer(name, layer, ada[name], adapter_name)
    heads = _modules_to_save_pairs(lora_model, adalora_model, adapter_name)
    rows = [_migrate_layer(name, layer, ada[name], adapter_name) for name, layer in lora.items()]
    rows += [_copy_module(name, *pair) for name, pair in heads.items()]
    table = pd.DataFrame(rows)
    return table.astype({"lora r": "Int64", "init_r": "Int64", "rank of delta": "Int64"})
