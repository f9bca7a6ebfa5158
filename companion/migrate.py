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

What is verified: the *outputs*, not the updates (a dropped ``lora_B`` bias or a base rewritten by PiSSA
leaves the updates equal to 1e-7 and the outputs apart by O(1)). Features the AdaLoRA layer cannot hold
are refused by name and the two bases are compared tensor by tensor before anything changes; afterwards
every adapted layer of both models runs on the same random rows of its ``in_features`` (and both whole
models on ``inputs``, if given), and a difference above the tolerance restores the AdaLoRA model and raises.

Caveats. After migration AdaLoRA's importance scores start from zero: keep ``tinit`` warm-up steps
before the first pruning (paper §3.3) so they are averaged over real gradients. The learning rate of
the second stage is a choice to tune; the paper does not prescribe one for this workflow.
``lora_dropout`` is not part of the update: it acts only in training (a warning says when the two
configs differ).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import pandas as pd
import torch
from peft.tuners.adalora import AdaLoraLayer, AdaLoraModel
from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper
from torch import nn

MIGRATABLE = ("Linear", "Linear4bit")  # peft.tuners.lora layer classes whose update is s * B A, (out, in)
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")  # init_lora_weights that change the base weights
PROBE_ROWS = 8  # random inputs per adapted layer


def default_tolerance(dtype: torch.dtype) -> float:
    """Allowed max |difference| of outputs, relative to max |LoRA output|: 1e-4 in float32, 4 ulps in 16 bit
    (both models round the same float32 sum to bf16/fp16 once, in a different order)."""
    return max(1e-4, 4 * torch.finfo(dtype).eps)


@dataclass(frozen=True)
class TransferReport:
    """What ``adalora_model.load_state_dict(lora_model.state_dict(), strict=False)`` did."""

    lora_adapter_tensors: int  # lora_A / lora_B tensors in the LoRA state dict
    adapter_tensors_loaded: int  # of those, how many found a key in the AdaLoRA model
    other_tensors_loaded: int  # base weights and modules_to_save whose names happen to match
    unexpected_keys: tuple[str, ...]
    missing_adapter_keys: tuple[str, ...]  # AdaLoRA lora_A/B/E and ranknum keys left untouched
    max_layer_output_diff: float = float("nan")  # the result: max |LoRA layer(x) - AdaLoRA layer(x)| after the load

    def __str__(self) -> str:
        return (f"LoRA adapter tensors: {self.lora_adapter_tensors}, loaded: {self.adapter_tensors_loaded}; "
                f"other tensors loaded: {self.other_tensors_loaded}; unexpected keys: {len(self.unexpected_keys)} "
                f"(e.g. {list(self.unexpected_keys[:2])}); AdaLoRA adapter keys missing: "
                f"{len(self.missing_adapter_keys)} (e.g. {list(self.missing_adapter_keys[:2])}); "
                f"adapted layers' outputs still differ by up to {self.max_layer_output_diff:.3g}")


def _is_adapter_key(key: str) -> bool:
    return any(f".{part}." in key for part in ("lora_A", "lora_B", "lora_E", "ranknum"))


def seed_transfer(lora_model: nn.Module, adalora_model: nn.Module, adapter_name: str = "default") -> TransferReport:
    """The source tutorial's transfer, exactly: ``load_state_dict(lora_state, strict=False)``; counts what it
    loaded and measures what matters, how far the adapted layers' outputs still are apart afterwards."""
    state = lora_model.state_dict()
    result = adalora_model.load_state_dict(state, strict=False)
    unexpected = set(result.unexpected_keys)
    adapter_keys = [k for k in state if _is_adapter_key(k)]
    lora = _layers(lora_model, LoraLayer, adapter_name, exclude=AdaLoraLayer)
    ada = _layers(adalora_model, AdaLoraLayer, adapter_name)
    with _probing(lora_model, adalora_model):
        diffs = [_layer_probe(lora[n], ada[n])[0] for n in lora if n in ada and _migratable(lora[n])]
    return TransferReport(
        lora_adapter_tensors=len(adapter_keys),
        adapter_tensors_loaded=sum(k not in unexpected for k in adapter_keys),
        other_tensors_loaded=sum(k not in unexpected for k in state if not _is_adapter_key(k)),
        unexpected_keys=tuple(result.unexpected_keys),
        missing_adapter_keys=tuple(k for k in result.missing_keys if _is_adapter_key(k)),
        max_layer_output_diff=max(diffs, default=float("nan")))


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
    """Adapter layers of any kind (Linear, Embedding, Conv, ...) holding ``adapter_name``, by module name
    relative to the wrapped model."""
    inner = model.base_model.model
    return {name: m for name, m in inner.named_modules()
            if isinstance(m, layer_type) and not (exclude and isinstance(m, exclude)) and adapter_name in m.r}


def _migratable(layer) -> bool:
    return type(layer).__name__ in MIGRATABLE and type(layer).__module__.startswith("peft.tuners.lora")


def _check_models(lora_model, adalora_model, adapter_name):
    if not isinstance(getattr(adalora_model, "base_model", None), AdaLoraModel):
        raise ValueError(f"adalora_model must be a PEFT AdaLoRA model, got {type(adalora_model).__name__}; build it "
                         "with peft.get_peft_model(fresh_base, AdaLoraConfig(init_r=..., target_modules=..., "
                         "total_step=...)) on a fresh copy of the LoRA model's base")
    base = getattr(lora_model, "base_model", None)
    if not isinstance(base, LoraModel) or isinstance(base, AdaLoraModel):
        raise ValueError(f"lora_model must be a PEFT LoRA model (get_peft_model(base, LoraConfig(...))), got "
                         f"{type(lora_model).__name__} wrapping {type(base).__name__}")
    for role, model in (("LoRA", lora_model), ("AdaLoRA", adalora_model)):
        names, active = sorted(model.peft_config), list(model.active_adapters)
        if adapter_name not in names or active != [adapter_name]:
            raise ValueError(f"the {role} model holds adapters {names} with {active} active, but adapter_name="
                             f"{adapter_name!r}: the migration carries one adapter, which must be the active one in "
                             "both models; pass adapter_name=..., call model.set_adapter(name), or build the AdaLoRA "
                             "model with get_peft_model(..., adapter_name=name)")
    lora = _layers(lora_model, LoraLayer, adapter_name, exclude=AdaLoraLayer)
    ada = _layers(adalora_model, AdaLoraLayer, adapter_name)
    if not lora:
        raise ValueError(f"the LoRA model has no layer with adapter {adapter_name!r}; pass adapter_name=...")
    for name, layer in lora.items():
        if not _migratable(layer):
            raise ValueError(f"layer {name!r}: LoRA layer type lora.{type(layer).__name__} is not handled; only Linear "
                             "layers (16/32-bit, transformers' Conv1D, bitsandbytes 4-bit) can be migrated, not "
                             "Embedding, Conv or MultiheadAttention layers or target_parameters: leave them out of "
                             "the LoRA's target_modules")
    only_lora, only_ada = sorted(set(lora) - set(ada)), sorted(set(ada) - set(lora))
    if only_lora or only_ada:
        raise ValueError(f"LoRA and AdaLoRA adapt different layers: only in LoRA {only_lora}, only in AdaLoRA "
                         f"{only_ada}; build AdaLoraConfig with the LoRA config's target_modules")
    tokens = [n for n, m in lora_model.base_model.model.named_modules() if isinstance(m, TrainableTokensWrapper)]
    if tokens:
        raise ValueError(f"the LoRA model trains embedding rows of {tokens} (trainable_token_indices); AdaLoRA has "
                         "no place for them, so they would be lost: train the LoRA without trainable_token_indices")
    return lora, ada


def _check_layer(name: str, lora_layer, ada_layer, adapter_name: str) -> None:
    """Every reason a layer cannot be migrated, checked for all layers before any is changed."""
    if adapter_name in lora_layer.lora_variant:
        variant = type(lora_layer.lora_variant[adapter_name]).__name__
        raise ValueError(f"layer {name!r}: the LoRA adapter is a variant ({variant}, e.g. use_dora=True), whose "
                         "output is not W x + s B A x; AdaLoRA has no such variant: migrate a plain LoRA adapter")
    if lora_layer.lora_bias.get(adapter_name):
        raise ValueError(f"layer {name!r}: lora_bias=True gives lora_B a trained bias, added to the output; AdaLoRA's "
                         "update P Lambda Q has no bias, so it would be lost: train the LoRA with lora_bias=False")
    if lora_layer.merged or ada_layer.merged:
        raise ValueError(f"layer {name!r}: an adapter is merged into its base weights; unmerge it "
                         "(model.unmerge_adapter()) before migrating")
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


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base's tensors (PEFT's wrappers' ``base_layer`` / ``original_module`` named away), no adapter."""
    names = set(model.peft_config)
    skip = {"base_layer", "original_module"}
    return {".".join(p for p in key.split(".") if p not in skip): t
            for key, t in model.base_model.model.state_dict().items() if not names & set(key.split("."))}


def _check_same_base(lora_model, adalora_model, adapter_name: str) -> None:
    """The AdaLoRA update only reproduces the LoRA model if both add it to the same weights."""
    lora, ada = _base_state(lora_model), _base_state(adalora_model)
    if lora.keys() != ada.keys():
        raise ValueError(f"the base models differ: tensors only in LoRA {sorted(lora.keys() - ada.keys())[:3]}, only "
                         f"in AdaLoRA {sorted(ada.keys() - lora.keys())[:3]}; build both on the same base model")
    differ = {}
    for key, t in lora.items():
        other = ada[key].to(t.device)
        if t.dtype != other.dtype and t.is_floating_point() and other.is_floating_point():
            # bitsandbytes casts a 4-bit layer's bias to the input dtype on its first forward: compare the values
            low = min(t.dtype, other.dtype, key=lambda d: torch.finfo(d).bits)
            t, other = t.to(low), other.to(low)
        if t.shape != other.shape or t.dtype != other.dtype:
            raise ValueError(f"base tensor {key!r} is {t.dtype} {tuple(t.shape)} in LoRA but {other.dtype} "
                             f"{tuple(other.shape)} in AdaLoRA; load both bases with the same precision and config")
        if not torch.equal(t, other):
            differ[key] = float((t.double() - other.double()).abs().max())
    if differ:
        config = lora_model.peft_config[adapter_name]
        init = str(config.init_lora_weights)
        why = (f"init_lora_weights={config.init_lora_weights!r} rewrote the LoRA model's base weights (e.g. PiSSA "
               "stores W - s B A)" if init.startswith(BASE_REWRITING_INITS) else
               f"bias={config.bias!r} trained the LoRA model's base biases" if config.bias != "none" else
               "the models were built on different weights")
        shown = ", ".join(f"{k} by {d:.3g}" for k, d in list(differ.items())[:3])
        raise ValueError(f"the base weights differ in {len(differ)} tensor(s) ({shown}): {why}. The AdaLoRA update "
                         "is added to its own base, so the outputs would differ; build the AdaLoRA model on the LoRA "
                         "model's base as it is now: get_peft_model(copy.deepcopy(lora_model).unload(), "
                         "AdaLoraConfig(...))")


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
    """``{name: (LoRA's wrapper, AdaLoRA's wrapper)}`` for every ``modules_to_save`` of the LoRA model."""
    lora = {n: m for n, m in lora_model.base_model.model.named_modules()
            if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save}
    ada = {n: m for n, m in adalora_model.base_model.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    for name in lora:
        if name not in ada or adapter_name not in ada[name].modules_to_save:
            leaf = name.rsplit(".", 1)[-1]
            raise ValueError(f"the LoRA model trains {name!r} (modules_to_save) but the AdaLoRA model does not; "
                             f"add modules_to_save=[{leaf!r}] or the same task_type to AdaLoraConfig")
    return {name: (module, ada[name]) for name, module in lora.items()}


@torch.no_grad()
def _copy_module(name: str, source: nn.Module, target: nn.Module, adapter_name: str) -> dict:
    source, target = source.modules_to_save[adapter_name], target.modules_to_save[adapter_name]
    target.load_state_dict(source.state_dict())
    diff = max((float((a - b).abs().max()) for a, b in zip(source.state_dict().values(),
                                                            target.state_dict().values())), default=0.0)
    return {"name": name, "kind": "modules_to_save", "lora r": None, "init_r": None,
            "rank of delta": None, "max abs diff": diff}


@contextlib.contextmanager
def _probing(*models: nn.Module):
    """Eval mode (no dropout) and bitsandbytes' CPU repacking off for the probes; both restored afterwards
    (bitsandbytes would otherwise rewrite a 4-bit weight in place on its first eval forward on some CPUs)."""
    modules = [m for model in models for m in model.modules()]
    saved = [(m.training, getattr(m, "support_avx512bf16_for_cpu", None)) for m in modules]
    for m in modules:
        m.training = False
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    try:
        with torch.no_grad():
            yield
    finally:
        for m, (training, repack) in zip(modules, saved):
            m.training = training
            if repack is not None:
                m.support_avx512bf16_for_cpu = repack


def _compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, torch.dtype]:
    """(max |a - b|, max |a|, the coarser dtype of the two), in float64."""
    dtype = max(a.dtype, b.dtype, key=lambda d: torch.finfo(d).eps)
    return float((a.double() - b.double()).abs().max()), float(a.double().abs().max()), dtype


def _probe_input(layer: nn.Module, in_features: int) -> torch.Tensor:
    """PROBE_ROWS standard normal rows (seed 0), in the dtype and on the device the layer computes with."""
    weight = layer.weight
    dtype = getattr(layer, "compute_dtype", None) or weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32  # 4-bit storage: float32 inputs
    return torch.randn(PROBE_ROWS, in_features, generator=torch.Generator().manual_seed(0)).to(weight.device, dtype)


def _layer_probe(lora_layer, ada_layer, module: str | None = None):
    """Both layers (or, with ``module`` an adapter name, both modules_to_save wrappers) on the same random rows."""
    if module is not None:
        a, b = lora_layer.modules_to_save[module], ada_layer.modules_to_save[module]
        return _compare(lora_layer(_probe_input(a, a.in_features)), ada_layer(_probe_input(b, b.in_features)))
    a, b = lora_layer.get_base_layer(), ada_layer.get_base_layer()
    return _compare(lora_layer(_probe_input(a, lora_layer.in_features)), ada_layer(_probe_input(b, ada_layer.in_features)))


def _model_output(model: nn.Module, inputs) -> torch.Tensor:
    try:
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"the model cannot run on inputs ({type(err).__name__}: {str(err)[:200]}); pass inputs as "
                         "its forward takes them: a dict of keyword arguments ({'input_ids': ...}) or one tensor") from err
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    first = logits if logits is not None else out[0] if isinstance(out, (tuple, list)) else None
    if not isinstance(first, torch.Tensor):
        raise ValueError(f"cannot read a tensor from the model output {type(out).__name__}; pass inputs whose forward "
                         "returns a tensor, a tuple or an output with .logits")
    return first


def _verify(rows, lora, ada, heads, lora_model, adalora_model, adapter_name, inputs, tolerance):
    """Output differences, per layer and (with ``inputs``) of the whole models, into ``rows``; names those over."""
    probes = {row["name"]: row for row in rows}
    with _probing(lora_model, adalora_model):
        results = {name: _layer_probe(lora[name], ada[name]) for name in lora}
        results |= {name: _layer_probe(*pair, module=adapter_name) for name, pair in heads.items()
                    if isinstance(pair[0].modules_to_save[adapter_name], nn.Linear)}
        if inputs is not None:
            rows.append(probes.setdefault("model outputs", {"name": "model outputs", "kind": "model"}))
            results["model outputs"] = _compare(_model_output(lora_model, inputs), _model_output(adalora_model, inputs))
    over = []
    for name, (diff, scale, dtype) in results.items():
        allowed = (tolerance if tolerance is not None else default_tolerance(dtype)) * max(scale, 1e-12)
        probes[name] |= {"max abs output diff": diff, "allowed output diff": allowed}
        if not diff <= allowed:
            over.append(f"{name} by {diff:.3g} (allowed {allowed:.3g})")
    return over


def lora_to_adalora(lora_model: nn.Module, adalora_model: nn.Module, adapter_name: str = "default", *,
                    inputs=None, tolerance: float | None = None) -> pd.DataFrame:
    """Set every AdaLoRA layer of ``adalora_model`` so that it computes what the LoRA layer computes
    (module docstring), and verify that on the outputs.

    ``lora_model``: a PEFT LoRA model on a 16/32-bit or bitsandbytes 4-bit base. ``adalora_model``: a PEFT
    AdaLoRA model on the same base weights, same target modules, ``init_r >= r``. Trained ``modules_to_save``
    (e.g. a classifier head) are copied too. ``inputs``: optional model inputs (a dict of forward kwargs or
    a tensor) on which the two whole models' outputs (``.logits`` or the first output) are compared as well.
    ``tolerance``: allowed max |output difference| relative to max |LoRA output|; default
    :func:`default_tolerance` of the output dtype (1e-4 in float32).

    Refused with a ValueError before anything changes: another active or missing adapter; layers adapted in
    one model only; LoRA layers other than Linear (Embedding, Conv, MultiheadAttention, target_parameters);
    LoRA variants (DoRA, ...); ``lora_bias=True``; merged adapters; ``trainable_token_indices``; a trained
    ``modules_to_save`` the AdaLoRA model does not have; shapes, ``fan_in_fan_out`` or ranks that do not fit;
    base weights that differ (PiSSA/OLoRA/CorDA/LoftQ initialisation, ``bias="all"``, another checkpoint or
    precision). ``use_rslora``, ``rank_pattern`` and ``alpha_pattern`` are carried (the update includes the
    scaling). If an output still differs by more than the tolerance, ``adalora_model`` is restored and a
    ValueError names the layers.

    Modifies ``adalora_model`` in place and returns one row per layer: name, kind (``lora``,
    ``modules_to_save`` or ``model`` for ``inputs``), LoRA r, init_r, numerical rank of the LoRA update,
    max |Delta_lora - Delta_adalora| (float64), max abs output diff on the probes and the allowed diff.
    """
    lora, ada = _check_models(lora_model, adalora_model, adapter_name)
    for name, layer in lora.items():
        _check_layer(name, layer, ada[name], adapter_name)
    heads = _modules_to_save_pairs(lora_model, adalora_model, adapter_name)
    _check_same_base(lora_model, adalora_model, adapter_name)
    targets = [p for name in ada for p in (ada[name].lora_A[adapter_name], ada[name].lora_B[adapter_name],
                                           ada[name].lora_E[adapter_name])]
    targets += [t for _, wrapper in heads.values() for t in wrapper.modules_to_save[adapter_name].state_dict().values()]
    saved = [t.detach().clone() for t in targets]
    rows = [_migrate_layer(name, layer, ada[name], adapter_name) for name, layer in lora.items()]
    rows += [_copy_module(name, *pair, adapter_name) for name, pair in heads.items()]
    try:
        over = _verify(rows, lora, ada, heads, lora_model, adalora_model, adapter_name, inputs, tolerance)
        if over:
            raise ValueError(f"after migration the outputs differ: {'; '.join(over)}. adalora_model was restored. "
                             "The models compute something this function does not carry over (e.g. adapters "
                             "disabled in one of them); compare their configs")
    except Exception:  # a failed check (or inputs the models cannot take) leaves adalora_model as it was
        with torch.no_grad():
            for t, before in zip(targets, saved):
                t.copy_(before)
        raise
    dropout = [float(getattr(m.lora_dropout[adapter_name], "p", 0.0)) for m in (next(iter(lora.values())),
                                                                                next(iter(ada.values())))]
    if dropout[0] != dropout[1]:
        warnings.warn(f"lora_dropout is {dropout[0]} in the LoRA model and {dropout[1]} in the AdaLoRA model: dropout "
                      "is off in eval, so the outputs agree; it only changes the second stage's training",
                      stacklevel=2)
    table = pd.DataFrame(rows)
    return table.astype({"lora r": "Int64", "init_r": "Int64", "rank of delta": "Int64"})
