"""A frozen 4-bit linear layer, the storage/compute split of QLoRA (paper §3, Eq. 5):
store W in 4 bit, and for every use dequantize it to the compute dtype and multiply in 16 (or 32) bit,

    Y = X @ doubleDequant(c1, c2, W_4bit)^T + b.

Its output equals ``bitsandbytes.nn.Linear4bit``'s on a CPU for the same weights (bitsandbytes'
``gemm_4bit``: dequantize in float32, round once to the compute dtype, ``F.linear``). The packed
weight is a ``requires_grad=False`` parameter and never changes; gradients flow to the input, so a
LoRA adapter on top trains while the base stays 4-bit. It subclasses ``nn.Linear``, as bitsandbytes'
layer does, so PEFT's ``get_peft_model`` wraps it with a LoRA ``Linear``. Merging an adapter into it
is not supported (the packed weight has another shape, so PEFT's merge fails loudly).

On CPUs with AVX512-BF16, bitsandbytes' layer in eval mode with an input that needs no gradient
repacks its weight for a fused bf16 kernel and computes with bf16 block constants; its output then
differs from this layer's by bf16 rounding (research notes §8.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blockwise import dequantize_4bit, quantize_4bit
from .state import QuantState


class Linear4bit(nn.Linear):
    """``y = x @ dequantize_4bit(weight, quant_state, compute_dtype).T + bias``.

    ``compute_dtype=None`` computes in the input's dtype. Build one with :meth:`from_linear`.
    """

    def __init__(self, packed: torch.Tensor, quant_state: QuantState, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no float weight is ever allocated
        if len(quant_state.shape) != 2:
            raise ValueError(f"a linear weight is (out_features, in_features), got shape {tuple(quant_state.shape)}")
        self.out_features, self.in_features = quant_state.shape
        self.weight = nn.Parameter(packed, requires_grad=False)  # uint8, ((out * in + 1) // 2, 1)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.quant_state = quant_state
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """Quantize ``linear.weight`` (QLoRA's defaults: NF4, blocksize 64, double quantization)."""
        packed, state = quantize_4bit(linear.weight.detach(), blocksize, quant_type, double_quant)
        return cls(packed, state, linear.bias, compute_dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out_features, in_features) weight the layer computes with."""
        return dequantize_4bit(self.weight, self.quant_state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        w = self.dequantized_weight(dtype)  # (out, in), rounded once from float32 to the compute dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), w, bias).to(x.dtype)  # (..., in) @ (in, out) -> (..., out)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.quant_state = self.quant_state.to(self.weight.device)  # .to(dtype) leaves the state alone
        return self

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
