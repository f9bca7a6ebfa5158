"""PiSSA: put the adapter on the principal singular directions of W and freeze the rest.

Meng, Wang & Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
Language Models" (NeurIPS 2024, arXiv:2404.02948), §3: with the SVD ``W = U S V^T`` of a frozen
weight (out, in), the adapter starts as the top-r part and the base keeps the residual:

    A = sqrt(S_r) V_r^T            (r, in)     PEFT lora_A
    B = U_r sqrt(S_r)              (out, r)    PEFT lora_B
    W_res = W - U_r S_r V_r^T      (out, in)   the new frozen base weight

so ``W_res + B A = W`` and the model is unchanged at step 0, but training moves the directions that
carry most of ``||W||_F`` instead of a zero-initialised update. PEFT multiplies ``B A`` by its LoRA
scaling ``s = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rslora), so it first divides ``S_r``
by ``s``: ``B A = U_r S_r V_r^T / s`` and ``W_res = W - s B A``. :func:`pissa_init` reproduces
``peft.tuners.lora.layer.LoraLayer.pissa_init(adapter_name, "pissa")`` op for op (full SVD in
float32, no ``fan_in_fan_out`` transpose: pass the weight in (out, in) layout). The fast variant
``init_lora_weights="pissa_niter_K"`` (randomised ``svd_lowrank``) is out of scope. With a 16-bit base,
``get_peft_model`` afterwards moves the float32 factors to the base dtype and back to float32
(``autocast_adapter_dtype``), so PEFT's trained factors are the 16-bit roundings of these; the
residual is the same.

This is the initialisation that the source tutorial attributes to AdaLoRA. AdaLoRA (Zhang et al.
2023, §3.1) never takes an SVD of W: it starts with ``Lambda = 0`` and random ``P``, ``Q`` and keeps
them near-orthogonal with a regulariser while training.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what PEFT's pissa_init accepts


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (out, in) matrix, got shape {tuple(weight.shape)}; "
                         "PiSSA here covers linear layers (pass layer.weight)")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be float32, float16 or bfloat16 (as in PEFT), got {weight.dtype}; "
                        "dequantize a quantized weight first, then quantize the residual")


def pissa_init(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B, residual)`` for ``weight`` (out, in); PEFT ``LoraLayer.pissa_init(..., "pissa")``.

    ``scaling`` is PEFT's LoRA scaling (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
    ``use_rslora``). ``lora_A`` (r, in) and ``lora_B`` (out, r) are float32; ``residual`` has the
    dtype of ``weight``. ``residual + scaling * lora_B @ lora_A`` reconstructs ``weight`` up to
    float32 rounding (and the rounding of the residual to a 16-bit dtype).
    """
    _check_weight(weight)
    if not isinstance(r, int) or not 1 <= r <= min(weight.shape):
        raise ValueError(f"r must be an integer in [1, min(out, in)] = [1, {min(weight.shape)}], got {r!r}")
    if scaling <= 0:
        raise ValueError(f"scaling must be > 0 (lora_alpha / r), got {scaling}")
    dtype = weight.dtype
    weight = weight.detach().to(torch.float32)  # (out, in)
    # PEFT's names: V, S, Uh = svd(W) with W = V S Uh, i.e. V holds the left singular vectors.
    V, S, Uh = torch.linalg.svd(weight, full_matrices=False)  # (out, k), (k,), (k, in), k = min(out, in)
    Vr = V[:, :r]  # (out, r)
    Sr = S[:r]  # (r,), a view of S
    Sr /= scaling  # B A = U_r S_r V_r^T / scaling, so that scaling * B A is the principal part
    Uhr = Uh[:r]  # (r, in)
    lora_A = torch.diag(torch.sqrt(Sr)) @ Uhr  # (r, r) @ (r, in) -> (r, in)
    lora_B = Vr @ torch.diag(torch.sqrt(Sr))  # (out, r) @ (r, r) -> (out, r)
    residual = weight - scaling * lora_B @ lora_A  # (out, in)
    return lora_A, lora_B, residual.to(dtype)


def principal_energy(weight: torch.Tensor, r: int) -> float:
    """Share of ``||W||_F^2 = sum_i s_i^2`` held by the top-r singular values: what PiSSA's adapter starts with."""
    _check_weight(weight)
    if not isinstance(r, int) or not 1 <= r <= min(weight.shape):
        raise ValueError(f"r must be an integer in [1, min(out, in)] = [1, {min(weight.shape)}], got {r!r}")
    s2 = torch.linalg.svdvals(weight.detach().float()) ** 2  # (k,), descending
    return float(s2[:r].sum() / s2.sum())
