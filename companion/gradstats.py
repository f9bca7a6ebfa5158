"""Gradient statistics of adapter parameters during training (Chapter 1).

The source tutorial claims that most LoRA parameters have gradients "near machine
zero" and so waste compute. :class:`GradNormRecorder` measures this instead of
asserting it: after each backward pass it records

* the L2 norm of every selected parameter's gradient (one row per tensor and step),
* the fraction of individual gradient entries whose magnitude is below each of a
  fixed grid of thresholds, and
* the running maximum of ``|grad|`` per entry, which tells whether an entry stayed
  below a threshold *throughout* training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch

DEFAULT_THRESHOLDS = tuple(10.0 ** e for e in range(-10, 1))  # 1e-10 ... 1


def is_lora_param(name: str) -> bool:
    """PEFT names LoRA factors ``...lora_A.default.weight`` / ``...lora_B.default.weight``."""
    return "lora_A" in name or "lora_B" in name


def fraction_below(values: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Fraction of ``values`` strictly below each threshold: (n,), (t,) -> (t,) float64."""
    flat = values.detach().reshape(-1).double()
    if flat.numel() == 0:
        raise ValueError("fraction_below needs at least one value, got an empty tensor")
    limits = torch.as_tensor(thresholds, dtype=torch.float64)
    return (flat.unsqueeze(0) < limits.unsqueeze(1)).double().mean(1)  # (t, n) -> (t,)


class GradNormRecorder:
    """Record gradient statistics of the parameters selected by ``select(name)``.

    Call ``recorder(step)`` after ``loss.backward()`` and before ``optimizer.zero_grad()``
    (the training loop's ``after_backward`` hook does exactly that).
    """

    def __init__(self, model: torch.nn.Module, select: Callable[[str], bool] = is_lora_param,
                 thresholds: Sequence[float] = DEFAULT_THRESHOLDS):
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad and select(n)}
        if not self.params:
            raise ValueError("No trainable parameter matched `select`; did you wrap the model "
                             "with peft.get_peft_model before creating the recorder?")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.rows: list[dict] = []  # one per (step, tensor)
        self.fractions: list[torch.Tensor] = []  # one (t,) tensor per step
        self.steps: list[int] = []
        self.max_abs = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}

    def __call__(self, step: int, *_unused) -> None:
        grads = []
        for name, p in self.params.items():
            g = torch.zeros_like(p) if p.grad is None else p.grad.detach()
            g = g.float()
            self.rows.append({"step": step, "name": name, "norm": g.norm().item(), "numel": g.numel()})
            self.max_abs[name] = torch.maximum(self.max_abs[name], g.abs())
            grads.append(g.reshape(-1).abs())
        self.fractions.append(fraction_below(torch.cat(grads), self.thresholds))
        self.steps.append(step)

    def norms(self) -> pd.DataFrame:
        """Long table: step, name (parameter), norm, numel."""
        return pd.DataFrame(self.rows)

    def element_fractions(self) -> pd.DataFrame:
        """Rows = recorded steps, columns = thresholds: share of entries with ``|grad| < t``."""
        data = torch.stack(self.fractions).numpy()
        return pd.DataFrame(data, index=pd.Index(self.steps, name="step"), columns=self.thresholds)

    def always_below(self) -> pd.Series:
        """Per threshold: share of entries whose ``|grad|`` stayed below it at every recorded step."""
        peak = torch.cat([m.reshape(-1) for m in self.max_abs.values()])
        return pd.Series(fraction_below(peak, self.thresholds).numpy(), index=self.thresholds,
                         name="always_below")

    def module_fraction_below(self, threshold: float) -> pd.Series:
        """Per step: share of parameter tensors whose gradient norm is below ``threshold``."""
        df = self.norms()
        return (df["norm"] < threshold).groupby(df["step"]).mean().rename(f"norm<{threshold:g}")
