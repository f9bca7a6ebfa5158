"""Chapter 4 exercises: the NF4 codebook, blockwise NF4 quantization, double quantization's bits,
and the page moves of an LRU pool. Expected values come from bitsandbytes where it implements the
computation (``get_4bit_type``, ``quantize_4bit``, the bytes of a real ``QuantState``)."""

from __future__ import annotations

import random
from collections import OrderedDict

import torch

from .core import Case, Exercise, compare_equal, compare_number, compare_tensor, compare_tuple, register

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes quantize_4bit
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _bnb():
    import bitsandbytes.functional as F  # imported on first use: it is slow to import

    return F


def reference_nf4() -> torch.Tensor:
    """bitsandbytes' 16 NF4 values (``get_4bit_type("nf4")``), float32, sorted."""
    return _bnb().get_4bit_type("nf4", device="cpu").float()


def reference_quantize_nf4(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``bitsandbytes.functional.quantize_4bit(A, blocksize, quant_type="nf4")`` unpacked: the
    ``A.numel()`` codes (uint8, high nibble first) and the float32 absmax per block."""
    packed, state = _bnb().quantize_4bit(A, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    p = packed.reshape(-1)
    codes = torch.stack([p >> 4, p & 0x0F], dim=1).reshape(-1)[: A.numel()]
    return codes, state.absmax.float()


def _nf4_cases(rng: random.Random):
    expected = reference_nf4()
    yield Case((), expected, lambda got, e: compare_tensor(got, e, rtol=0, atol=0, what="the codebook"),
               note="16 sorted float32 values, bit-exact")


register(Exercise(
    id="ch04.nf4_codebook", chapter=4, title="The 16 NF4 values", level="warm-up",
    signature="fn() -> Tensor  # (16,) float32, sorted ascending",
    task="Build the NF4 codebook as bitsandbytes does: 7 negative values, an exact 0 and 8 positive values, "
         "from quantiles of N(0, 1), scaled so the extremes are exactly -1 and +1.",
    hint="positive half: scipy.stats.norm.ppf of torch.linspace(0.9677083, 0.5, 9)[:-1] (a float32 grid); "
         "negative half: -norm.ppf of torch.linspace(0.9677083, 0.5, 8)[:-1]; add 0.0, sort, make float32 and "
         "divide by the largest value.",
    cases=_nf4_cases))


def _tie_tensor(rng: random.Random, n: int, scale: float, blocksize: int) -> torch.Tensor:
    """Values that sit exactly on NF4 decision thresholds after scaling by ``scale`` (a power of two, so
    ``x * (1 / absmax)`` is exact), with one ``+-scale`` in every block so each block's absmax is ``scale``."""
    code = reference_nf4()
    mids = ((code[:-1] + code[1:]) / 2).tolist()
    values = [rng.choice(mids) * scale for _ in range(n)]
    for start in range(0, n, blocksize):
        values[rng.randrange(start, min(start + blocksize, n))] = scale * rng.choice((-1.0, 1.0))
    return torch.tensor(values, dtype=torch.float32)


def _quantize_cases(rng: random.Random):
    compare = compare_tuple(lambda g, e: compare_tensor(g, e, rtol=0, atol=0),
                            lambda g, e: compare_tensor(g, e, rtol=0, atol=0), names=("codes", "absmax"))
    specs = [  # (shape, blocksize, dtype, note)
        ((64,), 64, torch.float32, "one full block"),
        ((rng.randint(3, 9), rng.randint(5, 13)), 32, torch.float32, "odd shape, partial last block"),
        ((rng.randint(2, 6), 97), 64, torch.float16, "float16 input, partial last block"),
        ((rng.randint(2, 6), 61), 128, torch.bfloat16, "bfloat16 input, partial last block"),
        ((3, 5, rng.randint(20, 50)), rng.choice((32, 64)), rng.choice(DTYPES), "3-d tensor, row-major order"),
        ((1, 4096 + rng.randint(1, 300)), 4096, torch.float32, "large block, partial last block"),
        ((rng.randint(1, 3), 256), 256, torch.float32, "one row per block"),
        ((7,), 64, torch.float32, "fewer values than one block"),
    ]
    for shape, blocksize, dtype, note in specs:
        A = (torch.randn(shape) * rng.choice((0.02, 1.0, 30.0))).to(dtype)
        if rng.random() < 0.5:
            A.view(-1)[rng.randrange(A.numel())] = 0.0  # an exact zero keeps code 7
        yield Case((A, blocksize), reference_quantize_nf4(A, blocksize), compare, note=note)
    for scale, blocksize, n in ((1.0, 64, 64), (0.5, 32, 96), (4.0, 64, 150)):
        A = _tie_tensor(rng, n, scale, blocksize)
        yield Case((A, blocksize), reference_quantize_nf4(A, blocksize), compare,
                   note="values exactly on the thresholds between two codes")
    A = _tie_tensor(rng, 64, 2.0, 32).to(torch.bfloat16)  # midpoints rounded to bf16: near-ties
    yield Case((A, 32), reference_quantize_nf4(A, 32), compare, note="bfloat16 near-ties")
    A = torch.zeros(2, 40)
    yield Case((A, 32), reference_quantize_nf4(A, 32), compare, note="all-zero blocks (absmax 0)")


register(Exercise(
    id="ch04.quantize_nf4", chapter=4, title="Blockwise NF4 quantization, bit-exact", level="core",
    signature="fn(A: Tensor, blocksize: int) -> (codes, absmax)  # codes: uint8 (A.numel(),) in row-major "
              "order, values 0-15; absmax: float32 (ceil(A.numel() / blocksize),); A: float32/float16/bfloat16",
    task="Quantize A to NF4 the way bitsandbytes' quantize_4bit does (no double quantization): flatten in "
         "row-major order, cut into blocks of blocksize (the last may be shorter), scale each block by its "
         "absolute maximum and pick the nearest NF4 value. Return the unpacked codes and the block maxima.",
    hint="absmax in float32 per block; scaled = x.float() * (1 / absmax) for full blocks, x.float() / absmax "
         "for the partial last block, clamped to [-1, 1]; thresholds are the midpoints of neighbouring codebook "
         "values and a value exactly on a midpoint takes the LOWER code (torch.bucketize(scaled, midpoints)).",
    cases=_quantize_cases))


def reference_double_quant_bits(blocksize: int, blocksize2: int = 256) -> float:
    """4-bit codes + one uint8 constant per block + one float32 scale per ``blocksize2`` constants
    (QLoRA §3: ``8/64 + 32/(64*256) = 0.127`` bits of constants at the defaults). The one float32
    offset per tensor is left out (it vanishes per parameter); the test cross-checks this against the
    bytes of bitsandbytes' real double-quantized ``QuantState``."""
    return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)


def _dq_cases(rng: random.Random):
    pairs = [(64, 256), (64, None), (rng.choice(BLOCKSIZES), None)]
    pairs += [(rng.choice(BLOCKSIZES), rng.choice((64, 128, 256, 512, 1024))) for _ in range(5)]
    for blocksize, blocksize2 in pairs:
        args = (blocksize,) if blocksize2 is None else (blocksize, blocksize2)
        expected = reference_double_quant_bits(blocksize, blocksize2 or 256)
        yield Case(args, expected, lambda g, e: compare_number(g, e, rel=1e-9, what="bits per parameter"),
                   note="the default blocksize2=256" if blocksize2 is None else "")


register(Exercise(
    id="ch04.double_quant_bits", chapter=4, title="Bits per parameter with double quantization", level="warm-up",
    signature="fn(blocksize: int, blocksize2: int = 256) -> float  # bits per parameter",
    task="How many bits does one weight cost in NF4 with double quantization, counting the 4-bit code and its "
         "share of the quantization constants (first-level constants stored in 8 bits, one float32 scale per "
         "blocksize2 of them)? Ignore the single float32 offset per tensor.",
    hint="a block of blocksize weights shares one 8-bit constant; blocksize2 such constants share one 32-bit "
         "scale, i.e. blocksize * blocksize2 weights share it. At (64, 256) the answer is 4.127 (QLoRA §3).",
    cases=_dq_cases))


def reference_lru_page_moves(accesses: list[int], n_slots: int) -> int:
    """Page-ins of an LRU pool of ``n_slots`` that starts empty (a hit refreshes the page's recency)."""
    pool: OrderedDict[int, None] = OrderedDict()
    moves = 0
    for page in accesses:
        if page in pool:
            pool.move_to_end(page)
            continue
        moves += 1
        if len(pool) == n_slots:
            pool.popitem(last=False)
        pool[page] = None
    return moves


def _lru_cases(rng: random.Random):
    compare = lambda g, e: compare_equal(g, e, what="the number of page moves")  # noqa: E731
    yield Case(([0, 1, 0, 2, 0, 3, 0, 1], 2), reference_lru_page_moves([0, 1, 0, 2, 0, 3, 0, 1], 2), compare,
               note="a hot page that LRU keeps and FIFO evicts")
    yield Case(([], 3), 0, compare, note="no accesses")
    yield Case(([5, 5, 5], 1), 1, compare, note="one slot, one page")
    for _ in range(6):
        pages, slots = rng.randint(2, 12), rng.randint(1, 6)
        hot = rng.randrange(pages)
        seq = [hot if rng.random() < 0.4 else rng.randrange(pages) for _ in range(rng.randint(10, 60))]
        yield Case((seq, slots), reference_lru_page_moves(seq, slots), compare)
    steps = rng.randint(2, 4)  # an optimizer that sweeps 5 pages per step through 4 slots: every access moves
    yield Case((list(range(5)) * steps, 4), 5 * steps, compare, note="a cyclic sweep one page larger than the pool")


register(Exercise(
    id="ch04.lru_page_moves", chapter=4, title="Counting page moves of an LRU pool", level="core",
    signature="fn(accesses: list[int], n_slots: int) -> int  # accesses: page ids in order; returns page-ins",
    task="A paged optimizer keeps n_slots pages on the GPU and the rest in CPU memory. The pool starts empty; "
         "each access to a page that is not resident moves it in (one page move), evicting the least recently "
         "used page when the pool is full. Count the page moves for a sequence of accesses.",
    hint="an access to a resident page is free but makes it the most recently used; keep the pages in "
         "recency order (collections.OrderedDict and move_to_end) and evict from the old end.",
    cases=_lru_cases))
