"""A frozen 4-bit linear layer, the storage/compute split of QLoRA (paper §3, Eq. 5):
store W in 4 bit, and for every use dequantize it to the compute dtype and multiply in 16 (or 32) bit,

    Y = X @ doubleDequant(c1, c2, W_4bit)^T + b.

Its output equals ``bitsandbytes.nn.Linear4bit``'s on a CPU for the same weights (bitsandbytes'
``gemm_4bit``: dequantize in float32, round once to the compute dtype, ``F.linear``). It stands in
for bitsandbytes' layer where users touch it:

- it subclasses ``nn.Linear`` and its weight is a :class:`Params4bit` (uint8 codes, frozen) that
  carries its ``quant_state``, as bitsandbytes' ``Params4bit`` does: code that reads
  ``param.quant_state`` or the class name ``"Params4bit"`` (PEFT's ``dequantize_module_weight``
  and parameter counts, :func:`companion.measure.stored_bytes`) treats both alike;
- ``state_dict()`` stores the quant state beside the codes under bitsandbytes' keys
  (``weight.absmax``, ``weight.quant_map``, ``weight.nested_*``,
  ``weight.quant_state.bitsandbytes__nf4``), byte for byte what bitsandbytes saves, and
  ``load_state_dict`` reads it back (also a bitsandbytes checkpoint), refusing a mismatched one;
- PEFT's LoRA merges into it like into bitsandbytes' layer (dequantize, add, re-quantize) once the
  config is registered with :func:`companion.quant.register_lora_linear4bit`. Anything else that
  would treat the packed codes as a float matrix (PEFT's plain ``lora.Linear``/``SVDLinear`` merge,
  ``F.linear(x, layer.weight)``, an in-place init) raises a ``RuntimeError`` naming the fix, where
  bitsandbytes fails later with a shape error or silently.

Differences that remain: bitsandbytes fixes ``compute_dtype`` from the first input when it is
``None``, this layer computes in each input's dtype; on CPUs with AVX512-BF16, bitsandbytes' layer
in eval mode with an input that needs no gradient repacks its weight for a fused bf16 kernel and
its output then differs by bf16 rounding (research notes §8.3).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .blockwise import FLOAT_DTYPES, check_state, dequantize_4bit, quantize_4bit
from .state import QuantState

# arithmetic that would use the codes as numbers; dunders such as __iadd__ / __rmatmul__ reduce to these names
_MATH = frozenset("add sub subtract rsub mul multiply div divide true_divide truediv floor_divide floordiv "
                  "matmul mm bmm addmm addmv mv dot outer einsum linear bilinear lerp addcmul addcdiv baddbmm "
                  "neg t transpose permute swapaxes".split())  # transposes: the codes are no (out, in) matrix
_IN_PLACE_OK = frozenset({"copy_", "requires_grad_", "share_memory_", "_share_memory_", "set_", "detach_"})
_DATA, _REQUIRES_GRAD = torch._C.TensorBase.data, torch._C.TensorBase.requires_grad
_TRANSPOSED = {torch._C.TensorBase.T, torch._C.TensorBase.mT, torch._C.TensorBase.H, torch._C.TensorBase.mH}


def _op(name: str) -> str:
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        return core[1:] if core[:1] in ("i", "r") and core[1:] in _MATH else core
    return name.rstrip("_")


def _misuse(param: "Params4bit | None", what: str) -> RuntimeError:
    # not a TypeError: torch turns a TypeError raised inside ``+=`` into NotImplemented and loses the message
    qs = None if param is None else param.__dict__.get("quant_state")
    matrix = f"the {tuple(qs.shape)} weight matrix" if qs is not None else "a weight matrix"
    codes = "" if param is None else f", shape {tuple(param.shape)}"
    return RuntimeError(
        f"Linear4bit.weight holds packed 4-bit codes (uint8{codes}), not {matrix}: {what} "
        "would use the codes as if they were weights. Read the matrix with layer.dequantized_weight() and store "
        "a new one with layer.requantize(w). To merge a LoRA adapter into the 4-bit layer, create it with "
        "get_peft_model(model, companion.quant.register_lora_linear4bit(LoraConfig(...))) (dequantize, add, "
        "re-quantize, as PEFT does for bitsandbytes), or load the adapter onto a 16-bit copy of the base and "
        "merge there (companion.qlora.merge_adapter)")


class Params4bit(nn.Parameter):
    """The packed codes of a 4-bit weight with their :class:`QuantState`: a mirror of
    ``bitsandbytes.nn.Params4bit``. uint8, shape ``((out * in + 1) // 2, 1)``, never trainable;
    ``quant_state`` travels with it through device moves, ``deepcopy`` and pickling.

    Unlike bitsandbytes' class it refuses, with a ``RuntimeError`` naming the fix, what would treat the
    codes as a float matrix: arithmetic (``+ - * / @``, ``F.linear``), transposes, in-place writes
    other than ``copy_`` of uint8 codes, assigning ``.data`` of another dtype or shape, and (a
    ``TypeError``) ``requires_grad=True``. ``.data`` and ``clone()`` keep the class, so ``weight.data += delta``
    (PEFT's merge into an ``nn.Linear``) is refused too; every other result is a plain tensor.
    """

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = False,
                quant_state: QuantState | None = None):
        if requires_grad:
            raise TypeError("Params4bit holds frozen 4-bit codes and cannot require gradients; QLoRA trains an "
                            "adapter on top of the 4-bit layer (and its bias), never the codes")
        data = torch.empty(0, dtype=torch.uint8) if data is None else data.as_subclass(torch.Tensor)
        self = torch.Tensor._make_subclass(cls, data, False)
        self.quant_state = quant_state
        return self

    # bitsandbytes' Params4bit attributes, read from the state
    @property
    def quant_type(self) -> str:
        return self.quant_state.quant_type

    @property
    def blocksize(self) -> int:
        return self.quant_state.blocksize

    @property
    def compress_statistics(self) -> bool:
        return self.quant_state.nested

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        owner = getattr(func, "__self__", None)
        mine = next((a for a in (*args, *kwargs.values()) if isinstance(a, cls)), None)
        if _op(name) in _MATH or (name == "__get__" and owner in _TRANSPOSED):
            raise _misuse(mine, f"`{getattr(owner, '__name__', name) if name == '__get__' else name}`")
        if (name.endswith("_") and not name.startswith("__") and name not in _IN_PLACE_OK) or name == "__setitem__":
            raise _misuse(mine, f"the in-place `{name}`")
        if name == "copy_" and isinstance(args[0], cls) and args[1].dtype != args[0].dtype:
            raise _misuse(args[0], f"copying a {args[1].dtype} tensor into it")
        if (name == "__set__" and owner is _DATA and isinstance(args[1], torch.Tensor)
                and (args[1].dtype != args[0].dtype or args[1].shape != args[0].shape)):
            raise _misuse(args[0], f"assigning a {args[1].dtype} tensor of shape {tuple(args[1].shape)} to .data")
        if ((name == "__set__" and owner is _REQUIRES_GRAD and args[1])
                or (name == "requires_grad_" and (args[1] if len(args) > 1 else kwargs.get("requires_grad", True)))):
            raise TypeError("Linear4bit.weight holds frozen 4-bit codes and cannot require gradients; QLoRA "
                            "trains an adapter on top (and the bias): leave the 4-bit weights out when unfreezing")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if name == "clone" or (name == "__get__" and owner is _DATA):  # the same codes: keep the guard on them
            out = out.as_subclass(cls)
            out.quant_state = mine.quant_state
        return out

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            memo[id(self)] = Params4bit(self.as_subclass(torch.Tensor).clone(), False,
                                        copy.deepcopy(self.quant_state, memo))
        return memo[id(self)]

    def __reduce_ex__(self, proto):
        return Params4bit, (self.as_subclass(torch.Tensor), False, self.quant_state)


class Linear4bit(nn.Linear):
    """``y = x @ dequantize_4bit(weight, quant_state, compute_dtype).T + bias``.

    ``packed`` (uint8 codes) and ``quant_state`` come from :func:`quantize_4bit` of the
    ``(out_features, in_features)`` weight; ``bias`` has shape ``(out_features,)``; ``compute_dtype=None``
    computes in the input's dtype. Build one with :meth:`from_linear` or :func:`replace_linear`.
    Raises ``ValueError`` when the state does not fit the codes or the bias the shape.
    """

    def __init__(self, packed: torch.Tensor, quant_state: QuantState, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no float weight is ever allocated
        check_state(packed, quant_state)
        if len(quant_state.shape) != 2:
            raise ValueError(f"a linear weight is (out_features, in_features), got shape {tuple(quant_state.shape)}")
        if compute_dtype is not None and compute_dtype not in (*FLOAT_DTYPES, torch.float64):
            raise ValueError(f"compute_dtype must be None or a float dtype such as torch.bfloat16, got {compute_dtype}")
        self.out_features, self.in_features = quant_state.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},) for a {tuple(quant_state.shape)} weight, "
                             f"got {tuple(bias.shape)}")
        self.weight = Params4bit(packed, False, quant_state)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """Quantize ``linear.weight`` (QLoRA's defaults: NF4, blocksize 64, double quantization)."""
        if isinstance(linear.weight, Params4bit) or linear.weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"from_linear quantizes a float nn.Linear, got a {type(linear).__name__} with a "
                            f"{linear.weight.dtype} weight: it is already quantized")
        packed, state = quantize_4bit(linear.weight.detach(), blocksize, quant_type, double_quant)
        return cls(packed, state, linear.bias, compute_dtype)

    @property
    def quant_state(self) -> QuantState:
        """The state of the packed weight (it lives on ``weight``, as in bitsandbytes)."""
        return self.weight.quant_state

    @quant_state.setter
    def quant_state(self, state: QuantState) -> None:
        check_state(self.weight, state)
        self.weight.quant_state = state

    def __setattr__(self, name, value):
        if name == "weight" and not isinstance(value, Params4bit):
            raise TypeError(f"Linear4bit.weight must be a companion.quant.Params4bit (packed codes with their "
                            f"quant_state), got {type(value).__name__}; store a float (out, in) matrix with "
                            "layer.requantize(w), or use an nn.Linear")
        super().__setattr__(name, value)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out_features, in_features) weight the layer computes with, in ``dtype`` (default: the
        quantized tensor's own dtype, ``quant_state.dtype``)."""
        return dequantize_4bit(self.weight.as_subclass(torch.Tensor), self.quant_state, dtype)

    @torch.no_grad()
    def requantize(self, weight: torch.Tensor) -> None:
        """Store ``weight`` (out_features, in_features) as new codes with this layer's quant_type, blocksize
        and double quantization; ``quant_state.dtype`` becomes ``weight.dtype``. What PEFT's bitsandbytes
        merge does with ``Params4bit(w).to(device)``; the quantizer refuses NaN and Inf (``ValueError``)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight must have shape ({self.out_features}, {self.in_features}), "
                             f"got {tuple(weight.shape)}")
        s = self.quant_state
        packed, state = quantize_4bit(weight.detach().to(self.weight.device), s.blocksize, s.quant_type, s.nested)
        self.weight = Params4bit(packed, False, state)

    def reset_parameters(self) -> None:
        raise TypeError("Linear4bit holds quantized weights and cannot be re-initialised; build it from an "
                        "initialised nn.Linear (Linear4bit.from_linear or replace_linear)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        w = self.dequantized_weight(dtype)  # (out, in), rounded once from float32 to the compute dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), w, bias).to(x.dtype)  # (..., in) @ (in, out) -> (..., out)

    def _apply(self, fn, recurse=True):
        # Module.type(dtype) casts every tensor: refuse before it turns the codes into floats
        if fn(torch.empty(0, dtype=torch.uint8, device=self.weight.device)).dtype != torch.uint8:
            raise TypeError("this conversion would cast the packed 4-bit codes of Linear4bit to another dtype "
                            "(Module.type casts every tensor); use .to(dtype), .half(), .bfloat16() or .float(), "
                            "which leave integer tensors alone")
        state = self.quant_state
        super()._apply(fn, recurse)
        if not isinstance(self.weight, Params4bit):  # torch.__future__ swap_module_params_on_conversion
            self._parameters["weight"] = Params4bit(self.weight.data, False, state)
        self.weight.quant_state = state.to(self.weight.device)  # .to(dtype) leaves the state alone
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the codes and the bias
        for k, v in self.quant_state.as_dict(packed=True).items():  # bitsandbytes Linear4bit._save_to_state_dict
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        local = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        state = None
        if key in local:
            qs_keys = [k for k in local if k.startswith(key + ".")]
            codes, state = self._checkpoint_state(key, local[key], {k[len(key) + 1:]: local.pop(k) for k in qs_keys})
            local[key] = Params4bit(codes, False, state)
        n_errors = len(error_msgs)
        super()._load_from_state_dict(local, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if state is not None and not any(key in m for m in error_msgs[n_errors:]):
            self.weight.quant_state = state.to(self.weight.device)

    def _checkpoint_state(self, key: str, codes: torch.Tensor, entries: dict) -> tuple[torch.Tensor, QuantState]:
        """The codes and state a checkpoint holds under ``key``, checked against this layer."""
        fix = ("build the model with the same replace_linear(quant_type=..., blocksize=..., double_quant=...) "
               "settings and the same layer sizes before loading")
        if not entries:
            if codes.is_floating_point():
                raise ValueError(f"{key} is a floating-point {tuple(codes.shape)} matrix, but this Linear4bit holds "
                                 "packed 4-bit codes and their quant state; load the checkpoint into the float model "
                                 "and quantize afterwards (replace_linear), or load a 4-bit state_dict")
            raise ValueError(f"{key} holds codes but no quant state ({key}.absmax, {key}.quant_map, "
                             f"{key}.quant_state.bitsandbytes__<quant_type>); save the checkpoint from a 4-bit "
                             "Linear4bit (companion or bitsandbytes), whose state_dict carries it")
        state = QuantState.from_dict(entries, device=self.weight.device, name=key)
        mine = self.quant_state
        for field, theirs, ours in [("shape", tuple(state.shape), tuple(mine.shape)),
                                    ("quant_type", state.quant_type, mine.quant_type),
                                    ("blocksize", state.blocksize, mine.blocksize),
                                    ("double_quant", state.nested, mine.nested)]:
            if theirs != ours:
                raise ValueError(f"{key}: the checkpoint was quantized with {field}={theirs!r}, this layer with "
                                 f"{field}={ours!r}; {fix}")
        if codes.dtype != torch.uint8:  # bitsandbytes' quant_storage: the same bytes in another dtype
            codes = codes.contiguous().view(torch.uint8).reshape(-1, 1)
        try:
            check_state(codes, state)
        except ValueError as err:
            raise ValueError(f"{key}: {err}; {fix}") from err
        return codes, state

    def extra_repr(self) -> str:
        s = self.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={s.quant_type}, blocksize={s.blocksize}, double_quant={s.nested}, "
                f"compute_dtype={self.compute_dtype}")


def replace_linear(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None, skip_modules=()) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (in place) for a :class:`Linear4bit`, except modules whose
    name contains one of ``skip_modules`` (e.g. ``"classifier"``, ``"lm_head"``). Returns ``model``."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not any(s in full for s in skip_modules):
                setattr(module, child_name, Linear4bit.from_linear(child, quant_type, blocksize, double_quant,
                                                                   compute_dtype))
    return model
