"""Chapter 4 exercises: the notebook's solutions pass, classic mistakes fail, references are right."""

import math

import pytest
import torch
from scipy.stats import norm

from companion.exercises import ch04
from exercise_helpers import assert_passes, assert_rejected, solutions

SOL = solutions(4)


def _quantize_with(A, blocksize, *, code=None, right=False, per_row=False, divide_all=False, absmax_dtype=None):
    """A parametrised NF4 quantizer for the wrong solutions below (the right one is the notebook's)."""
    code = SOL["nf4_codebook"]() if code is None else code  # the student's own codebook
    mids = (code[:-1] + code[1:]) / 2
    x = A.detach().float()
    if per_row:  # one scale per row instead of per block
        rows = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
        absmax = rows.abs().amax(dim=1)
        scaled = (rows / absmax[:, None]).reshape(-1)
    else:
        flat = x.reshape(-1)
        blocks = flat.split(blocksize)
        absmax = torch.stack([b.abs().max() for b in blocks])
        scaled = torch.cat([b / m.clamp(min=1e-38) for b, m in zip(blocks, absmax)])
    codes = torch.bucketize(scaled.clamp(-1, 1), mids, right=right).to(torch.uint8)
    if absmax_dtype is not None:
        absmax = absmax.to(absmax_dtype)
    return codes, absmax


def quantize_ties_up(A, blocksize):
    return _quantize_with(A, blocksize, right=True)


def quantize_per_row(A, blocksize):
    return _quantize_with(A, blocksize, per_row=True)


def quantize_equal_bin(A, blocksize):
    return _quantize_with(A, blocksize, code=codebook_equal_bin())


def quantize_absmax_in_input_dtype(A, blocksize):
    return _quantize_with(A, blocksize, absmax_dtype=A.dtype)


def quantize_int64_codes(A, blocksize):
    codes, absmax = _quantize_with(A, blocksize)
    return codes.long(), absmax


def codebook_equal_bin():
    edges = norm.ppf(torch.linspace(0, 1, 17, dtype=torch.float64).numpy())
    pdf = norm.pdf(edges)
    c = torch.tensor((pdf[:-1] - pdf[1:]) * 16)
    return (c / c.max()).float()


def codebook_symmetric():  # 7 + 7 values and a zero: use_extra_value=False
    pos = norm.ppf(torch.linspace(0.9677083, 0.5, 8)[:-1])
    v = torch.tensor(pos.tolist() + [0.0] + (-pos).tolist(), dtype=torch.float32).sort().values
    return torch.cat([v / v.max(), torch.ones(1)])


def codebook_float64():
    return SOL["nf4_codebook"]().double()


def codebook_scipy_float64_grid():  # the grid in float64: differs from bitsandbytes in the last bits
    offset = 0.9677083
    pos = norm.ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1].numpy())
    neg = -norm.ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1].numpy())
    v = torch.tensor(pos.tolist() + [0.0] + neg.tolist(), dtype=torch.float32).sort().values
    return v / v.max()


def dq_no_double_quant(blocksize, blocksize2=256):
    return 4 + 32 / blocksize


def dq_forgets_second_level(blocksize, blocksize2=256):
    return 4 + 8 / blocksize


def dq_scale_per_blocksize2_weights(blocksize, blocksize2=256):
    return 4 + 8 / blocksize + 32 / blocksize2


def dq_constants_only(blocksize, blocksize2=256):
    return 8 / blocksize + 32 / (blocksize * blocksize2)


def lru_fifo(accesses, n_slots):
    pool, moves = [], 0
    for page in accesses:
        if page not in pool:
            moves += 1
            if len(pool) == n_slots:
                pool.pop(0)
            pool.append(page)
    return moves


def lru_counts_evictions(accesses, n_slots):
    from collections import OrderedDict

    pool, evictions = OrderedDict(), 0
    for page in accesses:
        if page in pool:
            pool.move_to_end(page)
            continue
        if len(pool) == n_slots:
            pool.popitem(last=False)
            evictions += 1
        pool[page] = None
    return evictions


def lru_counts_accesses(accesses, n_slots):
    return len(accesses)


def lru_evicts_newest(accesses, n_slots):
    from collections import OrderedDict

    pool, moves = OrderedDict(), 0
    for page in accesses:
        if page in pool:
            pool.move_to_end(page)
            continue
        moves += 1
        if len(pool) == n_slots:
            pool.popitem(last=True)
        pool[page] = None
    return moves


WRONG = {
    "ch04.nf4_codebook": [codebook_equal_bin, codebook_symmetric, codebook_float64, codebook_scipy_float64_grid],
    "ch04.quantize_nf4": [quantize_ties_up, quantize_per_row, quantize_equal_bin, quantize_absmax_in_input_dtype,
                          quantize_int64_codes],
    "ch04.double_quant_bits": [dq_no_double_quant, dq_forgets_second_level, dq_scale_per_blocksize2_weights,
                               dq_constants_only],
    "ch04.lru_page_moves": [lru_fifo, lru_counts_evictions, lru_counts_accesses, lru_evicts_newest],
}


@pytest.mark.parametrize("name", ["nf4_codebook", "quantize_nf4", "double_quant_bits", "lru_page_moves"])
def test_the_notebook_solution_passes(name):
    assert_passes(f"ch04.{name}", SOL[name])


@pytest.mark.parametrize("exercise_id,fn", [(k, f) for k, fns in WRONG.items() for f in fns],
                         ids=lambda v: getattr(v, "__name__", v))
def test_a_classic_mistake_fails_with_a_helpful_message(exercise_id, fn):
    assert_rejected(exercise_id, fn)


def test_calling_bitsandbytes_for_the_graded_computation_is_reported():
    def via_bnb(A, blocksize):
        return ch04.reference_quantize_nf4(A, blocksize)

    def via_companion(A, blocksize):
        from companion.quant import quantize_4bit

        packed, state = quantize_4bit(A, blocksize)
        return packed, state.absmax

    assert_rejected("ch04.quantize_nf4", via_bnb, status="uses_reference")
    assert_rejected("ch04.quantize_nf4", via_companion, status="uses_reference")


def test_the_tie_cases_put_values_exactly_on_a_threshold():
    import random

    cases = list(ch04._quantize_cases(random.Random(5)))
    ties = [c for c in cases if "exactly on the thresholds" in c.note]
    mids = (lambda c: (c[:-1] + c[1:]) / 2)(ch04.reference_nf4())
    for case in ties:
        A, blocksize = case.args
        scale = A.abs().max()
        assert all(bool((b.abs() == scale).any()) for b in A.split(blocksize))  # every block's absmax is scale
        scaled = A.reshape(-1) / scale
        on = torch.isin(scaled, mids)
        assert on.sum() >= len(scaled) * 3 // 4
        codes, _ = case.expected
        assert torch.equal(codes[on].long(), torch.bucketize(scaled[on], mids))  # bitsandbytes: the lower code


def test_the_reference_codebook_is_bitsandbytes_and_the_companion():
    from companion.quant import nf4_codebook

    assert torch.equal(ch04.reference_nf4(), nf4_codebook())


@pytest.mark.parametrize("blocksize", [64, 256])
def test_double_quant_bits_matches_the_bytes_of_a_real_bitsandbytes_state(blocksize):
    import bitsandbytes.functional as F

    n = 4096 * 1024
    packed, state = F.quantize_4bit(torch.randn(n), blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    stored = packed.numel() + state.absmax.numel() * state.absmax.element_size() \
        + state.state2.absmax.numel() * 4 + 4  # + the float32 offset
    measured = 8 * stored / n
    assert math.isclose(measured, ch04.reference_double_quant_bits(blocksize), rel_tol=0, abs_tol=1e-4)


def test_lru_reference_against_a_hand_count():
    # slots 2: 0 in, 1 in, 0 hit, 2 in (evicts 1), 0 hit, 3 in (evicts 2), 0 hit, 1 in (evicts 3) -> 5
    assert ch04.reference_lru_page_moves([0, 1, 0, 2, 0, 3, 0, 1], 2) == 5
    assert lru_fifo([0, 1, 0, 2, 0, 3, 0, 1], 2) == 6
