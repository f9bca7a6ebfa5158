"""The training-time allocator: score, schedule, mask, then freeze the rank pattern.

:class:`RankAllocator` runs AdaLoRA's whole loop on the :class:`~.layer.SVDLinear` layers of a
model, step for step as PEFT's ``AdaLoraModel.update_and_allocate(global_step)`` does:

=================================  ==========================================================
``global_step``                    action
=================================  ==========================================================
``< total_step - tfinal``          update the importance EMAs; when the schedule says so
                                   (``step % deltaT == 0`` after ``tinit``), mask to b(t)
``== total_step - tfinal``         no update; a forced mask at the target budget b(T) becomes
                                   the final rank pattern; the statistics are reset
``> total_step - tfinal``          re-apply the frozen pattern (Adam would revive the zeroed
                                   lambda otherwise)
=================================  ==========================================================

Call it after ``optimizer.step()`` and before ``optimizer.zero_grad()``, with ``global_step``
counting optimizer steps from 0. Masks are recomputed from the current scores at every mask
event, so a triplet masked earlier can come back, and between two mask events the optimizer
may move a zeroed lambda again (the paper's "reactivation", §3.1).

How triplets are scored is pluggable (``scorer=``): the default is the paper's
(:class:`TripletImportance`); :mod:`.seed_variants` has the source tutorial's for the ablation.
"""

from __future__ import annotations

from typing import Protocol

import pandas as pd
import torch
from torch import nn

from .importance import BETA_DEFAULT, ImportanceTracker
from .layer import SVDLinear, adalora_layers
from .masking import mask_to_budget, triplet_score
from .schedule import budget_schedule, check_schedule, phase

PARTS = ("lora_A", "lora_B", "lora_E")  # Q, P, Lambda: PEFT's parameter order


class TripletScorer(Protocol):
    """What :class:`RankAllocator` needs from a scoring rule."""

    def update(self, layers: dict[str, SVDLinear]) -> None: ...

    def triplet_scores(self, layers: dict[str, SVDLinear]) -> dict[str, torch.Tensor]: ...

    def reset(self) -> None: ...


class TripletImportance:
    """The paper's score: element EMAs (Eq. 10-13) of P, Lambda, Q combined per triplet (Eq. 9).

    A frozen part (``requires_grad=False``, as in the tutorial's SVD variant) contributes 0.
    """

    def __init__(self, beta1: float = BETA_DEFAULT, beta2: float = BETA_DEFAULT):
        self.tracker = ImportanceTracker(beta1, beta2)

    def update(self, layers: dict[str, SVDLinear]) -> None:
        for name, layer in layers.items():
            for part in PARTS:
                p = getattr(layer, part)
                if p.requires_grad:
                    self.tracker.update(f"{name}.{part}", p, p.grad)

    def _score(self, name: str, layer: SVDLinear, part: str) -> torch.Tensor:
        p = getattr(layer, part)
        return self.tracker.score(f"{name}.{part}") if p.requires_grad else torch.zeros_like(p)

    def triplet_scores(self, layers: dict[str, SVDLinear]) -> dict[str, torch.Tensor]:
        return {name: triplet_score(self._score(name, layer, "lora_B"), self._score(name, layer, "lora_E"),
                                    self._score(name, layer, "lora_A"))
                for name, layer in layers.items()}

    def reset(self) -> None:
        self.tracker.reset()


class RankAllocator:
    """AdaLoRA's allocation loop over a model's SVDLinear layers (PEFT ``RankAllocator`` + model logic).

    ``target_r`` is the *average* final rank: b(T) = ``target_r`` x number of layers, b(0) = the
    sum of the layers' ``init_r``. Other arguments are PEFT ``AdaLoraConfig``'s, same meaning.
    """

    def __init__(self, model: nn.Module, *, target_r: int = 8, tinit: int = 0, tfinal: int = 0, deltaT: int = 1,
                 total_step: int | None = None, beta1: float = BETA_DEFAULT, beta2: float = BETA_DEFAULT,
                 scorer: TripletScorer | None = None):
        self.layers = adalora_layers(model)
        init_r = max(layer.init_r for layer in self.layers.values())
        if not isinstance(target_r, int) or not 1 <= target_r <= init_r:
            raise ValueError(f"target_r must be an integer between 1 and init_r = {init_r}, got {target_r!r}: "
                             "AdaLoRA starts at init_r and only removes ranks")
        self.init_budget = sum(layer.init_r for layer in self.layers.values())
        self.target_budget = target_r * len(self.layers)
        self.tinit, self.tfinal, self.deltaT, self.total_step = tinit, tfinal, deltaT, total_step
        check_schedule(init_budget=self.init_budget, target_budget=self.target_budget, tinit=tinit,
                       tfinal=tfinal, total_step=total_step, deltaT=deltaT)
        self.scorer = scorer if scorer is not None else TripletImportance(beta1, beta2)
        self.rank_pattern: dict[str, torch.Tensor] | None = None  # last mask, True = kept
        self.history: list[dict] = []  # one row per mask event

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(b(step), mask_now)``, :func:`.schedule.budget_schedule` with this run's settings."""
        return budget_schedule(step, init_budget=self.init_budget, target_budget=self.target_budget,
                               tinit=self.tinit, tfinal=self.tfinal, total_step=self.total_step,
                               deltaT=self.deltaT)

    @torch.no_grad()
    def _apply(self, pattern: dict[str, torch.Tensor]) -> None:
        for name, keep in pattern.items():
            self.layers[name].lora_E.masked_fill_(~keep.view(-1, 1), 0.0)  # (r, 1): zero masked lambda

    def _mask(self, step: int, budget: int) -> None:
        self.rank_pattern = mask_to_budget(self.scorer.triplet_scores(self.layers), budget)
        self._apply(self.rank_pattern)
        ranks = {name: int(keep.sum()) for name, keep in self.rank_pattern.items()}
        self.history.append({"step": step, "budget": budget, "kept": sum(ranks.values()),
                             "phase": phase(step, tinit=self.tinit, tfinal=self.tfinal,
                                            total_step=self.total_step), **ranks})

    def update_and_allocate(self, global_step: int) -> None:
        """One allocation step; ``global_step`` counts optimizer steps from 0 (PEFT's convention)."""
        freeze_at = self.total_step - self.tfinal
        if global_step < freeze_at:
            self.scorer.update(self.layers)
            budget, mask_now = self.budget_schedule(global_step)
            if mask_now:
                self._mask(global_step, budget)
        elif global_step == freeze_at:  # final allocation at b(T); the pattern is frozen from here
            self._mask(global_step, self.target_budget)
            self.scorer.reset()
        elif self.rank_pattern is not None:
            self._apply(self.rank_pattern)

    def after_step(self, step: int, model: nn.Module | None = None) -> None:
        """Hook for :func:`companion.train.train` (``after_step=``), whose steps count from 1."""
        self.update_and_allocate(step - 1)

    def ranks(self) -> dict[str, int]:
        """Current rank of every layer: its number of non-zero lambda."""
        return {name: layer.effective_rank for name, layer in self.layers.items()}

    def history_frame(self) -> pd.DataFrame:
        """Mask events: step, budget, kept, phase, then one column of ranks per layer."""
        return pd.DataFrame(self.history)
