"""Quantize and dequantize a 4096 x 4096 float32 matrix: companion.quant vs bitsandbytes' CPU path.

    python -m benchmarks quant                 # make bench runs it with the others
    python benchmarks/bench_quant.py --rounds 15 --threads 2

Both implementations run in the same process on the same tensor, interleaved round by round
(bitsandbytes, companion, bitsandbytes, ...), so machine load hits both alike; each figure is the
median over rounds, and the ratio is bitsandbytes' time over the companion's (above 1: the companion
is faster). Before timing, the script checks that the two agree bit for bit (packed bytes, state,
dequantized tensor); it refuses to report speed for results that differ.

Effective bandwidth counts the bytes each call must read and write once: quantize reads the
float32 matrix and writes the packed codes and the state; dequantize the reverse.
Goal (issue 4): quantize at least 2x faster than bitsandbytes on a CPU, dequantize no slower.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

SHAPE = (4096, 4096)
CASES = [("nf4", False), ("nf4", True), ("fp4", False)]  # (quant_type, double_quant); NF4 + DQ is QLoRA's


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _state_bytes(packed, absmax, nested_absmax=None, offset=None) -> int:
    return packed.nbytes + absmax.nbytes + (0 if nested_absmax is None else nested_absmax.nbytes + offset.nbytes)


def check_bit_exact(A, quant_type: str, double_quant: bool) -> dict:
    """Quantize and dequantize with both; raise if anything differs. Returns the two results."""
    import bitsandbytes.functional as bnbF

    from companion.quant import QuantState, dequantize_4bit, quantize_4bit

    ref_packed, ref = bnbF.quantize_4bit(A, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    packed, state = quantize_4bit(A, 64, quant_type, double_quant)
    same = torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
    if double_quant:
        same = same and torch.equal(state.offset, ref.offset) and torch.equal(state.state2.absmax, ref.state2.absmax)
    ref_out = bnbF.dequantize_4bit(ref_packed, ref)
    out = dequantize_4bit(packed, state)
    same = same and torch.equal(out, ref_out) and torch.equal(dequantize_4bit(ref_packed, QuantState.from_bnb(ref)), out)
    if not same:
        raise AssertionError(f"companion and bitsandbytes differ for {quant_type}, double_quant={double_quant}")
    return {"ref": (ref_packed, ref), "ours": (packed, state)}


def run_case(A, quant_type: str, double_quant: bool, rounds: int) -> dict:
    import bitsandbytes.functional as bnbF

    from companion.quant import dequantize_4bit, quantize_4bit

    pairs = check_bit_exact(A, quant_type, double_quant)
    ref_packed, ref = pairs["ref"]
    packed, state = pairs["ours"]
    calls = {
        "quantize": (lambda: bnbF.quantize_4bit(A, blocksize=64, compress_statistics=double_quant, quant_type=quant_type),
                     lambda: quantize_4bit(A, 64, quant_type, double_quant)),
        "dequantize": (lambda: bnbF.dequantize_4bit(ref_packed, ref), lambda: dequantize_4bit(packed, state)),
    }
    stored = _state_bytes(packed, state.absmax, *((state.state2.absmax, state.offset) if double_quant else ()))
    moved = A.nbytes + stored  # read + written once, either direction
    row = {"quant_type": quant_type, "double_quant": double_quant}
    for name, (theirs, ours) in calls.items():
        theirs(), ours()  # warm-up: caches, lookup tables, allocator
        t_ref, t_ours, ratios = [], [], []
        for _ in range(rounds):
            a, b = _timed(theirs), _timed(ours)
            t_ref.append(a), t_ours.append(b), ratios.append(a / b)
        row[f"{name}_bnb_s"] = statistics.median(t_ref)
        row[f"{name}_companion_s"] = statistics.median(t_ours)
        row[f"{name}_ratio"] = statistics.median(ratios)  # bitsandbytes time / companion time
        row[f"{name}_companion_GBps"] = moved / row[f"{name}_companion_s"] / 1e9
        row[f"{name}_bnb_GBps"] = moved / row[f"{name}_bnb_s"] / 1e9
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per call (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_quant.json")
    args = parser.parse_args(argv or [])
    torch._dynamo.config.disable = True  # bitsandbytes' torch fallback would otherwise compile per shape
    if args.threads:
        torch.set_num_threads(args.threads)
    import bitsandbytes
    from bitsandbytes.backends.cpu.ops import _has_avx512

    torch.manual_seed(0)
    A = torch.randn(SHAPE, dtype=torch.float32)
    print(f"{SHAPE[0]} x {SHAPE[1]} float32, blocksize 64; torch {torch.__version__}, bitsandbytes "
          f"{bitsandbytes.__version__}, {torch.get_num_threads()} threads, CPU {platform.processor() or platform.machine()}"
          f" ({'AVX512' if _has_avx512 else 'no AVX512'}); median of {args.rounds} interleaved rounds")
    rows = [run_case(A, qt, dq, args.rounds) for qt, dq in CASES]
    header = (f"{'case':<16}{'quantize bnb':>14}{'companion':>11}{'ratio':>8}{'GB/s':>7}"
              f"{'dequant bnb':>13}{'companion':>11}{'ratio':>8}{'GB/s':>7}")
    print("bit-exact: packed bytes, state and dequantized tensor identical in every case")
    print(header)
    for r in rows:
        case = f"{r['quant_type']}{' + DQ' if r['double_quant'] else ''}"
        print(f"{case:<16}{r['quantize_bnb_s'] * 1e3:>11.1f} ms{r['quantize_companion_s'] * 1e3:>8.1f} ms"
              f"{r['quantize_ratio']:>7.2f}x{r['quantize_companion_GBps']:>7.2f}"
              f"{r['dequantize_bnb_s'] * 1e3:>10.1f} ms{r['dequantize_companion_s'] * 1e3:>8.1f} ms"
              f"{r['dequantize_ratio']:>7.2f}x{r['dequantize_companion_GBps']:>7.2f}")
    print("ratio = bitsandbytes time / companion time (goal: quantize >= 2, dequantize >= 1)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"shape": SHAPE, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
