"""Speed and memory benchmarks of the companion against the reference libraries.

Each ``bench_*.py`` module here has a ``main()`` that measures the companion and the
reference implementation (bitsandbytes, PEFT, torch) *in the same run* and prints ratios.
``python -m benchmarks`` (``make bench``) runs them all; ``python -m benchmarks quant`` runs
``bench_quant.py`` only. Timings are not asserted anywhere: tests check correctness, these
scripts report speed.
"""
