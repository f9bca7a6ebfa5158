"""Chapter 3 exercises: the notebook's solutions pass, classic mistakes fail, references equal PEFT and the
companion."""

import random
from types import SimpleNamespace

import pytest
import torch

from companion.exercises import ch03
from exercise_helpers import assert_passes, assert_rejected, solutions

SOL = solutions(3)


def drop_keep_inverted(lora_A, lora_E, lora_B, rank_pattern):  # True read as "masked"
    return SOL["drop_masked_triplets"](lora_A, lora_E, lora_B, [not k for k in rank_pattern])


def drop_lambda_flat(lora_A, lora_E, lora_B, rank_pattern):  # lora_E returned as (k,), not (k, 1)
    lora_A, lora_E, lora_B = SOL["drop_masked_triplets"](lora_A, lora_E, lora_B, rank_pattern)
    return lora_A, lora_E.reshape(-1), lora_B


def drop_sorted_by_magnitude(lora_A, lora_E, lora_B, rank_pattern):  # reorders like an SVD would
    lora_A, lora_E, lora_B = SOL["drop_masked_triplets"](lora_A, lora_E, lora_B, rank_pattern)
    order = lora_E.reshape(-1).float().abs().argsort(descending=True, stable=True)
    return lora_A[order], lora_E[order], lora_B[:, order]


def drop_b_unsliced(lora_A, lora_E, lora_B, rank_pattern):
    keep = torch.tensor(rank_pattern, dtype=torch.bool)
    return lora_A[keep], lora_E[keep], lora_B


def drop_by_nonzero_lambda(lora_A, lora_E, lora_B, rank_pattern):  # lora_E != 0 instead of the pattern
    keep = lora_E.reshape(-1) != 0
    return lora_A[keep], lora_E[keep], lora_B[:, keep]


def _svd(x, weight, lora_A, lora_E, lora_B, factor):
    update = x.to(lora_A.dtype) @ (lora_A * lora_E).T @ lora_B.T
    return (x @ weight.T + update * factor).to(x.dtype)


def svd_divides_by_current_rank(x, weight, lora_A, lora_E, lora_B, scaling, ranknum):
    return _svd(x, weight, lora_A, lora_E, lora_B, scaling / (lora_A.shape[0] + 1e-5))


def svd_without_lambda(x, weight, lora_A, lora_E, lora_B, scaling, ranknum):  # P Q, Lambda forgotten
    return _svd(x, weight, lora_A, torch.ones_like(lora_E), lora_B, scaling / (ranknum + 1e-5))


def svd_without_eps(x, weight, lora_A, lora_E, lora_B, scaling, ranknum):
    return _svd(x, weight, lora_A, lora_E, lora_B, scaling / ranknum)


def svd_scaling_not_divided(x, weight, lora_A, lora_E, lora_B, scaling, ranknum):  # alpha, not alpha / r
    return _svd(x, weight, lora_A, lora_E, lora_B, scaling)


def svd_adapter_dtype_result(x, weight, lora_A, lora_E, lora_B, scaling, ranknum):  # no cast back to x's dtype
    xa = x.to(lora_A.dtype)
    return xa @ weight.to(lora_A.dtype).T + (xa @ (lora_A * lora_E).T @ lora_B.T) * scaling / (ranknum + 1e-5)


def _dev(cov):
    return torch.norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype), p="fro")


def orth_squared(lora_A, lora_B):  # the paper's Eq. 4, not PEFT
    return _dev(lora_A @ lora_A.T) ** 2 + _dev(lora_B.T @ lora_B) ** 2


def orth_wrong_gram(lora_A, lora_B):  # A^T A (d_in x d_in) and B B^T (d_out x d_out)
    return _dev(lora_A.T @ lora_A) + _dev(lora_B @ lora_B.T)


def orth_no_identity(lora_A, lora_B):
    return torch.norm(lora_A @ lora_A.T, p="fro") + torch.norm(lora_B.T @ lora_B, p="fro")


def orth_peft_mean(lora_A, lora_B):  # PEFT's average over the two tensors instead of their sum
    return (_dev(lora_A @ lora_A.T) + _dev(lora_B.T @ lora_B)) / 2


def orth_python_float(lora_A, lora_B):
    return (_dev(lora_A @ lora_A.T) + _dev(lora_B.T @ lora_B)).item()


def mask_topk(triplet_scores, budget):  # exactly `budget` kept: ties broken by position
    names = list(triplet_scores)
    flat = torch.cat([triplet_scores[n].reshape(-1) for n in names])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, budget).indices] = True
    return dict(zip(names, keep.split([triplet_scores[n].numel() for n in names])))


def mask_strict_below(triplet_scores, budget):  # masks only scores < threshold
    flat = torch.cat([s.reshape(-1) for s in triplet_scores.values()])
    threshold = torch.kthvalue(flat, flat.numel() - budget).values
    return {n: s.reshape(-1) >= threshold for n, s in triplet_scores.items()}


def mask_k_is_budget(triplet_scores, budget):  # kthvalue at k = budget
    flat = torch.cat([s.reshape(-1) for s in triplet_scores.values()])
    threshold = torch.kthvalue(flat, budget).values
    return {n: s.reshape(-1) > threshold for n, s in triplet_scores.items()}


def mask_per_matrix(triplet_scores, budget):  # a share of the budget per matrix, in proportion to its rank
    total = sum(s.numel() for s in triplet_scores.values())
    out = {}
    for n, s in triplet_scores.items():
        s = s.reshape(-1)
        keep = torch.zeros(s.numel(), dtype=torch.bool)
        keep[torch.topk(s, max(1, round(budget * s.numel() / total))).indices] = True
        out[n] = keep
    return out


def mask_inverted(triplet_scores, budget):  # True = masked
    return {n: ~m for n, m in SOL["mask_to_budget"](triplet_scores, budget).items()}


WRONG = {
    "ch03.drop_masked_triplets": [drop_keep_inverted, drop_lambda_flat, drop_sorted_by_magnitude, drop_b_unsliced,
                                  drop_by_nonzero_lambda],
    "ch03.svd_forward": [svd_divides_by_current_rank, svd_without_lambda, svd_without_eps, svd_scaling_not_divided,
                         svd_adapter_dtype_result],
    "ch03.orth_regularization": [orth_squared, orth_wrong_gram, orth_no_identity, orth_peft_mean, orth_python_float],
    "ch03.mask_to_budget": [mask_topk, mask_strict_below, mask_k_is_budget, mask_per_matrix, mask_inverted],
}


@pytest.mark.parametrize("name", ["drop_masked_triplets", "svd_forward", "orth_regularization", "mask_to_budget"])
def test_the_notebook_solution_passes(name):
    assert_passes(f"ch03.{name}", SOL[name])


@pytest.mark.parametrize("exercise_id,fn", [(k, f) for k, fns in WRONG.items() for f in fns],
                         ids=lambda v: getattr(v, "__name__", v))
def test_a_classic_mistake_fails_with_a_helpful_message(exercise_id, fn):
    assert_rejected(exercise_id, fn)


def test_calling_peft_or_the_companion_for_the_graded_computation_is_reported():
    def mask_via_companion(triplet_scores, budget):
        from companion.adalora.masking import mask_to_budget

        return mask_to_budget(triplet_scores, budget)

    def orth_via_companion(lora_A, lora_B):
        from companion.adalora.regularization import orthogonality_deviations

        dev_P, dev_Q = orthogonality_deviations(lora_B, lora_A)
        return dev_Q + dev_P

    def svd_via_peft(x, weight, lora_A, lora_E, lora_B, scaling, ranknum):
        return ch03.reference_svd_forward(x, weight, lora_A, lora_E, lora_B, scaling, ranknum)

    def drop_via_peft(lora_A, lora_E, lora_B, rank_pattern):
        return ch03.reference_drop_masked_triplets(lora_A, lora_E, lora_B, rank_pattern)

    assert_rejected("ch03.drop_masked_triplets", drop_via_peft, status="uses_reference")
    assert_rejected("ch03.mask_to_budget", mask_via_companion, status="uses_reference")
    assert_rejected("ch03.orth_regularization", orth_via_companion, status="uses_reference")
    assert_rejected("ch03.svd_forward", svd_via_peft, status="uses_reference")


def test_the_svd_reference_equals_the_companions_svdlinear_bit_for_bit():
    from companion.adalora.layer import SVDLinear

    for case in ch03._svd_cases(random.Random(7)):
        x, weight, lora_A, lora_E, lora_B, scaling, ranknum = case.args
        base = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        layer = SVDLinear(base, init_r=lora_A.shape[0], lora_alpha=scaling)
        with torch.no_grad():
            base.weight.copy_(weight)
            for name, value in (("lora_A", lora_A), ("lora_E", lora_E), ("lora_B", lora_B)):
                getattr(layer, name).copy_(value)
            layer.ranknum.fill_(ranknum)
            assert torch.equal(layer(x), case.expected), case.note


def test_the_orth_reference_equals_a_real_adalora_model_and_the_companion():
    from peft import AdaLoraConfig, get_peft_model

    from companion.adalora.regularization import orthogonality_deviations

    class Tiny(torch.nn.Module):
        def __init__(self, d_in, d_out):
            super().__init__()
            self.proj = torch.nn.Linear(d_in, d_out)

        def forward(self, x):
            return SimpleNamespace(loss=self.proj(x).sum() * 0)  # a zero loss: only the regulariser

    for case in ch03._orth_cases(random.Random(8)):
        lora_A, lora_B = case.args
        dev_P, dev_Q = orthogonality_deviations(lora_B, lora_A)
        assert torch.equal(dev_Q + dev_P, case.expected), case.note
        if lora_A.dtype != torch.float32:
            continue
        model = get_peft_model(Tiny(lora_A.shape[1], lora_B.shape[0]), AdaLoraConfig(
            init_r=lora_A.shape[0], target_r=1, target_modules=["proj"], total_step=10, orth_reg_weight=1.0))
        layer = model.base_model.model.proj
        with torch.no_grad():
            layer.lora_A["default"].copy_(lora_A)
            layer.lora_B["default"].copy_(lora_B)
        loss = model.base_model(torch.zeros(1, lora_A.shape[1])).loss  # AdaLoraModel.forward: 0 + mean of 2
        torch.testing.assert_close(loss * 2, case.expected, rtol=0, atol=0)


def test_the_mask_reference_equals_the_companion_and_ties_keep_fewer_than_the_budget():
    from companion.adalora.masking import mask_to_budget

    for seed in range(4):
        for case in ch03._mask_cases(random.Random(seed)):
            scores, budget = case.args
            ours = mask_to_budget(scores, budget)
            assert all(torch.equal(ours[n], case.expected[n]) for n in scores), case.note
            kept = sum(int(m.sum()) for m in case.expected.values())
            if "ties" in case.note or "equal" in case.note:
                assert kept < budget, case.note
            else:
                assert kept == budget, case.note
            if "loses every rank" in case.note:
                assert any(not m.any() for m in case.expected.values())


@pytest.mark.filterwarnings("ignore:Adapter 'default'")  # PEFT warns about the rank-0 case; it saves it all the same
def test_the_drop_reference_is_what_peft_saves_for_a_real_adalora_model():
    from peft import AdaLoraConfig, get_peft_model, get_peft_model_state_dict

    for case in ch03._drop_cases(random.Random(9)):
        lora_A, lora_E, lora_B, pattern = case.args
        model = torch.nn.Module()
        model.proj = torch.nn.Linear(lora_A.shape[1], lora_B.shape[0], dtype=lora_A.dtype)
        model = get_peft_model(model, AdaLoraConfig(init_r=lora_A.shape[0], target_r=1, target_modules=["proj"],
                                                    total_step=10, init_lora_weights=False))
        layer = model.base_model.model.proj
        with torch.no_grad():
            for name, value in (("lora_A", lora_A), ("lora_E", lora_E), ("lora_B", lora_B)):
                getattr(layer, name)["default"].data = value.clone()
        model.peft_config["default"].rank_pattern = {"proj.lora_E.default": list(pattern)}
        saved = get_peft_model_state_dict(model)
        for name, expected in zip(("lora_A", "lora_E", "lora_B"), case.expected):
            assert torch.equal(saved[f"base_model.model.proj.{name}"], expected), case.note
