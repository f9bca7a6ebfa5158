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

The allocator owns the run's facts: the schedule, the step counter :attr:`RankAllocator.step`, the
rank pattern, the mask history and the scorer's EMAs. A call out of order (a step skipped, repeated or
past ``total_step``) is refused; :meth:`RankAllocator.check_run` refuses a training loop whose length
is not ``total_step``; :meth:`RankAllocator.state_dict` / :meth:`RankAllocator.load_state_dict` carry all
of it through a checkpoint so a resumed run equals the straight one bit for bit.

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
from .schedule import budget_schedule, check_loop_length, check_schedule, phase

PARTS = ("lora_A", "lora_B", "lora_E")  # Q, P, Lambda: PEFT's parameter order


class TripletScorer(Protocol):
    """What :class:`RankAllocator` needs from a scoring rule."""

    def update(self, layers: dict[str, SVDLinear]) -> None: ...

    def triplet_scores(self, layers: dict[str, SVDLinear]) -> dict[str, torch.Tensor]: ...

    def reset(self) -> None: ...

    # Optional, needed to checkpoint the allocator: state_dict() -> dict, load_state_dict(dict) -> None


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

    def state_dict(self) -> dict:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state)


class RankAllocator:
    """AdaLoRA's allocation loop over a model's SVDLinear layers (PEFT ``RankAllocator`` + model logic).

    ``target_r`` is the *average* final rank: b(T) = ``target_r`` x number of layers, b(0) = the
    sum of the layers' ``init_r``; b(T) must be below b(0). Other arguments are PEFT ``AdaLoraConfig``'s,
    same meaning; ``total_step`` counts optimizer steps.
    """

    def __init__(self, model: nn.Module, *, target_r: int = 8, tinit: int = 0, tfinal: int = 0, deltaT: int = 1,
                 total_step: int | None = None, beta1: float = BETA_DEFAULT, beta2: float = BETA_DEFAULT,
                 scorer: TripletScorer | None = None):
        self.layers = adalora_layers(model)
        if not isinstance(target_r, int) or isinstance(target_r, bool) or target_r < 1:
            raise ValueError(f"target_r must be a positive integer below init_r (the average final rank), got "
                             f"{target_r!r}")
        self.init_budget = sum(layer.init_r for layer in self.layers.values())
        self.target_budget = target_r * len(self.layers)
        self.tinit, self.tfinal, self.deltaT, self.total_step = tinit, tfinal, deltaT, total_step
        check_schedule(init_budget=self.init_budget, target_budget=self.target_budget, tinit=tinit,
                       tfinal=tfinal, total_step=total_step, deltaT=deltaT)
        self.scorer = scorer if scorer is not None else TripletImportance(beta1, beta2)
        self.step = 0  # update_and_allocate calls done = the next global_step expected
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
        """One allocation step; ``global_step`` counts optimizer steps from 0 (PEFT's convention).

        Raises ``ValueError`` unless ``global_step`` is :attr:`step`, the next step of this run (PEFT
        accepts any value and silently skips or repeats EMA updates), or when it reaches ``total_step``.
        """
        if global_step != self.step:
            raise ValueError(f"update_and_allocate got global_step={global_step} but this allocator has done "
                             f"{self.step} steps, so it expects global_step={self.step}: call it once per "
                             "optimizer step, counting from 0; to resume a run, load_state_dict() the allocator "
                             "state saved at that step first")
        if global_step >= self.total_step:
            raise ValueError(f"global_step={global_step} is past the schedule's total_step={self.total_step} "
                             "(steps 0 .. total_step - 1): set total_step to the number of optimizer steps of the "
                             "whole run")
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
        self.step += 1

    def after_step(self, step: int, model: nn.Module | None = None) -> None:
        """Hook for :func:`companion.train.train` (``after_step=``), whose steps count from 1."""
        self.update_and_allocate(step - 1)

    def check_run(self, *, max_steps: int, grad_accum: int = 1, resume_from_step: int = 0) -> None:
        """Refuse a training loop that does not fit this schedule, before its first step.

        The loop runs optimizer steps ``resume_from_step + 1 .. max_steps`` of ``grad_accum`` micro-batches
        each; :func:`companion.train.train` and :class:`.callback.AdaLoraCallback` call this. ``max_steps``
        must equal ``total_step`` and ``resume_from_step`` the steps this allocator has done.
        """
        check_loop_length(total_step=self.total_step, tfinal=self.tfinal, max_steps=max_steps,
                          grad_accum=grad_accum)
        if self.step == resume_from_step:
            return
        if resume_from_step == 0:
            raise ValueError(f"this RankAllocator has already done {self.step} of its total_step={self.total_step} "
                             "steps, but the training loop starts from step 0: to continue that run, resume it "
                             f"(train(): TrainConfig(max_steps={self.total_step}, resume_from_step={self.step}); "
                             "Trainer: resume_from_checkpoint); for a new run inject fresh adapters and build a "
                             "new RankAllocator")
        raise ValueError(f"the training loop resumes after step {resume_from_step} but this RankAllocator has done "
                         f"{self.step} steps: load_state_dict() the allocator state saved with that checkpoint "
                         "(a fresh allocator would restart the importance EMAs and the rank pattern)")

    def _settings(self) -> dict:
        return dict(init_budget=self.init_budget, target_budget=self.target_budget, tinit=self.tinit,
                    tfinal=self.tfinal, deltaT=self.deltaT, total_step=self.total_step)

    def _layer_shapes(self) -> dict[str, list[int]]:
        return {n: [m.init_r, m.in_features, m.out_features] for n, m in self.layers.items()}

    def check_checkpointable(self) -> None:
        """Raise ``TypeError`` when the scorer cannot save and restore its statistics."""
        if not all(callable(getattr(self.scorer, m, None)) for m in ("state_dict", "load_state_dict")):
            raise TypeError(f"the scorer {type(self.scorer).__name__} has no state_dict()/load_state_dict(), so "
                            "its statistics cannot be checkpointed and a resumed run would restart them: use the "
                            "default TripletImportance scorer, or train without checkpoints")

    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the model and optimizer: step, rank pattern, history,
        the scorer's statistics (importance EMAs), and the settings and layers they belong to.

        Plain tensors, numbers and strings: ``torch.save`` it and ``torch.load`` it with the default
        ``weights_only=True``. Raises ``TypeError`` for a scorer without ``state_dict()``.
        """
        self.check_checkpointable()
        pattern = None if self.rank_pattern is None else {n: k.clone() for n, k in self.rank_pattern.items()}
        return {"step": self.step, "settings": self._settings(), "layers": self._layer_shapes(),
                "rank_pattern": pattern, "history": [dict(row) for row in self.history],
                "scorer": self.scorer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` into an allocator built with the same settings on the same layers.

        Raises ``ValueError`` (and changes nothing) when the saved settings or layers differ.
        """
        self.check_checkpointable()
        missing = [k for k in ("step", "settings", "layers", "rank_pattern", "history", "scorer") if k not in state]
        if missing:
            raise ValueError(f"not a RankAllocator state_dict: missing {missing}")
        ours = self._settings()
        diff = {k: (state["settings"].get(k), v) for k, v in ours.items() if state["settings"].get(k) != v}
        if diff:
            saved = ", ".join(f"{k}={s}" for k, (s, _) in diff.items())
            here = ", ".join(f"{k}={v}" for k, (_, v) in diff.items())
            raise ValueError(f"the saved allocator state was written with {saved} but this RankAllocator has {here}: "
                             "build it with the checkpoint's target_r, tinit, tfinal, deltaT and total_step "
                             "(a resumed run keeps its schedule)")
        saved_layers, layers = state["layers"], self._layer_shapes()
        if saved_layers != layers:
            only_saved = sorted(set(saved_layers) - set(layers))[:3]
            only_here = sorted(set(layers) - set(saved_layers))[:3]
            changed = [n for n in set(layers) & set(saved_layers) if list(saved_layers[n]) != layers[n]][:3]
            raise ValueError(f"the saved allocator state belongs to other adapters: only in the checkpoint "
                             f"{only_saved}, only in this model {only_here}, different [init_r, in, out] "
                             f"{changed}; inject_adalora with the checkpoint's target_modules and init_r")
        if not 0 <= state["step"] <= self.total_step:
            raise ValueError(f"saved step {state['step']} is outside [0, total_step={self.total_step}]")
        self.scorer.load_state_dict(state["scorer"])
        self.step = state["step"]
        device = {n: m.lora_E.device for n, m in self.layers.items()}
        self.rank_pattern = (None if state["rank_pattern"] is None
                             else {n: k.to(device[n]).clone() for n, k in state["rank_pattern"].items()})
        self.history = [dict(row) for row in state["history"]]

    def ranks(self) -> dict[str, int]:
        """Current rank of every layer: its number of non-zero lambda."""
        return {name: layer.effective_rank for name, layer in self.layers.items()}

    def history_frame(self) -> pd.DataFrame:
        """Mask events: step, budget, kept, phase, then one column of ranks per layer."""
        return pd.DataFrame(self.history)
