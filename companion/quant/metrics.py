"""How much a 4-bit tensor costs and how far it is from the original.

* :func:`bits_per_parameter` -- storage bits per weight of a real quantized tensor, from its packed
  codes and :class:`~companion.quant.state.QuantState`: 4.5 at blocksize 64, 4.127 with double
  quantization. :func:`companion.memory.bits_per_parameter` computes the same from the shape alone.
* :func:`quantization_error` -- MSE, RMSE, mean and max absolute error, relative Frobenius error.
* :func:`error_table` -- those errors for several codebooks and block sizes on one tensor.
"""

from __future__ import annotations

import torch

from .blockwise import dequantize_4bit, quantize_4bit
from .state import QuantState


def bits_per_parameter(state: QuantState, packed: torch.Tensor | None = None) -> float:
    """Storage bits per original value: packed codes plus the per-tensor state (``absmax``; with
    double quantization the uint8 codes, ``state2.absmax`` and ``offset``). The shared codebooks are
    not counted. ``packed`` defaults to the size ``quantize_4bit`` produces, ``ceil(n / 2)`` bytes."""
    n = state.numel
    packed_bytes = (n + 1) // 2 if packed is None else packed.numel() * packed.element_size()
    return 8 * (packed_bytes + state.state_bytes()) / n


@torch.no_grad()
def quantization_error(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """Errors of ``x_hat`` against ``x``, computed in float64."""
    if x.shape != x_hat.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    x, e = x.double(), (x_hat.double() - x.double())
    return {
        "mse": e.pow(2).mean().item(),
        "rmse": e.pow(2).mean().sqrt().item(),
        "mean_abs": e.abs().mean().item(),
        "max_abs": e.abs().max().item(),
        "rel_fro": (e.norm() / x.norm().clamp(min=1e-300)).item(),
    }


def roundtrip(x: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False) -> torch.Tensor:
    """``dequantize_4bit(*quantize_4bit(x, ...))``: what a 4-bit model computes with instead of ``x``."""
    return dequantize_4bit(*quantize_4bit(x, blocksize, quant_type, double_quant))


def error_table(tensors: dict[str, torch.Tensor] | torch.Tensor, quant_types=("nf4", "fp4", "int4", "nf4-equal-bin"),
                blocksizes=(64,), double_quant: bool = False, metrics=("mse", "max_abs")):
    """A pandas DataFrame with one row per (blocksize, quant_type) and the chosen metrics.

    ``tensors`` may be one tensor or a dict of named tensors (e.g. every Linear weight of a model):
    each is quantized on its own and the errors are pooled over all of their values. Tensors whose
    sizes are multiples of the block size are quantized as one concatenated vector, which cuts
    blocks at the same places and so gives the same codes (without double quantization, whose
    offset is a mean over the whole tensor)."""
    import pandas as pd

    if isinstance(tensors, torch.Tensor):
        tensors = {"tensor": tensors}
    rows = []
    for blocksize in blocksizes:
        groups = list(tensors.values())
        if not double_quant and all(x.numel() % blocksize == 0 for x in groups):
            groups = [torch.cat([x.reshape(-1) for x in groups])]
        for quant_type in quant_types:
            sq = ab = ma = count = 0.0
            for x in groups:
                err = (roundtrip(x, quant_type, blocksize, double_quant).double() - x.double())
                sq += err.pow(2).sum().item()
                ab += err.abs().sum().item()
                ma = max(ma, err.abs().max().item())
                count += x.numel()
            row = {"blocksize": blocksize, "quant_type": quant_type, "mse": sq / count, "mean_abs": ab / count,
                   "max_abs": ma}
            rows.append({k: row[k] for k in ("blocksize", "quant_type", *metrics)})
    return pd.DataFrame(rows)
