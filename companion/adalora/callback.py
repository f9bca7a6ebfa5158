"""Run AdaLoRA's allocation inside a Hugging Face ``Trainer``.

Neither PEFT nor transformers calls ``update_and_allocate`` for you. Without it PEFT never
masks anything: ``config.rank_pattern`` stays ``None`` and the run is plain LoRA in SVD form
at ``init_r`` (peft#1327), with no error and no warning. :class:`AdaLoraCallback` makes the call
at ``on_optimizer_step``, which ``Trainer`` fires after ``optimizer.step()`` and before
``zero_grad()``, once per optimizer step, so gradient accumulation is handled and
``state.global_step`` is the 0-based optimizer step PEFT expects (it is incremented after
the callback). This is the callback PEFT's own GPU test uses
(``tests/test_gpu_examples.py::test_4bit_adalora_causalLM``).
"""

from __future__ import annotations

import warnings

from transformers import TrainerCallback


def _allocation_target(obj):
    """The object whose ``update_and_allocate(global_step)`` runs the allocation."""
    base = getattr(obj, "base_model", None)  # PeftModel -> AdaLoraModel
    if base is not None and hasattr(base, "update_and_allocate") and hasattr(base, "peft_config"):
        return base
    if hasattr(obj, "update_and_allocate"):  # AdaLoraModel or companion RankAllocator
        return obj
    raise TypeError(f"AdaLoraCallback needs a PEFT AdaLoRA model (get_peft_model(model, AdaLoraConfig(...))) or a "
                    f"companion.adalora.RankAllocator, got {type(obj).__name__}")


def _total_step(target) -> int | None:
    if hasattr(target, "peft_config"):
        return target.peft_config[target.trainable_adapter_name].total_step
    return getattr(target, "total_step", None)


class AdaLoraCallback(TrainerCallback):
    """``Trainer(..., callbacks=[AdaLoraCallback(model)])`` for a PEFT AdaLoRA model or a companion allocator."""

    def __init__(self, model_or_allocator):
        self.target = _allocation_target(model_or_allocator)
        self.calls = 0

    def on_train_begin(self, args, state, control, **kwargs):
        total_step = _total_step(self.target)
        if state.max_steps and total_step != state.max_steps:
            warnings.warn(f"AdaLoRA's total_step is {total_step} but the Trainer will run {state.max_steps} "
                          "optimizer steps: the budget schedule will not end where training ends. Set "
                          f"total_step={state.max_steps} (optimizer steps, after gradient accumulation)",
                          stacklevel=2)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.target.update_and_allocate(state.global_step)
        self.calls += 1
