"""Run AdaLoRA's allocation inside a Hugging Face ``Trainer``.

Neither PEFT nor transformers calls ``update_and_allocate`` for you. Without it PEFT never
masks anything: ``config.rank_pattern`` stays ``None`` and the run is plain LoRA in SVD form
at ``init_r`` (peft#1327), with no error and no warning. :class:`AdaLoraCallback` makes the call
at ``on_optimizer_step``, which ``Trainer`` fires after ``optimizer.step()`` and before
``zero_grad()``, once per optimizer step, so gradient accumulation is handled and
``state.global_step`` is the 0-based optimizer step PEFT expects (it is incremented after
the callback). This is the callback PEFT's own GPU test uses
(``tests/test_gpu_examples.py::test_4bit_adalora_causalLM``).

It also keeps the run-level facts consistent, at ``on_train_begin``, before the first step:

* ``total_step`` must equal the Trainer's ``max_steps`` (optimizer steps, not micro-batches);
* a checkpoint carries the allocator's state: ``on_save`` writes :data:`STATE_NAME` next to the
  model in ``output_dir/checkpoint-{global_step}`` (a companion allocator's
  :meth:`~.allocator.RankAllocator.state_dict`; for PEFT the ``RankAllocator``'s importance EMAs and
  ``rank_pattern``, which PEFT does not save), and a resumed ``Trainer`` (``state.global_step > 0``)
  restores it, or raises when it is missing or belongs to another schedule;
* an allocator or PEFT model that already ran is refused for a new run from step 0.

PEFT 0.21.2 saves an AdaLoRA adapter cut to its rank pattern (``resize_state_dict_by_rank_pattern``),
so resuming a PEFT model from a checkpoint written after the first allocation fails inside
``Trainer._load_from_checkpoint`` (size mismatch), before any callback runs. Checkpoints of a
companion allocator keep every triplet and resume in every phase.
"""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback

from .importance import STATS
from .schedule import check_loop_length

STATE_NAME = "adalora_allocator.pt"  # next to the model in each Trainer checkpoint folder
PEFT_SETTINGS = ("target_r", "init_r", "tinit", "tfinal", "deltaT", "total_step", "beta1", "beta2")


def _allocation_target(obj):
    """The object whose ``update_and_allocate(global_step)`` runs the allocation."""
    base = getattr(obj, "base_model", None)  # PeftModel -> AdaLoraModel
    if base is not None and hasattr(base, "update_and_allocate") and hasattr(base, "peft_config"):
        return base
    if hasattr(obj, "update_and_allocate"):  # AdaLoraModel or companion RankAllocator
        return obj
    raise TypeError(f"AdaLoraCallback needs a PEFT AdaLoRA model (get_peft_model(model, AdaLoraConfig(...))) or a "
                    f"companion.adalora.RankAllocator, got {type(obj).__name__}")


class AdaLoraCallback(TrainerCallback):
    """``Trainer(..., callbacks=[AdaLoraCallback(model)])`` for a PEFT AdaLoRA model or a companion allocator.

    Raises ``ValueError`` at ``on_train_begin`` for a ``total_step`` other than the Trainer's
    ``max_steps``, a resume without the allocator state, or a target that already ran; ``TypeError``
    for a companion scorer that cannot be checkpointed when ``save_strategy`` is not ``"no"``.
    """

    def __init__(self, model_or_allocator):
        self.target = _allocation_target(model_or_allocator)
        self.is_peft = hasattr(self.target, "peft_config")
        self.calls = 0

    # ---------------------------------------------------------------- the two kinds of target
    def _config(self):
        return self.target.peft_config[self.target.trainable_adapter_name]

    def _state(self) -> dict:
        if not self.is_peft:
            return {"kind": "companion", "state": self.target.state_dict()}
        config, allocator = self._config(), self.target.rankallocator
        return {"kind": "peft", "settings": {k: getattr(config, k) for k in PEFT_SETTINGS},
                "rank_pattern": config.rank_pattern,
                **{key: {n: t.clone() for n, t in getattr(allocator, key).items()} for key in STATS}}

    def _load(self, saved: dict, path: str) -> None:
        kind = "peft" if self.is_peft else "companion"
        if saved.get("kind") != kind:
            raise ValueError(f"{path} holds the state of a {saved.get('kind')} allocator, but this callback drives "
                             f"a {kind} one: resume with the model type that wrote the checkpoint")
        if not self.is_peft:
            self.target.load_state_dict(saved["state"])
            return
        config, allocator = self._config(), self.target.rankallocator
        ours = {k: getattr(config, k) for k in PEFT_SETTINGS}
        if saved["settings"] != ours:
            diff = {k: (saved["settings"].get(k), v) for k, v in ours.items() if saved["settings"].get(k) != v}
            raise ValueError(f"{path} was written with AdaLoraConfig {({k: s for k, (s, _) in diff.items()})} but "
                             f"this model has {({k: v for k, (_, v) in diff.items()})}: a resumed run keeps its "
                             "schedule; build the model with the checkpoint's AdaLoraConfig")
        for key in STATS:
            setattr(allocator, key, {n: t.clone() for n, t in saved[key].items()})
        config.rank_pattern = saved["rank_pattern"]

    def _has_run(self) -> bool:
        if not self.is_peft:
            return self.target.step > 0
        return self._config().rank_pattern is not None or bool(self.target.rankallocator.exp_avg_ipt)

    def _device(self) -> torch.device:
        if not self.is_peft:
            return next(iter(self.target.layers.values())).lora_E.device
        return next(p for n, p in self.target.named_parameters() if "lora_E" in n).device

    # ---------------------------------------------------------------- Trainer events
    def on_train_begin(self, args, state, control, **kwargs):
        grad_accum = args.gradient_accumulation_steps
        if self.is_peft:
            config = self._config()
            check_loop_length(total_step=config.total_step, tfinal=config.tfinal, max_steps=state.max_steps,
                              grad_accum=grad_accum)
        elif args.save_strategy != "no":
            self.target.check_checkpointable()  # refuse now, not at the first save
        if state.global_step == 0:
            if self._has_run():
                what = ("this PEFT AdaLoRA model already has a rank pattern or importance EMAs" if self.is_peft
                        else f"this RankAllocator has already done {self.target.step} steps")
                raise ValueError(f"{what} (an earlier run), but the Trainer starts a new run at global_step 0: "
                                 "to continue that run use trainer.train(resume_from_checkpoint=...); for a new "
                                 "run build fresh adapters (get_peft_model / inject_adalora) and a new callback")
        elif self.is_peft or self.target.step != state.global_step:  # resuming from a checkpoint
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_NAME)
            if not os.path.isfile(path):
                raise ValueError(
                    f"the Trainer resumes at global_step={state.global_step}, but there is no AdaLoRA allocator "
                    f"state at {path}: without it the importance EMAs and the rank pattern would restart from "
                    "zero. Resume from a checkpoint written with AdaLoraCallback (it saves them), or start "
                    "the run over from step 0")
            self._load(torch.load(path, map_location=self._device()), path)
        if not self.is_peft:
            self.target.check_run(max_steps=state.max_steps, grad_accum=grad_accum,
                                  resume_from_step=state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.target.update_and_allocate(state.global_step)
        self.calls += 1

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self._state(), os.path.join(folder, STATE_NAME))
