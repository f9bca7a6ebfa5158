"""Chapter 3 exercises: slicing masked triplets out as ``save_pretrained`` does, the forward pass of AdaLoRA's
SVD adapter, the orthogonality regulariser in PEFT's form, and masking triplets to a budget with one global
threshold, ties included. Expected values come from PEFT itself: ``resize_state_dict_by_rank_pattern``, a real
``SVDLinear`` built by ``get_peft_model``, ``AdaLoraModel.forward`` and ``RankAllocator.mask_to_budget``,
called on the case's tensors."""

from __future__ import annotations

import random
import warnings
from types import SimpleNamespace

import torch

from .core import Case, Exercise, compare_tensor, compare_tuple, register

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ADAPTER = "default"


# ---------------------------------------------------------------------------------------------------------
# 3.1 Slicing masked triplets out, as save_pretrained does

def reference_drop_masked_triplets(lora_A, lora_E, lora_B, rank_pattern):
    """PEFT's ``AdaLoraModel.resize_state_dict_by_rank_pattern`` (what ``save_pretrained`` applies with
    ``config.rank_pattern``) on a one-layer adapter state dict: rows of ``lora_A`` and ``lora_E`` and columns of
    ``lora_B`` whose ``rank_pattern`` entry is True are kept, in order."""
    from peft.tuners.adalora.model import AdaLoraModel

    prefix = "base_model.model.proj"
    state = {f"{prefix}.lora_A.{ADAPTER}": lora_A.clone(), f"{prefix}.lora_E.{ADAPTER}": lora_E.clone(),
             f"{prefix}.lora_B.{ADAPTER}": lora_B.clone()}
    # _get_adapter_state_dict passes the pattern with the adapter name removed from its keys
    out = AdaLoraModel.resize_state_dict_by_rank_pattern(None, {"proj.lora_E": list(rank_pattern)}, state, ADAPTER)
    return tuple(out[f"{prefix}.{part}.{ADAPTER}"] for part in ("lora_A", "lora_E", "lora_B"))


def _drop_cases(rng: random.Random):
    exact = lambda g, e: compare_tensor(g, e, rtol=0, atol=0)  # noqa: E731
    compare = compare_tuple(exact, exact, exact, names=("lora_A", "lora_E", "lora_B"))
    specs = []  # (r, d_in, d_out, pattern, dtype, note)
    r = rng.randint(5, 10)
    specs.append((r, rng.randint(3, 20), rng.randint(3, 20), None, torch.float32, "some triplets masked"))
    r = rng.randint(4, 8)
    specs.append((r, 7, 11, None, rng.choice((torch.float16, torch.bfloat16)), "16-bit adapter: keep the dtype"))
    r = rng.randint(3, 8)
    specs.append((r, rng.randint(3, 20), rng.randint(3, 20), [True] * r, torch.float32, "nothing masked"))
    r = rng.randint(3, 8)
    specs.append((r, rng.randint(3, 20), rng.randint(3, 20), [False] * r, torch.float32,
                  "every triplet masked: rank 0, empty tensors"))
    r = rng.randint(4, 8)
    one = [False] * r
    one[rng.randrange(r)] = True
    specs.append((r, rng.randint(3, 20), rng.randint(3, 20), one, torch.float32, "one triplet kept"))
    r = rng.randint(5, 10)
    specs.append((r, rng.randint(3, 20), rng.randint(3, 20), None, torch.float32,
                  "a kept triplet whose lambda is exactly 0: rank_pattern decides, not lora_E"))
    for r, d_in, d_out, pattern, dtype, note in specs:
        if pattern is None:
            pattern = [rng.random() < 0.5 for _ in range(r)]
            pattern[0], pattern[-1] = True, False  # at least one of each, in random places
            rng.shuffle(pattern)
        lora_A, lora_B = torch.randn(r, d_in).to(dtype), torch.randn(d_out, r).to(dtype)
        lora_E = torch.randn(r, 1).to(dtype)  # signed: lambda can be negative
        if all(pattern):  # |lambda| ascending: sorting the triplets by |lambda| would reorder them
            lora_E = (torch.rand(r, 1).sort(dim=0).values + 0.1) * torch.randint(0, 2, (r, 1)).mul(2).sub(1)
            lora_E = lora_E.to(dtype)
        lora_E[[not keep for keep in pattern]] = 0.0  # masking zeroes lambda
        if "exactly 0" in note:
            lora_E[pattern.index(True)] = 0.0
        expected = reference_drop_masked_triplets(lora_A, lora_E, lora_B, pattern)
        yield Case((lora_A, lora_E, lora_B, list(pattern)), expected, compare, note=note)


register(Exercise(
    id="ch03.drop_masked_triplets", chapter=3, title="Slicing out the masked triplets", level="warm-up",
    signature="fn(lora_A, lora_E, lora_B, rank_pattern) -> (lora_A, lora_E, lora_B)  # in: lora_A (r, d_in) [Q], "
              "lora_E (r, 1) [Lambda], lora_B (d_out, r) [P], float32/float16/bfloat16; rank_pattern: list of r "
              "bools, True = kept; out: (k, d_in), (k, 1), (d_out, k) in the same dtype, k = sum(rank_pattern)",
    task="Masking only zeroes lora_E; the tensors keep init_r triplets until save_pretrained slices them with "
         "config.rank_pattern. Do that slicing for one layer: keep triplet i (row i of lora_A, entry i of "
         "lora_E, column i of lora_B) exactly when rank_pattern[i] is True, in the original order.",
    hint="Make a bool tensor of the pattern; index the rows of lora_A and lora_E and the columns of lora_B "
         "(lora_B[:, mask]). The pattern decides, not lora_E != 0, and the order stays (no sorting by |lambda|).",
    cases=_drop_cases))


# ---------------------------------------------------------------------------------------------------------
# 3.2 The SVD adapter's forward pass

def reference_svd_forward(x, weight, lora_A, lora_E, lora_B, scaling, ranknum):
    """PEFT's ``adalora.SVDLinear.forward``: ``W0 x + (x (A * E)^T B^T) * scaling / (ranknum + 1e-5)``
    (AdaLoRA paper Eq. 3, ``P Lambda Q`` = ``lora_B diag(lora_E) lora_A``). The layer is built by
    ``get_peft_model(..., AdaLoraConfig(init_r=r, lora_alpha=scaling))`` on a bias-free ``Linear`` holding
    ``weight``; ``lora_A``, ``lora_E``, ``lora_B`` and ``ranknum`` are copied in. PEFT keeps the adapter in
    float32 on a 16-bit base (in the base dtype for float32/float64) and adds it in place, so the result keeps
    the base dtype."""
    from peft import AdaLoraConfig, get_peft_model

    d_out, d_in = weight.shape
    r = lora_A.shape[0]
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(d_in, d_out, bias=False, dtype=weight.dtype)
    with torch.no_grad():
        model.proj.weight.copy_(weight)
    config = AdaLoraConfig(init_r=r, target_r=1, lora_alpha=scaling, lora_dropout=0.0, target_modules=["proj"],
                           total_step=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = get_peft_model(model, config).base_model.model.proj
    with torch.no_grad():
        layer.lora_A[ADAPTER].copy_(lora_A)
        layer.lora_E[ADAPTER].copy_(lora_E)
        layer.lora_B[ADAPTER].copy_(lora_B)
        layer.ranknum[ADAPTER].fill_(ranknum)
        return layer(x).detach()


SVD_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
           torch.bfloat16: (1.6e-2, 1.6e-2)}


def _svd_cases(rng: random.Random):
    specs = [  # (leading dims, d_in, d_out, r, scaling, ranknum, dtype, masked, note)
        ((rng.randint(2, 8),), rng.randint(5, 30), rng.randint(5, 30), 6, 32.0, 6.0, torch.float32, 0,
         "float32, ranknum = r"),
        ((rng.randint(2, 8),), rng.randint(5, 30), rng.randint(5, 30), 8, 16.0, 8.0, torch.float32, 3,
         "three masked triplets: lora_E has zeros"),
        ((rng.randint(2, 8),), rng.randint(5, 30), rng.randint(5, 30), 5, 32.0, 12.0, torch.float32, 0,
         "ranknum (init_r = 12) != r = 5: after resizing, ranknum keeps the initial rank"),
        ((2, rng.randint(2, 6)), rng.randint(5, 30), rng.randint(5, 30), rng.randint(2, 8), 8.0, None,
         torch.float32, 1, "3-d input"),
        ((rng.randint(2, 8),), rng.randint(8, 33), rng.randint(8, 33), rng.randint(2, 8), 32.0, None, torch.bfloat16,
         1, "bfloat16 x and W, float32 adapter"),
        ((3, rng.randint(2, 5)), rng.randint(8, 33), rng.randint(8, 33), rng.randint(2, 8), 16.0, None,
         torch.float16, 0, "float16 x and W, float32 adapter"),
        ((rng.randint(2, 8),), rng.randint(5, 30), rng.randint(5, 30), 4, 32.0, 4.0, torch.float64, 1,
         "float64: the + 1e-5 next to ranknum shows"),
        ((rng.randint(2, 8),), 17, 3, 1, 8.0, 1.0, torch.float32, 0, "r = 1, ranknum 1"),
        ((rng.randint(2, 8),), 9, 9, 6, 32.0, 6.0, rng.choice(DTYPES), -1,
         "lora_E = 0 as PEFT initialises it: y is the base layer's output"),
    ]
    for lead, d_in, d_out, r, scaling, ranknum, dtype, masked, note in specs:
        ranknum = float(r if ranknum is None else ranknum)
        adapter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        x = torch.randn(*lead, d_in, dtype=adapter_dtype).to(dtype)
        weight = (torch.randn(d_out, d_in, dtype=adapter_dtype) / d_in ** 0.5).to(dtype)
        lora_A = torch.randn(r, d_in, dtype=adapter_dtype) / d_in ** 0.5
        lora_B = torch.randn(d_out, r, dtype=adapter_dtype)
        lora_E = torch.randn(r, 1, dtype=adapter_dtype) * 0.5
        if masked < 0:
            lora_E.zero_()
        else:
            lora_E[torch.randperm(r)[:masked]] = 0.0
        rtol, atol = SVD_TOL[dtype]
        expected = reference_svd_forward(x, weight, lora_A, lora_E, lora_B, scaling, ranknum)
        yield Case((x, weight, lora_A, lora_E, lora_B, scaling, ranknum), expected,
                   lambda g, e, rtol=rtol, atol=atol: compare_tensor(g, e, rtol=rtol, atol=atol, what="y"), note=note)


register(Exercise(
    id="ch03.svd_forward", chapter=3, title="The forward pass of the SVD adapter", level="core",
    signature="fn(x, weight, lora_A, lora_E, lora_B, scaling, ranknum) -> y  # x (..., d_in) and weight "
              "(d_out, d_in) in float32/bfloat16/float16/float64; lora_A (r, d_in) [Q], lora_E (r, 1) [Lambda], "
              "lora_B (d_out, r) [P] in float32 (float64 with a float64 x); scaling = lora_alpha, ranknum = "
              "init_r, floats; y (..., d_out) in x's dtype",
    task="Compute the output of PEFT's AdaLoRA SVDLinear (no bias, no dropout): the frozen layer's output plus "
         "P Lambda Q x, scaled by lora_alpha / (ranknum + 1e-5). A masked triplet has lora_E = 0 but keeps its "
         "row of lora_A and column of lora_B; return y in x's dtype.",
    hint="y = x W^T + (x (lora_A * lora_E)^T lora_B^T) * scaling / (ranknum + 1e-5): lora_E (r, 1) broadcasts over "
         "the rows of lora_A. ranknum is init_r, not lora_A.shape[0]; run the adapter path with x cast to "
         "lora_A's dtype and cast the sum back to x.dtype.",
    cases=_svd_cases))


# ---------------------------------------------------------------------------------------------------------
# 3.3 The orthogonality regulariser

class _AdapterParameters:
    """A stand-in for the model inside ``AdaLoraModel``: one layer's lora_A and lora_B under PEFT's names and a
    forward that returns a zero loss, so that ``AdaLoraModel.forward`` adds only the regulariser."""

    def __init__(self, lora_A, lora_B):
        self.params = [(f"layer.lora_A.{ADAPTER}", lora_A), (f"layer.lora_B.{ADAPTER}", lora_B)]
        self.dtype = lora_A.dtype

    def named_parameters(self):
        return iter(self.params)

    def forward(self):
        return SimpleNamespace(loss=torch.zeros((), dtype=self.dtype))


def reference_orth_regularization(lora_A, lora_B):
    """``||A A^T - I||_F + ||B^T B - I||_F`` as PEFT's ``AdaLoraModel.forward`` computes it (plain Frobenius
    norms, ``torch.norm(p="fro")``; AdaLoRA paper Eq. 4 squares them): PEFT's forward is run with
    ``orth_reg_weight=1`` on a model whose only adapter tensors are ``lora_A`` and ``lora_B`` and whose loss is
    zero, so it returns their mean over the two matrices; times 2 (exact) gives the sum."""
    from peft.tuners.adalora.model import AdaLoraModel

    fake = SimpleNamespace(model=_AdapterParameters(lora_A.detach(), lora_B.detach()), trainable_adapter_name=ADAPTER,
                           peft_config={ADAPTER: SimpleNamespace(orth_reg_weight=1.0)})
    return (AdaLoraModel.forward(fake).loss * 2).detach()


def _orth_cases(rng: random.Random):
    def compare(dtype):
        rtol, atol = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-14)}[dtype]
        return lambda g, e: compare_tensor(g, e, rtol=rtol, atol=atol, what="the regulariser")

    def orthonormal_rows(r, d, dtype):  # r <= d rows of an orthogonal matrix
        q, _ = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64))
        return q.T.contiguous().to(dtype)

    specs = []  # (lora_A, lora_B, note)
    r, d_in, d_out = 6, rng.randint(10, 40), rng.randint(10, 40)
    specs.append((torch.randn(r, d_in) * 0.02, torch.randn(d_out, r) * 0.02,
                  "PEFT's initialisation N(0, 0.02^2): both terms close to sqrt(r)"))
    r = rng.randint(2, 8)
    specs.append((torch.randn(r, rng.randint(r + 2, 30)) / 3, torch.randn(rng.randint(r + 2, 30), r) / 3,
                  "random factors, d_in != d_out"))
    r = rng.randint(3, 6)
    specs.append((orthonormal_rows(r, rng.randint(r + 3, 20), torch.float32), torch.randn(rng.randint(r + 1, 20), r),
                  "lora_A with orthonormal rows: its term is ~0 and A^T A - I is not"))
    r = rng.randint(3, 6)
    specs.append((torch.randn(r, rng.randint(r + 1, 20)), orthonormal_rows(r, rng.randint(r + 3, 20), torch.float32).T,
                  "lora_B with orthonormal columns: its term is ~0 and B B^T - I is not"))
    r = rng.randint(6, 10)
    specs.append((torch.randn(r, rng.randint(2, r - 2)), torch.randn(rng.randint(2, r - 2), r),
                  "r larger than d_in and d_out: A A^T is (r, r) and rank-deficient"))
    specs.append((torch.randn(1, rng.randint(3, 20)), torch.randn(rng.randint(3, 20), 1), "r = 1"))
    r = rng.randint(2, 8)
    specs.append((torch.randn(r, rng.randint(r + 1, 30), dtype=torch.float64),
                  torch.randn(rng.randint(r + 1, 30), r, dtype=torch.float64), "float64"))
    r = rng.randint(2, 6)
    A, B = orthonormal_rows(r, r + 7, torch.float64), orthonormal_rows(r, r + 4, torch.float64).T
    specs.append((A + 0.01 * torch.randn_like(A), B + 0.01 * torch.randn_like(B),
                  "float64, nearly orthonormal: both terms small"))
    for lora_A, lora_B, note in specs:
        yield Case((lora_A, lora_B), reference_orth_regularization(lora_A, lora_B), compare(lora_A.dtype), note=note)


register(Exercise(
    id="ch03.orth_regularization", chapter=3, title="The orthogonality regulariser, PEFT's form", level="core",
    signature="fn(lora_A, lora_B) -> Tensor  # lora_A (r, d_in) [Q], lora_B (d_out, r) [P], float32 or float64; "
              "returns a 0-dim tensor in their dtype",
    task="Return one layer's orthogonality penalty as PEFT's AdaLoraModel.forward computes it: how far the rows "
         "of lora_A and the columns of lora_B are from orthonormal, each as the plain Frobenius norm of the "
         "deviation from the r x r identity, added. (PEFT then averages over all lora_A and lora_B tensors and "
         "multiplies by orth_reg_weight; the paper's Eq. 4 squares the norms.)",
    hint="Both Gram matrices must be r x r: lora_A @ lora_A.T and lora_B.T @ lora_B. Subtract torch.eye(r) in "
         "their dtype and take torch.norm(..., p='fro') of each, without squaring.",
    cases=_orth_cases))


# ---------------------------------------------------------------------------------------------------------
# 3.4 Masking to the budget

class _ScoredAdapters:
    """A stand-in for an AdaLoRA model in ``RankAllocator.mask_to_budget``: for every matrix, lora_A/lora_B/
    lora_E entries under PEFT's names. The element scores of lora_A and lora_B are zeros and lora_E's are
    the triplet scores, so PEFT's triplet score ``s(E) + (mean s(A) + mean s(B))`` is the given score exactly."""

    def __init__(self, triplet_scores: dict[str, torch.Tensor]):
        self.params, self.element_scores = [], {}
        for name, score in triplet_scores.items():
            r = score.numel()
            for part, value, element in (("lora_A", torch.zeros(r, 1), torch.zeros(r, 1)),
                                         ("lora_B", torch.zeros(1, r), torch.zeros(1, r)),
                                         ("lora_E", torch.ones(r, 1), score.detach().reshape(r, 1).clone())):
                full = f"{name}.{part}.{ADAPTER}"
                self.params.append((full, value))
                self.element_scores[full] = element

    def named_parameters(self):
        return iter(self.params)


def reference_mask_to_budget(triplet_scores: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """PEFT's ``RankAllocator.mask_to_budget(model, budget)`` (AdaLoRA paper Eq. 8) on these triplet scores:
    the threshold is ``torch.kthvalue`` of all scores at ``k = n_triplets - budget`` and a triplet is masked when
    its score is ``<=`` it. Returns ``{name: bool (r,)}``, True = kept, from PEFT's ``rank_pattern``."""
    from peft.tuners.adalora.layer import RankAllocator

    model = _ScoredAdapters(triplet_scores)
    total = sum(s.numel() for s in triplet_scores.values())
    allocator = SimpleNamespace(adapter_name=ADAPTER, init_bgt=total,
                                _element_score=lambda n: model.element_scores[n],
                                _combine_ipt=lambda ipt_E, ipt_AB: RankAllocator._combine_ipt(None, ipt_E, ipt_AB))
    pattern = RankAllocator.mask_to_budget(allocator, model, budget)
    return {name: torch.tensor(pattern[f"{name}.lora_E.{ADAPTER}"], dtype=torch.bool) for name in triplet_scores}


def _compare_masks(got, expected) -> str | None:
    if not isinstance(got, dict):
        return f"the result must be a dict {{name: bool tensor (r,)}}, got {type(got).__name__}"
    if set(got) != set(expected):
        return f"the result's keys are {sorted(got)}, expected {sorted(expected)}"
    for name, mask in expected.items():
        wrong = compare_tensor(got[name], mask, rtol=0, atol=0, what=f"the mask of {name!r}")
        if wrong:
            kept = sum(int(m.sum()) for m in got.values() if isinstance(m, torch.Tensor))
            peft_kept = sum(int(m.sum()) for m in expected.values())
            return f"{wrong} (you keep {kept} triplets in all, PEFT keeps {peft_kept})"
    return None


def _layer_names(rng: random.Random, n: int) -> list[str]:
    kinds = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
    names = [f"encoder.layer.{i // len(kinds)}.{kinds[i % len(kinds)]}" for i in range(n)]
    rng.shuffle(names)
    return names


def _mask_cases(rng: random.Random):
    def scores(ranks, draw):
        return {name: draw(r) for name, r in zip(_layer_names(rng, len(ranks)), ranks)}

    def continuous(r):
        return torch.rand(r) * 1e-3

    def discrete(r):  # few distinct values: ties everywhere
        return torch.randint(0, 4, (r,)).float() * 0.25

    specs = []  # (scores, budget, note)
    ranks = [rng.randint(2, 8) for _ in range(rng.randint(2, 4))]
    specs.append((scores(ranks, continuous), rng.randint(1, sum(ranks) - 1), "distinct scores"))
    for _ in range(2):  # a tie that straddles the threshold: PEFT masks all tied triplets
        ranks = [rng.randint(3, 8) for _ in range(rng.randint(2, 4))]
        s = scores(ranks, discrete)
        ordered = torch.cat(list(s.values())).sort().values
        k = rng.choice([i for i in range(1, len(ordered)) if ordered[i - 1] == ordered[i]])
        specs.append((s, len(ordered) - k, "exact ties at the threshold: fewer than `budget` triplets survive"))
    ranks = [rng.randint(2, 6) for _ in range(rng.randint(2, 3))]
    s = scores(ranks, continuous)
    loser = rng.choice(list(s))
    s[loser] = torch.rand(s[loser].numel()) * 1e-6  # far below the others
    specs.append((s, rng.randint(1, sum(ranks) - s[loser].numel()), "one matrix loses every rank"))
    ranks = [1] + [rng.randint(2, 6) for _ in range(2)]
    specs.append((scores(ranks, continuous), rng.randint(1, sum(ranks) - 1), "a matrix of rank 1"))
    ranks = [rng.randint(2, 6) for _ in range(3)]
    specs.append((scores(ranks, continuous), 1, "budget 1: only the best triplet survives"))
    specs.append((scores(ranks, continuous), sum(ranks) - 1, "budget n - 1: only the worst triplet goes"))
    ranks = [rng.randint(2, 5) for _ in range(3)]
    specs.append((scores(ranks, lambda r: torch.full((r,), 0.5)), rng.randint(1, sum(ranks) - 1),
                  "all scores equal: every triplet is masked"))
    ranks = [rng.randint(4, 12) for _ in range(12)]
    specs.append((scores(ranks, lambda r: torch.rand(r) * 1e-9), rng.randint(1, sum(ranks) - 1),
                  "twelve matrices, tiny scores (1e-9) as real importance scores are"))
    for s, budget, note in specs:
        yield Case((s, budget), reference_mask_to_budget(s, budget), _compare_masks, note=note)


register(Exercise(
    id="ch03.mask_to_budget", chapter=3, title="Masking triplets to the budget", level="stretch",
    signature="fn(triplet_scores: dict[str, Tensor], budget: int) -> dict[str, Tensor]  # scores: {matrix name: "
              "(r_k,) float32 triplet scores S_{k,i}}; 1 <= budget < total triplets; returns {name: (r_k,) bool}, "
              "True = kept",
    task="Keep the budget best triplets over all matrices together (Eq. 8) exactly as PEFT's "
         "RankAllocator.mask_to_budget does: one global threshold from the sorted scores, every triplet at or "
         "below it masked. Ties at the threshold are all masked, so fewer than `budget` may survive, and a "
         "matrix can lose every rank.",
    hint="Concatenate all scores, threshold = torch.kthvalue(all_scores, k=total - budget).values; kept = "
         "score > threshold for each matrix. Do not use topk: it breaks ties by position and keeps exactly budget.",
    cases=_mask_cases))

