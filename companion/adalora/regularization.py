"""The orthogonality regulariser that keeps P and Q close to singular vectors.

Paper Eq. 4:  ``R(P, Q) = ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2``, added to the loss as
``gamma * sum_k R(P_k, Q_k)`` with ``gamma`` from {0.1, 0.3, 0.5} (paper §4.1).

PEFT (``AdaLoraModel.forward``) and the authors' ``compute_orth_regu`` use another form: the
*plain* Frobenius norm, *averaged* over all ``lora_A`` and ``lora_B`` matrices,

    R_peft = 1/(2n) * sum_k ( ||Q_k Q_k^T - I||_F + ||P_k^T P_k - I||_F ),

times ``orth_reg_weight`` (default 0.5). :func:`orthogonal_regularization` gives PEFT's form by
default and Eq. 4 with ``squared=True, mean=False``. Like PEFT, :func:`add_orthogonal_regularization`
adds the term only when the model returns a tensor ``loss`` (so never at inference).
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import adalora_layers


def _deviation(cov: torch.Tensor) -> torch.Tensor:
    """||cov - I||_F for a square (r, r) matrix."""
    eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
    return torch.norm(cov - eye, p="fro")


def orthogonality_deviations(P: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||P^T P - I||_F, ||Q Q^T - I||_F)`` for P (d_out, r) and Q (r, d_in)."""
    return _deviation(P.T @ P), _deviation(Q @ Q.T)  # (r, d_out) @ (d_out, r), (r, d_in) @ (d_in, r)


def orthogonal_regularization(pairs: list[tuple[torch.Tensor, torch.Tensor]], squared: bool = False,
                              mean: bool = True) -> torch.Tensor:
    """The regulariser over ``[(P, Q), ...]``; defaults: PEFT's form, ``squared=True, mean=False``: Eq. 4.

    Terms are added in PEFT's order (for each layer ``Q`` = ``lora_A``, then ``P`` = ``lora_B``)
    so that the PEFT form matches PEFT's value bit for bit.
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("orthogonal_regularization needs at least one (P, Q) pair, e.g. "
                         "[(layer.lora_B, layer.lora_A) for layer in adalora_layers(model).values()]")
    total = 0
    for P, Q in pairs:
        if P.dim() != 2 or Q.dim() != 2 or P.shape[1] != Q.shape[0]:
            raise ValueError(f"expected P (d_out, r) and Q (r, d_in) with the same r, got {tuple(P.shape)} "
                             f"and {tuple(Q.shape)}; pass (lora_B, lora_A), in that order")
        dev_P, dev_Q = orthogonality_deviations(P, Q)
        if squared:
            dev_P, dev_Q = dev_P ** 2, dev_Q ** 2
        total = total + dev_Q + dev_P
    return total / (2 * len(pairs)) if mean else total


def adalora_pairs(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(P, Q), ...]`` = ``[(lora_B, lora_A), ...]`` of every SVDLinear of ``model``."""
    return [(m.lora_B, m.lora_A) for m in adalora_layers(model).values()]


def add_orthogonal_regularization(model: nn.Module, orth_reg_weight: float = 0.5,
                                  squared: bool = False, mean: bool = True):
    """Make ``model(...).loss`` include ``orth_reg_weight * R`` (PEFT ``AdaLoraModel.forward``).

    Installs a forward hook on ``model`` and returns its handle (``handle.remove()`` undoes it).
    The hook acts only when the output has a tensor ``loss``, i.e. when labels were passed.
    """
    if not isinstance(orth_reg_weight, (int, float)) or orth_reg_weight < 0:
        raise ValueError(f"orth_reg_weight must be >= 0 (0 switches the regulariser off), got {orth_reg_weight!r}")
    pairs = adalora_pairs(model)

    def hook(module, args, outputs):
        loss = getattr(outputs, "loss", None)
        if isinstance(loss, torch.Tensor) and orth_reg_weight > 0:  # adding 0 * R changes nothing
            outputs.loss = loss + orth_reg_weight * orthogonal_regularization(pairs, squared, mean)
        return outputs

    return model.register_forward_hook(hook)
