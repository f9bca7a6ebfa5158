"""Blockwise 4-bit quantization, bit-exact with ``bitsandbytes.functional.quantize_4bit`` and
``dequantize_4bit`` on a CPU (bitsandbytes 0.50).

The recipe (QLoRA paper §2-3; research notes §1.4-1.7):

1. Flatten the tensor in row-major order and cut it into blocks of ``blocksize`` values (the last
   block may be shorter).
2. Per block, ``absmax = max |x|`` in float32, and ``s = x * (1 / absmax)``: a multiplication by
   the float32 reciprocal, clamped to [-1, 1]. (bitsandbytes divides instead in the last, partial
   block, and clamps that block's absmax to at least 1e-38; so do we.)
3. Each ``s`` becomes the index of the nearest codebook value: thresholds at the midpoints, ties
   to the lower value.
4. Two codes per byte, the element with the even index in the HIGH nibble; an odd count is padded
   with the code of 0.0.

Dequantization is ``code[q] * absmax`` in float32, rounded once to the original dtype.
:func:`encode_reference` is steps 2-3 in a few lines; :func:`quantize_4bit` computes the same
codes faster (:mod:`companion.quant.fast`).
"""

from __future__ import annotations

import math

import torch

from . import fast
from .codebooks import check_quant_type, get_codebook, thresholds
from .double_quant import double_dequantize, double_quantize
from .state import QuantState

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes quantize_4bit
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NONFINITE = ("raise", "keep")


def check_blocksize(blocksize) -> int:
    if blocksize not in BLOCKSIZES or isinstance(blocksize, bool):
        raise ValueError(f"blocksize must be a power of two in [32, 4096] (bitsandbytes quantize_4bit), "
                         f"got {blocksize!r}")
    return blocksize


def check_input(A) -> torch.Tensor:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in FLOAT_DTYPES:
        raise ValueError(f"4-bit quantization takes float32, float16 or bfloat16 tensors, got {A.dtype}; "
                         "integer and bool tensors are not weights (convert with .float() if they are)")
    if A.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(A.shape)})")
    return A


def block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 ``max |x|`` of every block; the partial last block's is clamped to >= 1e-38."""
    full = flat.numel() - flat.numel() % blocksize
    lo, hi = torch.aminmax(flat[:full].view(-1, blocksize), dim=1)  # one pass, no |x| temporary
    absmax = torch.maximum(hi, -lo).float().abs()  # abs(): +0.0 for an all-zero block, as |x|.max()
    if full < flat.numel():
        tail = flat[full:].float().abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail[None]])
    return absmax


def encode_reference(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int, code: torch.Tensor) -> torch.Tensor:
    """uint8 code of every value of the 1-D ``flat``: steps 2-3, exactly as bitsandbytes' CPU op."""
    bounds, order = thresholds(code.to(flat.device))
    x = flat.float()
    full = x.numel() - x.numel() % blocksize
    s = x[:full].view(-1, blocksize) * (1.0 / absmax[: full // blocksize].clamp(min=1e-38))[:, None]
    s = s.reshape(-1)
    if full < x.numel():  # the partial last block is divided, not multiplied
        s = torch.cat([s, x[full:] / absmax[-1]])
    return order[torch.bucketize(s.clamp(-1, 1), bounds)].to(torch.uint8)  # ties -> lower code


def pack(codes: torch.Tensor, pad_code: int) -> torch.Tensor:
    """Two codes per byte, even index in the high nibble: ``(q[0::2] << 4) | q[1::2]``, shape (bytes, 1)."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad_code)])
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` 4-bit codes (uint8) in ``packed``, high nibble first."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0x0F], dim=1).reshape(-1)[:n]


def quantize_4bit(A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False,
                  *, nonfinite: str = "raise", dq_method: str = "cpu-lut") -> tuple[torch.Tensor, QuantState]:
    """``(packed, state)``: the 4-bit codes of ``A`` (uint8, shape ``((n + 1) // 2, 1)``) and its
    :class:`QuantState`. Bit-exact with ``bitsandbytes.functional.quantize_4bit(A, blocksize=blocksize,
    compress_statistics=double_quant, quant_type=quant_type)`` on a CPU for ``"nf4"`` and ``"fp4"``;
    ``"int4"`` and ``"nf4-equal-bin"`` are the comparison codebooks of Chapter 4.

    ``nonfinite="raise"`` refuses NaN and Inf; ``"keep"`` quantizes them as bitsandbytes does: the
    block's absmax becomes NaN or Inf, and after dequantization the whole block is NaN (an Inf comes
    back as +Inf).
    """
    check_input(A)
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    code = get_codebook(quant_type, A.device)
    flat = A.detach().reshape(-1)
    n = flat.numel()
    absmax = block_absmax(flat, blocksize)
    finite = bool(torch.isfinite(absmax).all())  # a NaN or Inf anywhere makes its block's absmax non-finite
    if not finite and nonfinite == "raise":
        bad = (~torch.isfinite(absmax)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"A contains NaN or Inf values (in blocks {bad} of {blocksize}); bitsandbytes would "
                         "turn their whole block into NaN. Clean the tensor, or pass nonfinite='keep'")
    bounds, order = thresholds(code)
    pad_code = int(order[torch.bucketize(torch.zeros((), device=A.device), bounds)])  # the code of 0.0
    full = n - n % blocksize
    if finite and full and A.device.type == "cpu":  # the fast kernels are tuned and tested on CPUs
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=A.device)
        fast.encode_full_blocks(flat[:full].view(-1, blocksize), absmax[: full // blocksize], code, packed)
        if full < n:
            tail = encode_reference(flat[full:], absmax[-1:], blocksize, code)
            packed[full // 2:] = pack(tail, pad_code).view(-1)
        packed = packed.unsqueeze(1)
    else:
        packed = pack(encode_reference(flat, absmax, blocksize, code), pad_code)

    state = QuantState(absmax=absmax, shape=A.shape, code=code, blocksize=blocksize, quant_type=quant_type,
                       dtype=A.dtype)
    if double_quant:
        state.absmax, state.offset, state.state2 = double_quantize(absmax, method=dq_method)
    return packed, state


def check_state(packed: torch.Tensor, state: QuantState) -> None:
    """Raise ``ValueError`` naming the first field of ``state`` that does not fit ``packed``."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a companion.quant.QuantState (QuantState.from_bnb converts "
                        f"bitsandbytes'), got {type(state).__name__}")
    check_blocksize(state.blocksize)
    check_quant_type(state.quant_type)
    if state.dtype not in FLOAT_DTYPES:
        raise ValueError(f"state.dtype must be float32, float16 or bfloat16, got {state.dtype}")
    if state.code is None or state.code.numel() != 16:
        raise ValueError("state.code must hold the 16 codebook values")
    n = math.prod(state.shape)
    if packed.numel() * packed.element_size() != (n + 1) // 2:
        raise ValueError(f"packed holds {packed.numel() * packed.element_size()} bytes but state.shape "
                         f"{tuple(state.shape)} needs {(n + 1) // 2}: the state belongs to another tensor")
    blocks = -(-n // state.blocksize)
    if state.absmax.numel() != blocks:
        raise ValueError(f"state.absmax has {state.absmax.numel()} values but {n} values in blocks of "
                         f"{state.blocksize} need {blocks}")
    if state.nested and state.state2.absmax.numel() != -(-blocks // state.state2.blocksize):
        raise ValueError(f"state.state2.absmax has {state.state2.absmax.numel()} values, "
                         f"{blocks} nested constants in blocks of {state.state2.blocksize} need "
                         f"{-(-blocks // state.state2.blocksize)}")
    if not state.nested and state.absmax.dtype != torch.float32:
        raise ValueError(f"state.absmax must be float32 without double quantization, got {state.absmax.dtype}")


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor ``packed`` and ``state`` stand for: ``code[q] * absmax``, shape ``state.shape``, dtype
    ``state.dtype`` (or ``dtype``: one rounding from float32, as bitsandbytes' ``gemm_4bit`` does for the
    compute dtype). Bit-exact with ``bitsandbytes.functional.dequantize_4bit(packed, state.to_bnb())``."""
    check_state(packed, state)
    dtype = dtype or state.dtype
    if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage: the same bytes in another dtype
        packed = packed.view(torch.uint8)
    absmax = double_dequantize(state).float()
    n = math.prod(state.shape)
    code = state.code.to(device=packed.device, dtype=torch.float32)
    if packed.device.type == "cpu" and fast.can_decode(packed, n):
        out = fast.decode(packed, absmax, n, state.blocksize, code, dtype)
    else:
        values = code[unpack(packed, n).long()]
        blocks = absmax.numel()
        values = torch.nn.functional.pad(values, (0, blocks * state.blocksize - n)).view(blocks, -1)
        out = (values * absmax[:, None]).reshape(-1)[:n].to(dtype)
    return out.view(state.shape)
