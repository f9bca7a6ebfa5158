"""The 4-bit codebooks: NF4 (QLoRA paper §3), bitsandbytes' FP4 (E2M1), a symmetric Int4, the
paper's literal Eq. 4 and the source tutorial's equal-bin variant, plus the 8-bit dynamic map
that double quantization stores the block constants in.

A codebook is 16 float32 values in [-1, 1]; a 4-bit code is an index into it. Quantizing picks,
for a value already scaled into [-1, 1], the nearest codebook value: the thresholds are the
midpoints of neighbouring values in sorted order, and a value exactly on a midpoint takes the
lower one (``torch.bucketize(..., right=False)``, what bitsandbytes' CPU kernel does).

NF4 is built the way ``bitsandbytes.functional.create_normal_map(offset=0.9677083)`` builds it:
the N(0, 1) quantiles of 8 evenly spaced probabilities from 0.9677083 down to 0.5 (the positive
half, 0.5 itself excluded) and of 7 for the negative half, an exact 0, divided by the largest so
that the range is exactly [-1, 1]. The probability grid must be ``torch.linspace`` in float32:
scipy's ``norm.ppf`` of a float64 grid differs in the last bits (research notes §1.3).
"""

from __future__ import annotations

from functools import lru_cache

import torch

NF4_OFFSET = 0.9677083  # bitsandbytes create_normal_map default; derivation unpublished (bnb#968)

# bitsandbytes get_4bit_type("fp4"): sign bit, then 3 bits whose magnitudes are NOT in value order.
# Code 8 (sign bit set, magnitude 0) is +0.0 there: the list says `-0`, a Python int, which is 0.
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
# bitsandbytes get_4bit_type("int4") lists this table (it raises in bnb 0.50.2: the list is integer).
INT4_RAW = (7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0)

QUANT_TYPES = ("nf4", "fp4", "int4", "nf4-equal-bin")


def create_normal_map(offset: float = NF4_OFFSET, use_extra_value: bool = True) -> torch.Tensor:
    """The 256-entry table of ``bitsandbytes.functional.create_normal_map``: the NF4 values, sorted,
    with 241 (or 242) zeros padding the middle. ``use_extra_value=False`` is the symmetric variant
    (7 negative and 7 positive values), which bitsandbytes' 4-bit kernels do not use."""
    from scipy.stats import norm

    positive = 9 if use_extra_value else 8  # grid points including 0.5, which is dropped
    pos = norm.ppf(torch.linspace(offset, 0.5, positive)[:-1]).tolist()  # float32 grid -> float64 ppf
    neg = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1])).tolist()
    values = torch.tensor(pos + [0.0] * (256 - len(pos) - len(neg)) + neg, dtype=torch.float32)
    values = values.sort().values
    return values / values.max()  # float32 division, as bitsandbytes: range exactly [-1, 1]


@lru_cache(maxsize=8)
def _nf4(offset: float) -> torch.Tensor:
    table = create_normal_map(offset)
    return torch.cat([table[:7], table[7:8], table[-8:]])  # 7 negative, the zero, 8 positive


def nf4_codebook(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values, sorted, so code ``i`` is the i-th smallest (QLoRA §3).

    Asymmetric: 7 negative values, an exact 0 (so zero-padding and exact zeros survive
    quantization) and 8 positive values; the extremes are -1 and +1 exactly. Equal to
    ``bitsandbytes.functional.get_4bit_type("nf4")`` bit for bit.
    """
    return _nf4(float(offset)).clone()


def fp4_codebook() -> torch.Tensor:
    """bitsandbytes' FP4 (E2M1) table in code order, ``get_4bit_type("fp4")``: raw magnitudes
    {0, 0.0625, 2, 3, 4, 6, 8, 12} divided by 12, with a sign bit. Codes 0 and 8 are both zero, so
    only 15 distinct values."""
    raw = torch.tensor(FP4_RAW, dtype=torch.float32)
    return raw / raw.abs().max()


def int4_codebook() -> torch.Tensor:
    """Symmetric linear Int4, ``[7, 6, ..., 0, 0, -1, ..., -7] / 7`` in bitsandbytes' listing order:
    15 distinct evenly spaced values, the ``Int4`` row of the paper's Table 2."""
    raw = torch.tensor(INT4_RAW, dtype=torch.float32)
    return raw / raw.abs().max()


def equal_bin_codebook() -> torch.Tensor:
    """The source tutorial's "NF4": 16 equal-probability bins of N(0, 1), each represented by its
    centroid ``E[Z | bin]`` (about ±1.97 at the ends, not the tutorial's ±2.12), normalised to
    [-1, 1]. Symmetric, so it has **no** exact zero. Not what QLoRA or bitsandbytes use."""
    from scipy.stats import norm

    edges = norm.ppf(torch.linspace(0, 1, 17, dtype=torch.float64).numpy())  # -inf ... +inf
    pdf = norm.pdf(edges)  # 0 at both infinite ends
    centroids = torch.tensor((pdf[:-1] - pdf[1:]) * 16)  # E[Z | a < Z < b] = (phi(a) - phi(b)) / P(bin)
    return (centroids / centroids.max()).float()


def paper_eq4_levels(k: int = 4) -> torch.Tensor:
    """Eq. 4 of the QLoRA paper taken literally, ``q_i = (Q(i/(2^k+1)) + Q((i+1)/(2^k+1))) / 2`` for
    ``i = 0 .. 2^k - 1``, in float64 and not normalised. ``Q(0) = -inf`` makes ``q_0 = -inf`` (the end
    the paper's text does not discuss, artidoro/qlora#94); the released code uses
    :func:`create_normal_map` instead."""
    from scipy.stats import norm

    n = 2 ** k
    quantiles = torch.tensor(norm.ppf([i / (n + 1) for i in range(n + 1)]), dtype=torch.float64)
    return (quantiles[:-1] + quantiles[1:]) / 2


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit "dynamic" map (``create_dynamic_map``; Dettmers 2015, arXiv 1511.04561),
    the "8-bit float" of the QLoRA paper's double quantization: a sign, a run of zeros that sets a
    power-of-ten exponent (1e-6 .. 1), an indicator bit and linear fraction bits. 256 sorted values
    in [-0.99297, 1]; only the signed default is used by double quantization."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else \
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10 ** (-(max_exponent_bits - 1) + i) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10 ** (-(max_exponent_bits - 1) + i) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


_BUILDERS = {"nf4": nf4_codebook, "fp4": fp4_codebook, "int4": int4_codebook, "nf4-equal-bin": equal_bin_codebook}


@lru_cache(maxsize=None)
def _cached(quant_type: str) -> torch.Tensor:
    return _BUILDERS[quant_type]()


def check_quant_type(quant_type) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; choose one of {QUANT_TYPES} "
                         "(bitsandbytes itself offers 'nf4' and 'fp4')")
    return quant_type


def get_codebook(quant_type: str, device=None) -> torch.Tensor:
    """The 16-value codebook of ``quant_type`` (a fresh copy, on ``device``)."""
    return _cached(check_quant_type(quant_type)).to(device, copy=True)


def thresholds(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bounds, order)`` for nearest-value quantization with ``code``, as bitsandbytes'
    ``_get_4bit_quantize_bounds``: the 15 float32 midpoints of the sorted values, and the code index
    of each sorted position (identity for NF4; for FP4 the two zero codes keep their table order,
    so 0 maps to code 0 and a scaled value in (0, 1/384] to code 8, the zero with the sign bit)."""
    order = torch.argsort(code, stable=True)
    return (code[order[:-1]] + code[order[1:]]) / 2, order
