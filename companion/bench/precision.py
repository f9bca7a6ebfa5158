"""Full fine-tuning of a model loaded in 16 bit: mixed precision, as ``transformers.Trainer`` trains it.

A causal LM loaded in float16 or bfloat16 and trained with plain ``torch.optim.AdamW`` does not train:

- **float16**: AdamW's ``eps = 1e-8`` rounds to 0 in float16 (its smallest subnormal is 6e-8), and so does
  ``v = g^2`` for any gradient below about 2e-4. An entry with a zero gradient (every embedding row
  of a token that is not in the batch) then updates by ``m / (sqrt(v) + eps) = 0 / 0``: the weights turn
  NaN after the first step, and the loss from the second.
- **bfloat16**: 8 significant bits, so a weight of 0.01 moves in steps of 2^-14 = 6.1e-5; an Adam step of
  ``lr = 2e-5`` (each entry moves by about lr) is less than half of that and rounds away. Most weights never move.

The recipe of Micikevicius et al. (2018, *Mixed Precision Training*) keeps **float32 master weights** that
the optimizer updates, runs the forward pass under ``torch.autocast`` in the 16-bit compute dtype, and for
float16 scales the loss before the backward pass so that small gradients do not underflow, unscaling
them before clipping and skipping a step whose gradients overflowed (**dynamic loss scaling**,
``torch.amp.GradScaler``). ``transformers.Trainer`` with ``fp16=True`` / ``bf16=True`` does the same
through accelerate (``Accelerator.prepare_model`` wraps ``model.forward`` in autocast; ``backward``
scales; ``clip_grad_norm_`` unscales first; the optimizer step goes through ``GradScaler.step``/``update``).

:func:`mixed_precision_full_finetuning` builds that arm from the hooks of :func:`companion.train.train`:
``forward`` under autocast, a gradient hook on the returned loss that multiplies by the scale
(``GradScaler.scale``, without changing the logged loss), ``GradScaler.unscale_`` in ``after_backward``
(before the loop clips), a skipped step when the unscaled gradients are not finite, and
``GradScaler.update`` in ``after_step``. On the same inputs its weights equal those of the canonical
``torch.amp`` loop bit for bit (``tests/test_full_ft_precision.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adalora import PreparedRun

HALF_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype_of(model: nn.Module) -> torch.dtype | None:
    """The 16-bit dtype a model was loaded in (float16 or bfloat16), or None when its floating
    parameters are all float32 (then full fine-tuning needs no mixed precision)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    half = dtypes & set(HALF_DTYPES)
    if len(half) > 1:
        raise ValueError(f"the model mixes float16 and bfloat16 parameters ({sorted(map(str, dtypes))}); load it in "
                         "one compute dtype (dtype=torch.float16 on a T4, torch.bfloat16 on Ampere or newer)")
    return half.pop() if half else None


@dataclass
class MixedPrecision:
    """The state of one mixed-precision run: the compute dtype, the loss scaler (disabled for bfloat16,
    whose float32 exponent range does not underflow), and how many steps were skipped for overflow."""

    optimizer: torch.optim.Optimizer
    compute_dtype: torch.dtype
    scaler: torch.amp.GradScaler
    skipped_steps: list[int] = field(default_factory=list)

    def after_backward(self, step: int, model: nn.Module) -> None:
        """Unscale the gradients in place before the loop clips them (``GradScaler.unscale_``); if any is
        inf or NaN, drop them all, so that the loop's ``optimizer.step()`` changes nothing (AdamW skips
        parameters without a gradient), as ``GradScaler.step`` would skip it."""
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps.append(step)

    def after_step(self, step: int, model: nn.Module) -> None:
        """Halve the scale after an overflow, double it after ``growth_interval`` clean steps
        (``GradScaler.update``)."""
        self.scaler.update()


def _autocast_forward(forward, device_type: str, dtype: torch.dtype, scaler: torch.amp.GradScaler):
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            output = forward(*args, **kwargs)
        loss = getattr(output, "loss", None)
        if scaler.is_enabled() and loss is not None and loss.requires_grad:
            loss.register_hook(scaler.scale)  # backward sees loss * scale; the value (and the log) stays the loss
        return output

    return wrapped


def mixed_precision_full_finetuning(model: nn.Module, lr: float, compute_dtype: torch.dtype,
                                    init_scale: float = 2.0**16) -> tuple[PreparedRun, MixedPrecision]:
    """Turn ``model`` (loaded in any dtype) into a mixed-precision full fine-tuning arm.

    Casts every floating parameter and buffer to float32 (the master weights: 4 bytes per parameter, as
    ``Trainer`` requires for ``fp16=True``), wraps ``model.forward`` in ``torch.autocast(compute_dtype)``
    (for evaluation and generation too, as accelerate does), and returns a :class:`PreparedRun` whose
    ``torch.optim.AdamW`` updates the float32 weights and whose hooks do the loss scaling for float16
    (``init_scale`` is ``GradScaler``'s default, 2^16). Raises ``ValueError`` for a ``compute_dtype``
    other than float16 or bfloat16.
    """
    if compute_dtype not in HALF_DTYPES:
        raise ValueError(f"compute_dtype must be torch.float16 or torch.bfloat16, got {compute_dtype}; a float32 "
                         "model needs no mixed precision: train it as it is")
    device = next(model.parameters()).device
    model.float()
    for p in model.parameters():
        p.requires_grad = True
    scaler = torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=compute_dtype == torch.float16)
    model.forward = _autocast_forward(model.forward, device.type, compute_dtype, scaler)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    state = MixedPrecision(optimizer, compute_dtype, scaler)
    return PreparedRun(model, optimizer, after_backward=state.after_backward, after_step=state.after_step), state
