"""Element-wise importance of adapter entries: sensitivity, uncertainty and their product.

Paper §3.2 (PLATON's score, Zhang et al. 2022), for every entry ``w`` of ``P``, ``Lambda``, ``Q``:

* Eq. 10, sensitivity:   ``I(t) = |w * dL/dw|``
* Eq. 11, smoothed:      ``I_bar(t) = beta1 * I_bar(t-1) + (1 - beta1) * I(t)``
* Eq. 12, uncertainty:   ``U_bar(t) = beta2 * U_bar(t-1) + (1 - beta2) * |I(t) - I_bar(t)|``
* Eq. 13, score:         ``s(t) = I_bar(t) * U_bar(t)``

:class:`ImportanceTracker` computes exactly what PEFT's ``RankAllocator.update_ipt`` and
``RankAllocator._element_score`` compute, in the same order of floating-point operations, so
the two agree bit for bit on the same tensors. Both EMAs start at zero, so after the first
update ``I_bar = (1 - beta1) I`` and ``U_bar = (1 - beta2) |I - I_bar|``.

When to call it: PEFT (and the authors' trainer) score *after* ``optimizer.step()`` and before
``optimizer.zero_grad()``, so ``w`` is the updated weight and ``dL/dw`` the gradient of the step
just taken. The paper's Algorithm 1 computes ``I(t)`` before the update; we follow the code.
"""

from __future__ import annotations

import torch

BETA_DEFAULT = 0.85  # paper §4.1 ("default value"), PEFT AdaLoraConfig, the authors' scripts
STATS = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # PEFT RankAllocator's names


def check_beta(name: str, value: float) -> float:
    """Return ``value`` if it lies strictly inside (0, 1), else raise ``ValueError``."""
    if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1 (it is an EMA coefficient; the paper "
                         f"and PEFT use 0.85), got {value!r}")
    return float(value)


class ImportanceTracker:
    """EMA statistics per named tensor; ``ipt``, ``exp_avg_ipt`` and ``exp_avg_unc`` as in PEFT."""

    def __init__(self, beta1: float = BETA_DEFAULT, beta2: float = BETA_DEFAULT):
        self.beta1 = check_beta("beta1", beta1)
        self.beta2 = check_beta("beta2", beta2)
        self.reset()

    def reset(self) -> None:
        """Forget all statistics (PEFT ``reset_ipt``, called when the rank pattern is frozen)."""
        self.ipt: dict[str, torch.Tensor] = {}  # I(t), Eq. 10
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}  # I_bar(t), Eq. 11
        self.exp_avg_unc: dict[str, torch.Tensor] = {}  # U_bar(t), Eq. 12

    def __contains__(self, name: str) -> bool:
        return name in self.exp_avg_ipt

    def state_dict(self) -> dict:
        """The betas and copies of ``ipt``, ``exp_avg_ipt``, ``exp_avg_unc`` (PEFT's RankAllocator keeps
        them in memory only, so a resumed PEFT run restarts them at zero)."""
        return {"beta1": self.beta1, "beta2": self.beta2,
                **{key: {n: t.clone() for n, t in getattr(self, key).items()} for key in STATS}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; refuse different betas (the EMAs would mean something else)."""
        missing = [k for k in ("beta1", "beta2", *STATS) if k not in state]
        if missing:
            raise ValueError(f"not an ImportanceTracker state_dict: missing {missing}")
        if (state["beta1"], state["beta2"]) != (self.beta1, self.beta2):
            raise ValueError(f"the saved importance EMAs use beta1={state['beta1']}, beta2={state['beta2']} but "
                             f"this tracker has beta1={self.beta1}, beta2={self.beta2}: build it with the saved "
                             "betas to resume the run")
        for key in STATS:
            setattr(self, key, {n: t.clone() for n, t in state[key].items()})

    @torch.no_grad()
    def update(self, name: str, param: torch.Tensor, grad: torch.Tensor | None) -> None:
        """Fold one step's ``|param * grad|`` into the EMAs of ``name`` (PEFT ``update_ipt``)."""
        if grad is None:
            raise ValueError(
                f"{name} has no gradient (grad is None). Importance needs dL/dw: call the update after "
                "loss.backward() and optimizer.step() but before optimizer.zero_grad(), which sets "
                "gradients to None; with HF Trainer use the on_optimizer_step callback")
        if grad.shape != param.shape:
            raise ValueError(f"{name}: gradient shape {tuple(grad.shape)} differs from parameter shape "
                             f"{tuple(param.shape)}; pass the parameter's own .grad")
        if name not in self.exp_avg_ipt:
            self.exp_avg_ipt[name] = torch.zeros_like(param)
            self.exp_avg_unc[name] = torch.zeros_like(param)
        ipt = (param * grad).abs().detach()  # Eq. 10
        self.ipt[name] = ipt
        self.exp_avg_ipt[name] = self.beta1 * self.exp_avg_ipt[name] + (1 - self.beta1) * ipt  # Eq. 11
        self.exp_avg_unc[name] = (self.beta2 * self.exp_avg_unc[name]
                                  + (1 - self.beta2) * (ipt - self.exp_avg_ipt[name]).abs())  # Eq. 12

    def _check(self, name: str) -> None:
        if name not in self.exp_avg_ipt:
            raise ValueError(f"no importance statistics for {name!r} yet; call update({name!r}, param, grad) "
                             f"first (known: {sorted(self.exp_avg_ipt)[:5]})")

    def sensitivity(self, name: str) -> torch.Tensor:
        """Smoothed sensitivity I_bar (Eq. 11), same shape as the parameter."""
        self._check(name)
        return self.exp_avg_ipt[name]

    def uncertainty(self, name: str) -> torch.Tensor:
        """Uncertainty U_bar (Eq. 12), same shape as the parameter."""
        self._check(name)
        return self.exp_avg_unc[name]

    def score(self, name: str) -> torch.Tensor:
        """Element score s = I_bar * U_bar (Eq. 13; PEFT ``_element_score``)."""
        self._check(name)
        return self.exp_avg_ipt[name] * self.exp_avg_unc[name]
