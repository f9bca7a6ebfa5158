"""Blockwise 8-bit quantization onto a 256-value codebook, the second level of double quantization.

``bitsandbytes.functional.quantize_blockwise(A, code=create_dynamic_map(), blocksize=256)``:
each block of ``blocksize`` values is scaled by the reciprocal of its absolute maximum into
[-1, 1] and every value becomes the index of a codebook entry. Two ways to pick the entry:

- ``method="cpu-lut"`` (the default) reproduces bitsandbytes' CPU C++ kernel
  (``csrc/cpu_ops.cpp``, bnb >= 0.50): a 65,536-entry lookup table, filled with the nearest code
  of 65,536 evenly spaced points of [-1, 1], is indexed by
  ``int((s + 1) * 0.5 * 65535 + 0.5)``. For a few inputs that is not the nearest code
  (117 of 65,536 in research notes §3.2), so emulating the table is what makes the nested codes
  bit-exact with bitsandbytes on a CPU.
- ``method="nearest"``: the nearest code (midpoint thresholds, ties low), what bitsandbytes'
  CUDA kernel computes.

A block whose maximum is 0 gets code 0 everywhere (bitsandbytes' CPU kernel does the same);
it dequantizes to exactly 0 because its scale is 0.
"""

from __future__ import annotations

from functools import lru_cache

import torch

LUT_SIZE = 65536  # entries of bitsandbytes' CPU quantization table
METHODS = ("cpu-lut", "nearest")


@lru_cache(maxsize=8)
def _cpu_lut(code_bytes: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    grid = -1.0 + 2.0 * torch.arange(LUT_SIZE, dtype=torch.float32) / (LUT_SIZE - 1)  # (65536,)
    return torch.searchsorted((code[:-1] + code[1:]) / 2, grid).to(torch.uint8)  # ties -> lower code


def cpu_lut(code: torch.Tensor) -> torch.Tensor:
    """The 65,536-entry uint8 table of bitsandbytes' CPU kernel for the sorted 256-value ``code``."""
    return _cpu_lut(code.detach().cpu().float().contiguous().numpy().tobytes()).to(code.device)


def _block_absmax(a: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded (blocks, blocksize) view, absmax per block); the pad is 0 and never wins the max."""
    n = a.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(a.reshape(-1).float(), (0, blocks * blocksize - n)).view(blocks, blocksize)
    return padded, padded.abs().amax(dim=1)


def quantize_blockwise(a: torch.Tensor, code: torch.Tensor, blocksize: int = 256,
                       method: str = "cpu-lut") -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes (uint8, shape of ``a``) and the float32 absmax of each block.

    Reproduces ``bitsandbytes.functional.quantize_blockwise`` on a CPU (``method="cpu-lut"``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if a.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    padded, absmax = _block_absmax(a, blocksize)
    # scale by the reciprocal, as the C++ kernel; an all-zero block gives 0 * inf = NaN -> code 0
    s = (padded * (1.0 / absmax)[:, None]).reshape(-1)[: a.numel()].clamp(-1, 1)
    if method == "cpu-lut":
        idx = ((s + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5).nan_to_num(0.0).to(torch.int64)
        q = cpu_lut(code)[idx]
    else:
        q = torch.bucketize(s.nan_to_num(-1.0), (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return q.view(a.shape), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int = 256) -> torch.Tensor:
    """``code[q] * absmax[block]`` in float32, the inverse of :func:`quantize_blockwise`
    (``bitsandbytes.functional.dequantize_blockwise``)."""
    n = q.numel()
    blocks = -(-n // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(f"{n} codes in blocks of {blocksize} need {blocks} absmax values, got {absmax.numel()}")
    values = torch.nn.functional.pad(code[q.reshape(-1).long()], (0, blocks * blocksize - n))
    return (values.view(blocks, blocksize) * absmax.float()[:, None]).reshape(-1)[:n].view(q.shape)
