"""Build each arm of the Chapter 3 ablation on one model: the paper's AdaLoRA, the tutorial's
three variants (:mod:`.seed_variants`), AdaLoRA without orthogonality (gamma = 0), and LoRA at
the final budget.

:func:`prepare_variant` only builds; training is :func:`companion.train.train` with the
returned hooks, so that every arm runs through the same loop::

    run = prepare_variant("paper", model, AblationSettings())
    train(run.model, loader, run.optimizer, TrainConfig(max_steps=settings.total_step),
          after_backward=run.after_backward, after_step=run.after_step)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .allocator import RankAllocator
from .layer import adalora_layers, inject_adalora
from .regularization import add_orthogonal_regularization
from .seed_variants import SeedLearningRatePhases, SeedMatrixScorer, seed_svd_init

VARIANTS = {
    "paper": "AdaLoRA (paper algorithm)",
    "seed_score": "tutorial: min-max gradient-L1 matrix score",
    "seed_svd": "tutorial: SVD-of-W init, U and V frozen",
    "seed_lr": "tutorial: three-phase learning rates",
    "gamma0": "AdaLoRA, gamma = 0",
    "lora": "LoRA, r = target_r",
}

BERT_MATRICES = ("query", "key", "value", "output.dense", "intermediate.dense")  # Wq Wk Wv Wo Wf1 Wf2


@dataclass(frozen=True)
class AblationSettings:
    """One arm's hyperparameters; the defaults are the ``ci`` profile's (MiniLM, short runs)."""

    target_modules: tuple[str, ...] = BERT_MATRICES
    trainable_modules: tuple[str, ...] = ("classifier",)
    init_r: int = 6  # b(0) = 1.5 b(T), the paper's ratio (§3.3)
    target_r: int = 4
    lora_alpha: float = 32.0
    lr: float = 5e-3  # AdaLoRA arms: Lambda = 0 and P, Q ~ N(0, 0.02^2) make short runs need a large rate
    lora_lr: float = 5e-4  # the LoRA arm (B = 0, A ~ Kaiming-uniform) learns nothing at the AdaLoRA rate (Ch. 3)
    total_step: int = 80
    tinit: int = 10
    tfinal: int = 20
    deltaT: int = 5
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1


@dataclass
class PreparedRun:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    after_backward: Callable | None = None
    after_step: Callable | None = None
    allocator: RankAllocator | None = None


def _lora(model: nn.Module, s: AblationSettings) -> PreparedRun:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=s.target_r, lora_alpha=s.lora_alpha, target_modules=list(s.target_modules),
                        modules_to_save=list(s.trainable_modules))
    model = get_peft_model(model, config)
    return PreparedRun(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lora_lr))


def prepare_variant(variant: str, model: nn.Module, settings: AblationSettings = AblationSettings()) -> PreparedRun:
    """Turn a freshly loaded ``model`` into the ``variant`` arm; see :data:`VARIANTS`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    s = settings
    if variant == "lora":
        return _lora(model, s)
    inject_adalora(model, list(s.target_modules), init_r=s.init_r, lora_alpha=s.lora_alpha,
                   trainable_modules=s.trainable_modules)
    add_orthogonal_regularization(model, 0.0 if variant == "gamma0" else s.orth_reg_weight)
    if variant == "seed_svd":
        seed_svd_init(model)
    scorer = SeedMatrixScorer() if variant == "seed_score" else None
    allocator = RankAllocator(model, target_r=s.target_r, tinit=s.tinit, tfinal=s.tfinal, deltaT=s.deltaT,
                              total_step=s.total_step, beta1=s.beta1, beta2=s.beta2, scorer=scorer)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if variant != "seed_lr":
        optimizer = torch.optim.AdamW(list(trainable.values()), lr=s.lr)
        return PreparedRun(model, optimizer, after_step=allocator.after_step, allocator=allocator)
    adapters = {f"{name}.{part}": getattr(layer, part) for name, layer in adalora_layers(model).items()
                for part in ("lora_A", "lora_B", "lora_E")}
    phases = SeedLearningRatePhases(adapters, s.lr)
    others = [p for n, p in trainable.items() if not any(p is q for q in adapters.values())]
    optimizer = torch.optim.AdamW(phases.param_groups() + [{"params": others, "lr": s.lr}], lr=s.lr)
    phases.bind(optimizer)
    return PreparedRun(model, optimizer, after_backward=phases.after_backward, after_step=allocator.after_step,
                       allocator=allocator)
