"""Run full fine-tuning, LoRA, AdaLoRA, QLoRA and QLoRA + AdaLoRA on one :class:`~.tasks.Task`.

Fair by construction: every arm gets the same task object (model loader, batches, metric), the same
number of optimizer steps, the same seeds, and -- for the four adapter methods -- the same *planned*
trainable-parameter budget, which :func:`check_budgets` enforces before anything trains
(:func:`trainable_budget`):

- LoRA / QLoRA at rank ``r``: ``r * sum(d_in + d_out)`` over the adapted matrices;
- AdaLoRA / QLoRA + AdaLoRA at ``target_r``: ``target_r * sum(d_in + d_out + 1)`` (P column, Q row and
  lambda per triplet), i.e. ``target_r`` triplets on *every* matrix, the budget the paper compares at
  (AdaLoRA §4, Table 1: 1.27M vs LoRA 1.33M).

AdaLoRA's *final* budget is that planned one only if its ranks end uniform. It allocates a total of
``target_r * n_matrices`` triplets, but moves them between matrices of different widths, so what it
keeps is ``sum_k r_k (d_in,k + d_out,k + 1)`` (:func:`kept_budget`), which can be above or below the
plan. The runs table reports all three counts: ``trainable_params`` at the start (``init_r`` per
matrix), ``planned_budget_params`` (the one checked) and ``budget_params``, the final budget counted
from the ranks each matrix kept (for LoRA, all three are equal).

The adapters are the course's tested code: LoRA is PEFT's, AdaLoRA the companion's (equal to PEFT's
step for step, Chapter 3, and free of the trainable ``ranknum`` that PEFT 0.21.2 creates whenever it
moves an adapter to its base layer's dtype or device); the arms
are built by :func:`companion.adalora.prepare_variant`, as in the Chapter 3 ablation. The 4-bit arms
load the base in NF4 with double quantization (QLoRA §3) and go through
``peft.prepare_model_for_kbit_training`` without gradient checkpointing, which no arm uses. Full
fine-tuning trains every weight in float32; a base loaded in 16 bit is trained in mixed precision
(:mod:`.precision`, as ``Trainer`` with ``fp16=True`` / ``bf16=True``).

Measured per run: validation accuracy every ``eval_every`` steps (learning curve, steps to
``target_accuracy``), final validation and test accuracy, median seconds per step, the peak tensor
memory of one training step (:class:`companion.memtrack.PeakMemory`, taken in AdaLoRA's budgeting phase
so that its importance scores are counted), trainable parameters, and the bytes of the stored base model.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..adalora import AblationSettings, PreparedRun, check_schedule, prepare_variant
from ..adalora.layer import _matches, is_linear4bit
from ..measure import stored_bytes, trainable_parameters
from ..memtrack import PeakMemory, model_tensors, optimizer_device_tensors
from ..train import TrainConfig, train
from .precision import compute_dtype_of, mixed_precision_full_finetuning
from .results import BenchResults
from .tasks import Task

METHODS = ("full", "lora", "adalora", "qlora", "qlora-adalora")
ADAPTER_METHODS = METHODS[1:]


@dataclass(frozen=True)
class BenchConfig:
    """One comparison; the defaults are a ``ci`` run on MiniLM (80 steps, 3 seeds); the Chapter 6 notebook's
    ``ci`` profile runs the shorter :func:`ci_config` (60 steps) to keep the book build fast.

    ``lr`` per method: each method at a rate that trains it in this many steps (AdaLoRA's Lambda = 0
    and small Gaussian P, Q want a larger rate than LoRA's B = 0, Kaiming A; Chapter 3's ablation).
    ``ranks`` overrides ``r`` (LoRA) or ``target_r`` (AdaLoRA) per method -- for experiments, and to
    show the budget check at work.
    """

    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    max_steps: int = 80
    eval_every: int = 10
    target_accuracy: float = 0.9  # validation accuracy for "steps to target"
    r: int = 4  # LoRA r = AdaLoRA target_r: the shared final budget
    init_r: int = 6  # AdaLoRA starts at 1.5 x the final budget (paper §3.3)
    ranks: dict[str, int] = field(default_factory=dict)
    lora_alpha: float = 32.0
    lr: dict[str, float] = field(default_factory=lambda: {"full": 1e-4, "lora": 5e-4, "qlora": 5e-4,
                                                          "adalora": 5e-3, "qlora-adalora": 5e-3})
    tinit: int = 10
    tfinal: int = 20
    deltaT: int = 5
    orth_reg_weight: float = 0.1
    max_grad_norm: float | None = 1.0
    budget_tolerance: float = 0.05  # largest relative difference of trainable budgets between adapter methods
    measure_step: int | None = None  # the step whose peak memory is measured; None: tinit + deltaT

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed; the chapter uses three, (0, 1, 2)")
        if missing := [m for m in self.methods if m not in self.lr]:
            raise ValueError(f"no learning rate for {missing}; add them to lr={{...}}")
        if not 0 <= self.budget_tolerance < 1:
            raise ValueError(f"budget_tolerance is a fraction in [0, 1), got {self.budget_tolerance}")
        TrainConfig(max_steps=self.max_steps)  # validates max_steps
        for method in (m for m in self.methods if m.endswith("adalora")):
            if not 1 <= self.rank(method) < self.init_r:
                raise ValueError(f"{method}'s target_r = {self.rank(method)} must lie in [1, init_r = {self.init_r}): "
                                 "AdaLoRA starts at init_r and must have ranks to remove (for a fixed rank use LoRA)")
            # caught here, not after the other arms have trained
            check_schedule(init_budget=self.init_r, target_budget=self.rank(method), tinit=self.tinit,
                           tfinal=self.tfinal, total_step=self.max_steps, deltaT=self.deltaT)
        if not 1 <= self.peak_step <= self.max_steps:
            raise ValueError(f"measure_step must be a step in [1, max_steps = {self.max_steps}], got {self.measure_step}")

    def rank(self, method: str) -> int:
        return self.ranks.get(method, self.r)

    @property
    def peak_step(self) -> int:
        if self.measure_step is not None:
            return self.measure_step
        return min(self.max_steps, self.tinit + self.deltaT)

    def settings(self, method: str) -> AblationSettings:
        return AblationSettings(init_r=self.init_r, target_r=self.rank(method), lora_alpha=self.lora_alpha,
                                lr=self.lr[method], lora_lr=self.lr[method], total_step=self.max_steps,
                                tinit=self.tinit, tfinal=self.tfinal, deltaT=self.deltaT,
                                orth_reg_weight=self.orth_reg_weight)


def ci_config(seeds=(0, 1, 2), max_steps: int = 60) -> BenchConfig:
    """The Chapter 6 notebook's ``ci`` comparison: :class:`BenchConfig`'s MiniLM defaults (r = 4 from init_r = 6,
    the per-method rates, tinit = 10, deltaT = 5) for ``max_steps`` steps with tfinal = ``max_steps // 5``: at 60
    steps AdaLoRA budgets for 38 steps and keeps its ranks for the last 12."""
    return BenchConfig(seeds=tuple(seeds), max_steps=max_steps, tfinal=max_steps // 5)


GPU_LR = {"instructions": {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "adalora": 1e-3, "qlora-adalora": 1e-3},
          "glue": {"full": 2e-5, "lora": 5e-4, "qlora": 5e-4, "adalora": 8e-4, "qlora-adalora": 8e-4}}
GPU_TARGET_ACCURACY = {"sst2": 0.9, "mnli": 0.8, "instructions": 0.5}


def gpu_config(task: str, seeds=(0, 1, 2), max_steps: int = 300) -> BenchConfig:
    """The ``gpu`` profile's comparison for ``task`` (``"sst2"``, ``"mnli"`` or ``"instructions"``): LoRA r =
    AdaLoRA target_r = 8 from init_r = 12 (AdaLoRA Table 1's budget), evaluation every sixth of the run, and
    AdaLoRA's schedule as a share of it (tinit 10%, tfinal 30%, deltaT 10), so a longer run (``max_steps=1000``)
    keeps its shape. Raises ``ValueError`` for an unknown task."""
    if task not in GPU_TARGET_ACCURACY:
        raise ValueError(f"unknown task {task!r}; choose one of {list(GPU_TARGET_ACCURACY)}")
    return BenchConfig(seeds=tuple(seeds), max_steps=max_steps, eval_every=max(1, max_steps // 6), r=8, init_r=12,
                       tinit=max_steps // 10, tfinal=3 * max_steps // 10, deltaT=10,
                       target_accuracy=GPU_TARGET_ACCURACY[task],
                       lr=GPU_LR["instructions" if task == "instructions" else "glue"])


def adapted_layers(model: nn.Module, target_modules) -> dict[str, tuple[int, int]]:
    """``{module name: (d_in, d_out)}`` of every linear layer an adapter will wrap (PEFT's name-matching
    rule), in module order; 4-bit layers report their unpacked sizes."""
    layers = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
              if n and _matches(n, list(target_modules)) and (isinstance(m, nn.Linear) or is_linear4bit(m))}
    if not layers:
        raise ValueError(f"no linear layer matches target_modules={list(target_modules)}")
    return layers


def adapted_shapes(model: nn.Module, target_modules) -> list[tuple[int, int]]:
    """(d_in, d_out) of every linear layer an adapter will wrap, in module order (:func:`adapted_layers`)."""
    return list(adapted_layers(model, target_modules).values())


def trainable_budget(method: str, shapes: list[tuple[int, int]], rank: int) -> int:
    """The *planned* adapter budget, ``rank`` on every matrix (see the module docstring): what
    :func:`check_budgets` compares before training; 0 for full fine-tuning. For AdaLoRA this is the final
    budget only if every matrix ends at ``rank``; :func:`kept_budget` counts the real one."""
    if method == "full":
        return 0
    extra = 1 if method.endswith("adalora") else 0  # lambda_i
    return rank * sum(d_in + d_out + extra for d_in, d_out in shapes)


def kept_budget(layers: dict[str, tuple[int, int]], ranks: dict[str, int]) -> int:
    """AdaLoRA's final budget: ``sum_k r_k (d_in,k + d_out,k + 1)`` adapter parameters, ``r_k`` the
    triplets matrix ``k`` keeps (non-zero lambda, ``RankAllocator.ranks()``; PEFT's ``rank_pattern``),
    ``layers`` from :func:`adapted_layers`. It is the size of the adapter PEFT saves after allocation
    (``get_peft_model_state_dict`` cuts P, Q and lambda to the rank pattern).

    Raises ``ValueError`` when the two dicts do not name the same matrices or a rank is negative."""
    if set(layers) != set(ranks):
        raise ValueError(f"ranks and layers must name the same matrices; only in ranks: "
                         f"{sorted(set(ranks) - set(layers))}, only in layers: {sorted(set(layers) - set(ranks))}")
    if negative := {n: r for n, r in ranks.items() if r < 0}:
        raise ValueError(f"ranks count kept triplets and cannot be negative, got {negative}")
    return sum(ranks[n] * (d_in + d_out + 1) for n, (d_in, d_out) in layers.items())


def check_budgets(budgets: dict[str, int], tolerance: float) -> None:
    """Refuse adapter methods whose planned budgets (:func:`trainable_budget`) differ by more than
    ``tolerance`` (relative to the smallest), and say by how much. Runs before training, so it cannot see
    where AdaLoRA will move its ranks: the final budgets are reported, not checked."""
    budgets = {m: b for m, b in budgets.items() if m != "full"}
    if len(budgets) < 2:
        return
    low_method = min(budgets, key=budgets.get)
    low = budgets[low_method]
    for method, budget in budgets.items():
        gap = (budget - low) / low
        if gap > tolerance:
            raise ValueError(
                f"unequal trainable budgets: {method} has {budget:,} adapter parameters, {gap:.1%} more than "
                f"{low_method}'s {low:,} (tolerance {tolerance:.0%}). Give every adapter method the same rank "
                f"(LoRA r = AdaLoRA target_r) or raise budget_tolerance.")


def _importance_tensors(run: PreparedRun) -> list[torch.Tensor]:
    if run.allocator is None:
        return []
    tracker = run.allocator.scorer.tracker
    return [t for d in (tracker.ipt, tracker.exp_avg_ipt, tracker.exp_avg_unc) for t in d.values()]


def build_arm(method: str, task: Task, config: BenchConfig, seed: int) -> tuple[PreparedRun, int, int]:
    """A fresh base model turned into ``method``'s arm; also returns the stored bytes of the base model
    and the arm's planned budget (:func:`trainable_budget` plus the trained head; for full fine-tuning, all
    parameters). Full fine-tuning of a base loaded in float16 or bfloat16 (the causal LMs of the ``gpu``
    profile) trains in mixed precision, float32 master weights and a 16-bit autocast forward
    (:mod:`.precision`): plain AdamW on 16-bit weights turns them NaN (float16) or rounds its updates away
    (bfloat16)."""
    quantized = method.startswith("qlora")
    torch.manual_seed(seed)
    model = task.load_model(seed, quantized)
    base_bytes = stored_bytes(model)
    budget = trainable_budget(method, adapted_shapes(model, task.target_modules), config.rank(method))
    torch.manual_seed(seed)  # adapters drawn from the seed too
    if method == "full":
        if (compute_dtype := compute_dtype_of(model)) is not None:  # loaded in 16 bit: fp32 master weights + autocast
            run = mixed_precision_full_finetuning(model, config.lr[method], compute_dtype)[0]
            return run, base_bytes, trainable_parameters(model)
        for p in model.parameters():
            p.requires_grad = True
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr[method])
        return PreparedRun(model, optimizer), base_bytes, trainable_parameters(model)
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    settings = dataclasses.replace(config.settings(method), target_modules=task.target_modules,
                                   trainable_modules=task.trainable_modules)
    head = sum(p.numel() for n, m in model.named_modules() if n and _matches(n, list(task.trainable_modules))
               for p in m.parameters())
    return prepare_variant("paper" if method.endswith("adalora") else "lora", model, settings), base_bytes, budget + head


def run_one(method: str, seed: int, task: Task, config: BenchConfig, *, progress: bool = False):
    """Train one arm; returns (row of results, validation curve rows, loss rows, final ranks or None)."""
    run, base_bytes, planned = build_arm(method, task, config, seed)
    trainable = trainable_parameters(run.model)
    peak = {}

    def step_context(step: int):
        if step != config.peak_step:
            return None
        baseline = model_tensors(run.model) + optimizer_device_tensors(run.optimizer) + _importance_tensors(run)
        peak["meter"] = PeakMemory(task.device, baseline=baseline)
        return peak["meter"]

    generator = getattr(task.loaders["train"], "generator", None)
    if generator is not None:  # a DataLoader's generator advances with every pass: rewind it, same batches per seed
        generator.manual_seed(seed)
    log = train(run.model, task.loaders["train"], run.optimizer,
                TrainConfig(max_steps=config.max_steps, eval_every=config.eval_every,
                            max_grad_norm=config.max_grad_norm, progress=progress),
                evaluate=lambda m: {"val_accuracy": task.evaluate(m, "validation")},
                after_backward=run.after_backward, after_step=run.after_step, step_context=step_context)
    evals = log.eval_frame()
    reached = evals.loc[evals["val_accuracy"] >= config.target_accuracy, "step"]
    # median over the steps after the first (it allocates optimizer state), without the measured one (slower on a CPU)
    steps = log.frame()
    timed = steps.loc[(steps["step"] > 1) & (steps["step"] != config.peak_step), "seconds"]
    seconds = timed if len(timed) else steps["seconds"]
    ranks, final = None, planned
    if run.allocator is not None:  # the plan put target_r triplets on every matrix; count what each one kept
        ranks = run.allocator.ranks()
        layers = {n: (layer.in_features, layer.out_features) for n, layer in run.allocator.layers.items()}
        uniform = trainable_budget(method, list(layers.values()), config.rank(method))
        final = planned - uniform + kept_budget(layers, ranks)
    row = {"method": method, "seed": seed, "val_accuracy": evals["val_accuracy"].iloc[-1],
           "test_accuracy": task.evaluate(run.model.eval(), "test"),
           "steps_to_target": float(reached.iloc[0]) if len(reached) else math.nan,
           "seconds_per_step": float(seconds.median()),
           "peak_memory_bytes": peak["meter"].peak_bytes, "trainable_params": trainable,
           "planned_budget_params": planned, "budget_params": final,
           "base_storage_bytes": base_bytes}
    curve = [{"method": method, "seed": seed, **r} for r in evals.to_dict("records")]
    losses = [{"method": method, "seed": seed, "step": r["step"], "loss": r["loss"]}
              for r in log.frame().to_dict("records")]
    return row, curve, losses, ranks


def run_benchmark(task: Task, config: BenchConfig = BenchConfig(), methods=None) -> BenchResults:
    """Every method x seed of ``config`` on ``task``; checks the budgets of all ``config.methods`` first,
    then trains ``methods`` (default: all of them; a subset runs the comparison in parts, e.g. one notebook
    cell per method, which :meth:`BenchResults.concat` joins)."""
    methods = list(config.methods if methods is None else methods)
    if unknown := [m for m in methods if m not in config.methods]:
        raise ValueError(f"methods {unknown} are not in config.methods = {list(config.methods)}")
    probe = task.load_model(config.seeds[0], False)
    shapes = adapted_shapes(probe, task.target_modules)
    del probe
    check_budgets({m: trainable_budget(m, shapes, config.rank(m)) for m in config.methods}, config.budget_tolerance)
    rows, curves, losses, ranks = [], [], [], {}
    start = time.perf_counter()
    for method, seed in tqdm([(m, s) for m in methods for s in config.seeds], desc="runs"):
        row, curve, loss, final_ranks = run_one(method, seed, task, config)
        rows.append(row)
        curves += curve
        losses += loss
        if final_ranks is not None:
            ranks.setdefault(method, {})[str(seed)] = final_ranks
    meta = {"task": task.name, "description": task.description, "device": str(task.device),
            "torch": torch.__version__, "minutes": (time.perf_counter() - start) / 60,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}}
    return BenchResults(pd.DataFrame(rows), pd.DataFrame(curves), pd.DataFrame(losses), ranks, meta)
