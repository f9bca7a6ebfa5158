"""THE SOURCE TUTORIAL'S VERSIONS of AdaLoRA's parts -- wrong, kept only for the ablation.

The Chinese tutorial this course corrects describes AdaLoRA differently from the paper
(Zhang et al. 2023) and from PEFT. To *measure* what its mistakes cost, each of its three main
claims is implemented here as a drop-in replacement for one part of the real algorithm:

* :class:`SeedMatrixScorer` -- importance = the L1 norm of a whole adapter's gradient,
  min-max normalised over matrices, smoothed by a beta1 EMA and then a beta2 EMA of that
  (tutorial's defaults beta1 = 0.99, beta2 = 0.999). The paper scores each *triplet* from
  ``|w * grad|`` with a sensitivity EMA times an *uncertainty* EMA (Eq. 9-13). A matrix-level
  score gives all triplets of a matrix the same value, so the global threshold can only keep or
  drop whole matrices.
* :func:`seed_svd_init` -- start from the SVD of the pretrained weight, ``P = U_r``,
  ``Lambda = S_r``, ``Q = V_r^T``, with ``P`` and ``Q`` frozen and only ``Lambda`` trained. The
  paper trains all three, starts from ``Lambda = 0`` (so Delta = 0) and never computes an SVD.
  We keep the frozen ``W0`` and add ``P Lambda Q`` to it; the tutorial's code goes further and
  *replaces* ``W0`` by its rank-r approximation, which would discard most of the pretrained layer.
* :class:`SeedLearningRatePhases` -- "three-phase" per-parameter learning rates: the top 30% of
  adapter tensors by the tutorial's score get 3x the learning rate, the next 40% 1x, the rest
  0.3x. The paper's three phases are *budget* phases (:mod:`.schedule`); it uses one learning
  rate for all adapter parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import SVDLinear, adalora_layers

SEED_BETA1, SEED_BETA2 = 0.99, 0.999  # the tutorial's "recommended default combination"
MINMAX_EPS = 1e-8  # the tutorial's epsilon in the min-max normalisation
LR_PHASE_SHARES = (0.3, 0.7)  # tutorial: top 30% -> phase 1, up to 70% -> phase 2, rest -> phase 3
LR_PHASE_FACTORS = (3.0, 1.0, 0.3)


def _grad_l1(name: str, p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        raise ValueError(f"{name} has no gradient (grad is None); call after loss.backward() and before "
                         "optimizer.zero_grad()")
    return p.grad.detach().abs().sum()


def min_max(values: torch.Tensor) -> torch.Tensor:
    """The tutorial's normalisation: (v - min) / (max - min + 1e-8), over a 1-D tensor."""
    return (values - values.min()) / (values.max() - values.min() + MINMAX_EPS)


class _DoubleEma:
    """Tutorial: score = b1 * score + (1 - b1) * g, then smoothed = b2 * smoothed + (1 - b2) * score."""

    def __init__(self, beta1: float, beta2: float):
        self.beta1, self.beta2 = beta1, beta2
        self.score = self.smoothed = None

    def update(self, g: torch.Tensor) -> torch.Tensor:
        if self.score is None:
            self.score, self.smoothed = torch.zeros_like(g), torch.zeros_like(g)
        self.score = self.beta1 * self.score + (1 - self.beta1) * g
        self.smoothed = self.beta2 * self.smoothed + (1 - self.beta2) * self.score
        return self.smoothed


class SeedMatrixScorer:
    """TUTORIAL VARIANT of the triplet scorer (see the module docstring); plugs into ``RankAllocator``."""

    def __init__(self, beta1: float = SEED_BETA1, beta2: float = SEED_BETA2):
        self.beta1, self.beta2 = beta1, beta2
        self.reset()

    def reset(self) -> None:
        self.ema = _DoubleEma(self.beta1, self.beta2)
        self.names: list[str] = []

    def update(self, layers: dict[str, SVDLinear]) -> None:
        # ||grad of the whole adapter||_1 per matrix, over its trainable parts: (n_layers,)
        l1 = torch.stack([sum(_grad_l1(n, p) for p in (m.lora_A, m.lora_B, m.lora_E) if p.requires_grad)
                          for n, m in layers.items()])
        self.names = list(layers)
        self.ema.update(min_max(l1))

    def triplet_scores(self, layers: dict[str, SVDLinear]) -> dict[str, torch.Tensor]:
        if self.ema.smoothed is None:
            raise ValueError("SeedMatrixScorer has no scores yet; call update(layers) first")
        # every triplet of a matrix gets the matrix's score: (r,)
        return {n: self.ema.smoothed[i].expand(layers[n].init_r).clone() for i, n in enumerate(self.names)}


@torch.no_grad()
def seed_svd_init(model: nn.Module) -> None:
    """TUTORIAL VARIANT: P, Lambda, Q <- U_r, S_r, V_r^T of the pretrained W; P and Q frozen.

    ``torch.linalg.svd`` of each base weight (out, in) -> U (out, k), S (k,), Vh (k, in).
    """
    for name, layer in adalora_layers(model).items():
        if layer.quantized:
            raise TypeError(f"{name}: seed_svd_init needs a 16/32-bit base weight, not a 4-bit one")
        U, S, Vh = torch.linalg.svd(layer.base_layer.weight.float(), full_matrices=False)
        r = layer.init_r
        layer.lora_B.copy_(U[:, :r])  # P = U_r: (out, r)
        layer.lora_E.copy_(S[:r].view(-1, 1))  # Lambda = S_r: (r, 1)
        layer.lora_A.copy_(Vh[:r])  # Q = V_r^T: (r, in)
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)


class SeedLearningRatePhases:
    """TUTORIAL VARIANT: per-tensor learning rates x3 / x1 / x0.3 by the tutorial's smoothed score.

    Build the optimizer from :meth:`param_groups` (one group per adapter tensor), :meth:`bind`
    it, and call :meth:`after_backward` after every backward pass (``train(after_backward=...)``).
    """

    def __init__(self, named_params: dict[str, nn.Parameter], base_lr: float,
                 beta1: float = SEED_BETA1, beta2: float = SEED_BETA2):
        self.params = {n: p for n, p in named_params.items() if p.requires_grad}
        if len(self.params) < 2:
            raise ValueError("three-phase learning rates need at least two trainable adapter tensors")
        self.base_lr = base_lr
        self.ema = _DoubleEma(beta1, beta2)
        self.optimizer = None
        self.factors: dict[str, float] = {n: 1.0 for n in self.params}

    def param_groups(self) -> list[dict]:
        return [{"params": [p], "lr": self.base_lr, "name": n} for n, p in self.params.items()]

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        names = {g.get("name") for g in optimizer.param_groups}
        if not set(self.params) <= names:
            raise ValueError("the optimizer must be built from SeedLearningRatePhases.param_groups()")
        self.optimizer = optimizer

    def after_backward(self, step: int, model: nn.Module | None = None) -> None:
        if self.optimizer is None:
            raise ValueError("call bind(optimizer) before training")
        smoothed = self.ema.update(min_max(torch.stack([_grad_l1(n, p) for n, p in self.params.items()])))
        order = torch.argsort(smoothed, descending=True, stable=True).tolist()
        n = len(order)
        cut1, cut2 = int(n * LR_PHASE_SHARES[0]), int(n * LR_PHASE_SHARES[1])
        names = list(self.params)
        for rank, i in enumerate(order):
            self.factors[names[i]] = LR_PHASE_FACTORS[0 if rank < cut1 else 1 if rank < cut2 else 2]
        for group in self.optimizer.param_groups:
            if group.get("name") in self.factors:
                group["lr"] = self.base_lr * self.factors[group["name"]]
