"""Chapter 2 exercises: AdaLoRA's importance EMAs (Eq. 10-12), the cubic budget schedule (Eq. 14),
the triplet score (Eq. 7 as PEFT computes it) and AdaLoRA's trainable parameters. Expected values
come from PEFT's own ``RankAllocator`` methods, called on the case's tensors."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from .core import Case, Exercise, compare_equal, compare_tensor, compare_tuple, register

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rank_allocator():
    from peft.tuners.adalora.layer import RankAllocator  # PEFT imports slowly: on first use

    return RankAllocator


def reference_adalora_trainable(d_in: list[int], d_out: list[int], init_r: int) -> int:
    """Trainable parameters PEFT's AdaLoRA adds to ``Linear(d_in[k], d_out[k])`` layers at ``init_r``
    (lora_A (r, in), lora_E (r, 1), lora_B (out, r); ranknum is not trainable), counted on a real model."""
    from peft import AdaLoraConfig, get_peft_model

    layers = torch.nn.ModuleDict({f"l{k}": torch.nn.Linear(i, o) for k, (i, o) in enumerate(zip(d_in, d_out))})
    model = torch.nn.Module()
    model.layers = layers
    config = AdaLoraConfig(init_r=init_r, target_r=max(1, init_r - 1), target_modules=list(layers.keys()),
                           total_step=10)
    peft_model = get_peft_model(model, config)
    return sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad)


def _count_cases(rng: random.Random):
    compare = lambda g, e: compare_equal(g, e, what="the number of trainable parameters")  # noqa: E731
    for _ in range(5):
        k = rng.randint(1, 4)
        d_in = [rng.randint(1, 64) for _ in range(k)]
        d_out = [rng.randint(1, 64) for _ in range(k)]
        init_r = rng.randint(2, 12)
        yield Case((d_in, d_out, init_r), reference_adalora_trainable(d_in, d_out, init_r), compare)


register(Exercise(
    id="ch02.adalora_trainable", chapter=2, title="Counting AdaLoRA's trainable parameters", level="warm-up",
    signature="fn(d_in: list[int], d_out: list[int], init_r: int) -> int  # one adapted Linear(d_in[k], d_out[k]) each",
    task="How many trainable parameters does PEFT's AdaLoRA add when it adapts these Linear layers at init_r?",
    hint="each layer gets P (d_out x r), Lambda (r x 1) and Q (r x d_in): r (d_in + d_out + 1); the base weights "
         "are frozen and ranknum is a buffer-like parameter that does not train.",
    cases=_count_cases))


class _OneParameter(torch.nn.Module):
    """A model with one adapter entry named as PEFT names it, for ``RankAllocator.update_ipt``."""

    def __init__(self, param: torch.Tensor, grad: torch.Tensor):
        super().__init__()
        self.p = torch.nn.Parameter(param.clone())
        self.p.grad = grad.clone()

    def named_parameters(self, *args, **kwargs):
        yield "layer.lora_A.default", self.p


def reference_importance_update(param, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2):
    """One step of PEFT's ``RankAllocator.update_ipt`` from the given EMAs (Eq. 10-12)."""
    name = "layer.lora_A.default"
    allocator = SimpleNamespace(beta1=beta1, beta2=beta2, adapter_name="default", ipt={name: torch.zeros_like(param)},
                                exp_avg_ipt={name: exp_avg_ipt.clone()}, exp_avg_unc={name: exp_avg_unc.clone()})
    _rank_allocator().update_ipt(allocator, _OneParameter(param, grad))
    return allocator.exp_avg_ipt[name], allocator.exp_avg_unc[name]


def _importance_cases(rng: random.Random):
    def tol(dtype):
        loose = {torch.float32: (1e-5, 1e-7), torch.float16: (2e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-4)}[dtype]
        part = lambda g, e: compare_tensor(g, e, rtol=loose[0], atol=loose[1])  # noqa: E731
        return compare_tuple(part, part, names=("exp_avg_ipt", "exp_avg_unc"))

    shapes = [(4, 7), (rng.randint(1, 9), rng.randint(1, 9)), (rng.randint(2, 6), 1), (3, 5, 2)]
    for i, shape in enumerate(shapes * 2):
        dtype = DTYPES[i % 3]
        beta1 = round(rng.uniform(0.5, 0.95), 3)
        beta2 = round(rng.uniform(0.3, 0.95), 3)
        while abs(beta1 - beta2) < 0.1:  # distinct betas, so swapping them shows
            beta2 = round(rng.uniform(0.3, 0.95), 3)
        param, grad = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
        first = i < 2
        ipt = torch.zeros(shape, dtype=dtype) if first else torch.rand(shape).to(dtype)
        unc = torch.zeros(shape, dtype=dtype) if first else torch.rand(shape).to(dtype) * 0.5
        expected = reference_importance_update(param, grad, ipt, unc, beta1, beta2)
        yield Case((param, grad, ipt, unc, beta1, beta2), expected, tol(dtype),
                   note=("first step from zero EMAs, " if first else "") + f"{dtype}")


register(Exercise(
    id="ch02.importance_update", chapter=2, title="One step of the importance EMAs", level="core",
    signature="fn(param, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2) -> (exp_avg_ipt, exp_avg_unc)  "
              "# tensors of one shape and dtype; beta1, beta2 floats in (0, 1)",
    task="Update AdaLoRA's smoothed sensitivity I_bar (Eq. 11) and uncertainty U_bar (Eq. 12) for one adapter "
         "tensor after an optimizer step, from its value, its gradient and the previous EMAs, as PEFT's "
         "RankAllocator.update_ipt does. Return new tensors in the input dtype.",
    hint="I = |param * grad| (Eq. 10, not |grad|); I_bar = beta1 * I_bar + (1 - beta1) * I; then "
         "U_bar = beta2 * U_bar + (1 - beta2) * |I - I_bar| with the I_bar you have just updated.",
    cases=_importance_cases))


def reference_budget(step, *, init_budget, target_budget, tinit, tfinal, total_step):
    """The budget PEFT's ``RankAllocator.budget_schedule(step)`` returns (its first value)."""
    allocator = SimpleNamespace(init_bgt=init_budget, target_bgt=target_budget,
                                peft_config=SimpleNamespace(tinit=tinit, tfinal=tfinal, total_step=total_step, deltaT=1))
    return _rank_allocator().budget_schedule(allocator, step)[0]


def _schedule_cases(rng: random.Random):
    compare = lambda g, e: compare_equal(g, e, what="the budget")  # noqa: E731
    for _ in range(4):
        total_step = rng.randint(30, 3000)
        tinit = rng.randint(0, total_step // 3)
        tfinal = rng.randint(0, total_step // 3)
        target_budget = rng.randint(1, 200)
        init_budget = target_budget + rng.randint(1, 3 * target_budget)
        kw = dict(init_budget=init_budget, target_budget=target_budget, tinit=tinit, tfinal=tfinal,
                  total_step=total_step)
        end = total_step - tfinal
        steps = {0: "step 0", tinit: "step == tinit (still warm-up)", tinit + 1: "first budgeting step",
                 end: "step == total_step - tfinal (last budgeting step)", end + 1: "first final step",
                 total_step: "step == total_step"}
        steps.update({rng.randint(tinit + 1, end): "inside the cubic decay" for _ in range(4)})
        for step, note in steps.items():
            yield Case((step,), reference_budget(step, **kw), compare, kwargs=dict(kw), note=note)


register(Exercise(
    id="ch02.budget_schedule", chapter=2, title="The cubic budget schedule", level="core",
    signature="fn(step, *, init_budget, target_budget, tinit, tfinal, total_step) -> int  "
              "# steps count optimizer steps from 0; budgets count triplets (ranks)",
    task="Return AdaLoRA's total rank budget b(t) at optimizer step `step` (Eq. 14) exactly as PEFT's "
         "RankAllocator.budget_schedule does: the full budget during warm-up, a cubic decay, then the target.",
    hint="step <= tinit: init_budget; step > total_step - tfinal: target_budget; otherwise "
         "int((init_budget - target_budget) * (1 - (step - tinit) / (total_step - tfinal - tinit)) ** 3 + "
         "target_budget). The paper's printed (t - t_i - t_f) is a typo; int() truncates, it does not round.",
    cases=_schedule_cases))


def reference_triplet_scores(score_E, score_A, score_B):
    """PEFT's triplet score (``mask_to_budget`` + ``_combine_ipt``): s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)."""
    comb_A = torch.mean(score_A, dim=1, keepdim=True)
    comb_B = torch.mean(score_B, dim=0, keepdim=False).view(-1, 1)
    return _rank_allocator()._combine_ipt(None, score_E, torch.cat([comb_A, comb_B], dim=1))


def _triplet_cases(rng: random.Random):
    compare = lambda g, e: compare_tensor(g, e, rtol=1e-5, atol=1e-7, what="the triplet scores")  # noqa: E731
    for r, d_in, d_out in [(4, 8, 8), (rng.randint(1, 6), rng.randint(2, 20), rng.randint(2, 20)),
                           (rng.randint(2, 8), 3, 17), (5, 17, 3), (1, 1, 1)]:
        score_E, score_A, score_B = torch.rand(r, 1), torch.rand(r, d_in), torch.rand(d_out, r) * 3
        yield Case((score_E, score_A, score_B), reference_triplet_scores(score_E, score_A, score_B), compare,
                   note="d_in != d_out" if d_in != d_out else "")


register(Exercise(
    id="ch02.triplet_scores", chapter=2, title="The importance of a triplet", level="stretch",
    signature="fn(score_E, score_A, score_B) -> Tensor  # score_E (r, 1), score_A (r, d_in), score_B (d_out, r), "
              "float32 element scores s = I_bar * U_bar; returns (r,) float32",
    task="Combine the element scores of one SVD adapter into one score per triplet (lambda_i, row i of A, "
         "column i of B), as Eq. 7 and PEFT's mask_to_budget do.",
    hint="S_i = s(lambda_i) + mean over the d_in entries of row i of A + mean over the d_out entries of column i "
         "of B. Mind which axis is which: A is (r, d_in), B is (d_out, r).",
    cases=_triplet_cases))
