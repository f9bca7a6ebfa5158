"""One small, readable training loop shared by the chapters.

It does what a reader needs to see and nothing else: seeded data order, gradient
accumulation, optional clipping, two hooks (``after_backward`` to inspect gradients,
``after_step`` for AdaLoRA's rank allocation, which PEFT runs after
``optimizer.step()`` and before ``zero_grad()``), periodic evaluation, a ``tqdm``
progress bar, and a log of loss, time per step and peak memory.

The same runs also go through ``transformers.Trainer``: :func:`qlora_training_arguments` builds the
``TrainingArguments`` of the QLoRA recipe (``optim="paged_adamw_8bit"`` and the paper's defaults) and
:class:`TrainerLog` records the Trainer's steps into the same :class:`TrainLog` columns, so a
notebook can plot both runs side by side.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import pandas as pd
import torch
from tqdm import tqdm
from transformers import TrainerCallback

from .data import IGNORE_INDEX  # label positions the loss skips (torch CrossEntropyLoss, transformers)
from .qlora import keep_dequantize_kernel_on_cpu


LOSS_NORMALIZATIONS = ("items", "micro_batch")


def loss_items(model: torch.nn.Module, labels: torch.Tensor) -> int:
    """How many terms the mean in ``model(**batch).loss`` averages over, for one batch's ``labels``.

    A causal LM predicts token t + 1 from position t, so its loss counts ``labels[..., 1:] != -100``
    (transformers' ``ForCausalLMLoss``, and ``Trainer._get_num_items_in_batch``); any other model
    counts ``labels != -100``: examples for a classifier, tokens for token classification.
    """
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel
    shifts = (LOSS_MAPPING.get(getattr(base, "loss_type", None)) is ForCausalLMLoss
              and not getattr(getattr(base, "config", None), "is_encoder_decoder", False))
    counted = labels[..., 1:] if shifts else labels
    return int(counted.ne(IGNORE_INDEX).sum())


@dataclass
class TrainConfig:
    """Loop settings; the defaults are the ``ci`` profile's."""

    max_steps: int = 100  # optimizer steps of the whole run
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0  # None: no clipping
    eval_every: int = 50  # optimizer steps between evaluations (0: only at the end)
    progress: bool = True
    resume_from_step: int = 0  # steps done by an earlier call of the same run: this one starts after them
    stop_after_step: int | None = None  # end this call early (the run goes on in a later call); None: max_steps
    loss_normalization: str = "items"  # "items": as one large batch (see train()); "micro_batch": mean of means

    def __post_init__(self):
        if self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.grad_accum <= 0:
            raise ValueError(f"grad_accum must be positive, got {self.grad_accum}")
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, got {self.loss_normalization!r}")
        if not 0 <= self.resume_from_step < self.max_steps:
            raise ValueError(f"resume_from_step must lie in [0, max_steps = {self.max_steps}), got "
                             f"{self.resume_from_step}: max_steps counts the whole run, including the steps "
                             "done before the resume")
        if self.stop_after_step is not None and not self.resume_from_step < self.stop_after_step <= self.max_steps:
            raise ValueError(f"stop_after_step must lie in (resume_from_step, max_steps] = ({self.resume_from_step}, "
                             f"{self.max_steps}], got {self.stop_after_step}; max_steps stays the whole run's length")

    @property
    def last_step(self) -> int:
        """The last step this call runs."""
        return self.max_steps if self.stop_after_step is None else self.stop_after_step


@dataclass
class TrainLog:
    steps: list[dict] = field(default_factory=list)  # one row per optimizer step
    evals: list[dict] = field(default_factory=list)  # one row per evaluation

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.steps)

    def eval_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.evals)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: ``torch.cuda.max_memory_allocated`` on CUDA, else the
    process's peak resident set size (``ru_maxrss``), which includes more than tensors."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def cycle(loader: Iterable) -> Iterable:
    """Repeat a DataLoader forever; a seeded sampler reshuffles each pass."""
    while True:
        yield from loader


def _loss_weights(model, micro: list[dict], normalization: str, step: int) -> list[float]:
    """Weight of each micro-batch's mean loss in one optimizer step (see :func:`train`)."""
    for i, batch in enumerate(micro):
        if "labels" not in batch:
            raise ValueError(f"micro-batch {i} of step {step} has no 'labels' (keys: {sorted(batch)}); train() needs "
                             "batches whose model(**batch).loss is the loss, e.g. from a collator that adds labels")
    items = [loss_items(model, batch["labels"]) for batch in micro]
    if sum(items) == 0:
        raise ValueError(f"step {step}: none of its {len(micro)} micro-batch(es) has a label to predict (every label "
                         f"is {IGNORE_INDEX}); the loss would be NaN. Check the collator's label masking")
    if normalization == "micro_batch":
        return [1.0 / len(micro) if n else 0.0 for n in items]
    return [n / sum(items) for n in items]


def train(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
          config: TrainConfig = TrainConfig(), *, scheduler=None,
          evaluate: Callable[[torch.nn.Module], dict] | None = None,
          after_backward: Callable[[int, torch.nn.Module], None] | None = None,
          after_step: Callable[[int, torch.nn.Module], None] | None = None,
          step_context: Callable[[int], AbstractContextManager | None] | None = None) -> TrainLog:
    """Train ``model`` for ``config.max_steps`` optimizer steps on batches from ``loader``.

    Batches are dicts of tensors that the model accepts as keyword arguments and that
    include ``labels``, so ``model(**batch).loss`` is the loss (transformers convention).
    ``evaluate(model)`` returns a dict of metrics; it runs every ``eval_every`` steps
    and after the last one, in ``eval`` mode. ``step_context(step)`` may return a context manager
    that wraps that whole optimizer step, hooks included (e.g. :class:`companion.memtrack.PeakMemory`
    to measure one step's peak); ``None`` wraps nothing.

    ``config.max_steps`` is the length of the whole run. One call may train only part of it: steps
    ``resume_from_step + 1 .. stop_after_step`` (1-based optimizer steps, as ``Trainer``'s ``global_step``).
    To continue a run, restore the model, optimizer, scheduler and hook state saved after step k and
    pass ``resume_from_step=k``; the loader is not fast-forwarded, so give one that yields the batches
    of steps k + 1 onwards (``Trainer`` skips them for you).

    Gradient accumulation: ``config.grad_accum`` micro-batches make one optimizer step. With
    ``loss_normalization="items"`` (the default) micro-batch i's mean loss is weighted by n_i / sum_j n_j,
    n = :func:`loss_items` (label tokens of a causal LM, examples of a classifier), so the step equals
    one step on the concatenated batch, however unevenly the label tokens fall (transformers' ``Trainer``
    does the same since v4.46 through ``num_items_in_batch``). ``"micro_batch"`` weights each micro-batch
    1 / grad_accum, a mean of means, which differs whenever micro-batches hold different numbers of label
    tokens (or a short last batch of an epoch falls into an accumulated step). The logged loss is the
    weighted sum, the mean over the accumulated batch. An accumulated batch with no label to predict
    raises ``ValueError``.

    A hook whose object defines ``check_run(max_steps=, grad_accum=, resume_from_step=)`` (e.g.
    :meth:`companion.adalora.RankAllocator.after_step`) is asked before the first step whether this
    loop fits it; it raises ``ValueError`` otherwise (an AdaLoRA ``total_step`` counted in micro-batches,
    an allocator that already ran). Wrap it in a plain function and nothing is checked.
    """
    for hook in (after_backward, after_step):
        check_run = getattr(getattr(hook, "__self__", None), "check_run", None)
        if callable(check_run):
            check_run(max_steps=config.max_steps, grad_accum=config.grad_accum,
                      resume_from_step=config.resume_from_step)
    keep_dequantize_kernel_on_cpu(model)  # evaluate() runs in eval mode: same 4-bit CPU kernel as training
    device = next(model.parameters()).device
    log = TrainLog()
    batches = iter(cycle(loader))
    model.train()
    bar = tqdm(range(config.resume_from_step + 1, config.last_step + 1), desc="train",
               disable=not config.progress, mininterval=2.0, file=sys.stderr)
    for step in bar:
        context = (step_context(step) if step_context is not None else None) or nullcontext()
        with context:
            start = time.perf_counter()
            loss_sum = 0.0
            micro = [next(batches) for _ in range(config.grad_accum)]
            for batch, weight in zip(micro, _loss_weights(model, micro, config.loss_normalization, step)):
                if weight == 0.0:  # no label to predict: its mean loss is NaN, its share of the sum is 0
                    continue
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = model(**batch).loss * weight
                loss.backward()
                loss_sum += loss.item()
            if after_backward is not None:
                after_backward(step, model)
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            if after_step is not None:  # e.g. AdaLoRA's update_and_allocate: needs the gradients
                after_step(step, model)
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
        log.steps.append({"step": step, "loss": loss_sum, "lr": optimizer.param_groups[0]["lr"],
                          "seconds": time.perf_counter() - start,
                          "peak_memory_bytes": peak_memory_bytes(device)})
        bar.set_postfix(loss=f"{loss_sum:.4f}", refresh=False)
        last = step == config.last_step
        if evaluate is not None and (last or (config.eval_every and step % config.eval_every == 0)):
            model.eval()
            with torch.no_grad():
                metrics = evaluate(model)
            model.train()
            log.evals.append({"step": step, **metrics})
    model.eval()
    return log


@torch.no_grad()
def classification_accuracy(model: torch.nn.Module, loader: Iterable) -> float:
    """Share of examples whose arg-max logit equals ``labels``. A bitsandbytes 4-bit model on a CPU keeps
    its training-time dequantize kernel (:func:`companion.qlora.keep_dequantize_kernel_on_cpu`)."""
    keep_dequantize_kernel_on_cpu(model)
    device = next(model.parameters()).device
    correct = total = 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        total += batch["labels"].numel()
    if total == 0:
        raise ValueError("classification_accuracy got an empty loader")
    return correct / total


# ------------------------------------------------------------------ transformers.Trainer recipe
def qlora_training_arguments(output_dir, *, max_steps: int, per_device_train_batch_size: int = 16,
                             gradient_accumulation_steps: int = 1, learning_rate: float = 2e-4,
                             optim: str = "paged_adamw_8bit", lr_scheduler_type: str = "constant_with_warmup",
                             warmup_steps: float = 0.03, max_grad_norm: float = 0.3, weight_decay: float = 0.0,
                             gradient_checkpointing: bool = False, compute_dtype: torch.dtype = torch.float32,
                             logging_steps: int = 10, seed: int = 0, shuffle: bool = True, **overrides):
    """``TrainingArguments`` for a QLoRA run, defaults from artidoro/qlora (``qlora.py``, Guanaco-7B script):
    learning rate 2e-4, held constant after a linear warm-up over the first 3% of the steps, gradient
    clipping at 0.3, no weight decay.

    The warm-up needs ``lr_scheduler_type="constant_with_warmup"``: with ``"constant"`` transformers'
    ``get_scheduler`` returns ``get_constant_schedule`` before it reads the warm-up, so the warm-up is
    silently ignored (the QLoRA repository's own ``constant`` + ``warmup_ratio=0.03`` has that no-op).
    A ``"constant"`` schedule with a non-zero ``warmup_steps`` is refused here for that reason.

    The paper's runs use ``optim="paged_adamw_32bit"``; ``"paged_adamw_8bit"`` keeps the two Adam states
    in 8 bit. transformers 5 names: ``warmup_steps`` takes a fraction (``warmup_ratio`` is gone) and
    ``activation_checkpointing`` replaces ``gradient_checkpointing``. ``compute_dtype`` sets ``bf16`` or
    ``fp16`` (mixed precision on a GPU; use float16 on a T4). ``shuffle=False`` feeds batches in dataset
    order, as a DataLoader without shuffling does. Nothing is saved or reported to a tracker.
    """
    from transformers import TrainingArguments

    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    if lr_scheduler_type == "constant" and warmup_steps:
        raise ValueError(f"lr_scheduler_type='constant' ignores warmup_steps={warmup_steps} (transformers' "
                         "get_scheduler returns a constant schedule before reading the warm-up); use "
                         "lr_scheduler_type='constant_with_warmup', or warmup_steps=0 for no warm-up")
    fields = dict(output_dir=str(output_dir), max_steps=max_steps,
                  per_device_train_batch_size=per_device_train_batch_size,
                  gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=learning_rate,
                  optim=optim, lr_scheduler_type=lr_scheduler_type, warmup_steps=warmup_steps,
                  max_grad_norm=max_grad_norm, weight_decay=weight_decay,
                  activation_checkpointing=gradient_checkpointing,
                  bf16=compute_dtype == torch.bfloat16, fp16=compute_dtype == torch.float16,
                  logging_steps=logging_steps, seed=seed, data_seed=seed,
                  train_sampling_strategy="random" if shuffle else "sequential",
                  save_strategy="no", report_to="none", disable_tqdm=True,
                  use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=torch.cuda.is_available())
    fields.update(overrides)
    return TrainingArguments(**fields)


class TrainerLog(TrainerCallback):
    """A ``TrainerCallback`` that fills a :class:`TrainLog` with the columns :func:`train` logs:
    step, loss, lr, seconds and peak_memory_bytes, one row per optimizer step. The Trainer reports the
    loss averaged over ``logging_steps`` steps, on the last step of each window; the other rows keep NaN
    (``logging_steps=1`` gives every step its own loss)."""

    def __init__(self):
        self.log = TrainLog()
        self._start = 0.0
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.log.steps.append({"step": state.global_step, "loss": float("nan"), "lr": float("nan"),
                               "seconds": time.perf_counter() - self._start,
                               "peak_memory_bytes": peak_memory_bytes(self._device)})

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs and self.log.steps and self.log.steps[-1]["step"] == state.global_step:
            self.log.steps[-1].update(loss=logs["loss"], lr=logs.get("learning_rate", float("nan")))
        elif "eval_loss" in logs:
            self.log.evals.append({"step": state.global_step,
                                   **{k: v for k, v in logs.items() if k.startswith("eval_")}})
