"""Double quantization (QLoRA paper §3, Eq. 5-6): quantize the quantization constants themselves.

First-level blockwise quantization stores one float32 ``absmax`` per block of 64 weights, 32 bits
per 64 weights = 0.5 bit per parameter. Double quantization stores instead, as bitsandbytes'
``quantize_4bit(..., compress_statistics=True)`` does:

1. ``offset = absmax.mean()``, one float32 per tensor. The maxima are all positive; subtracting
   their mean centres them on zero so that a *symmetric* 8-bit code can be used (paper §3);
2. ``absmax - offset`` quantized blockwise with blocks of 256 onto the 8-bit dynamic map (the
   paper's "8-bit Floats"), giving one uint8 code per first-level block and one float32 scale per
   256 of them.

Per parameter: ``8/64 + 32/(64*256) = 0.127`` bit instead of ``0.5``. There is no zero point.
Dequantization (Eq. 6, ``doubleDequant``): ``absmax_b = dyn[q_b] * absmax2[b // 256] + offset``.
"""

from __future__ import annotations

import torch

from .codebooks import create_dynamic_map
from .dynamic import dequantize_blockwise, quantize_blockwise
from .state import QuantState

NESTED_BLOCKSIZE = 256  # hard-coded in bitsandbytes quantize_4bit
_DYNAMIC = create_dynamic_map()


def double_quantize(absmax: torch.Tensor, method: str = "cpu-lut") -> tuple[torch.Tensor, torch.Tensor, QuantState]:
    """``(qabsmax, offset, state2)`` for float32 block maxima ``absmax``.

    ``method="cpu-lut"`` reproduces bitsandbytes' CPU codes bit for bit, ``"nearest"`` its CUDA codes
    (see :mod:`companion.quant.dynamic`).
    """
    offset = absmax.mean()  # one float32 per tensor
    code = _DYNAMIC.to(absmax.device, copy=True)
    qabsmax, absmax2 = quantize_blockwise(absmax - offset, code, NESTED_BLOCKSIZE, method=method)
    return qabsmax, offset, QuantState(absmax=absmax2, code=code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)


def double_dequantize(state: QuantState) -> torch.Tensor:
    """The float32 first-level ``absmax`` a nested ``state`` stands for (Eq. 6, inner ``dequant``)."""
    if not state.nested:
        return state.absmax
    s2 = state.state2
    if s2.blocksize != NESTED_BLOCKSIZE:
        raise ValueError(f"state2.blocksize must be {NESTED_BLOCKSIZE} (bitsandbytes' nested blocksize), "
                         f"got {s2.blocksize}")
    if state.absmax.dtype != torch.uint8:
        raise ValueError(f"a nested state stores uint8 codes in absmax, got {state.absmax.dtype}")
    if state.offset is None:
        raise ValueError("a nested state needs its offset (the mean of the block maxima)")
    return dequantize_blockwise(state.absmax, s2.absmax, s2.code, s2.blocksize) + state.offset
