"""Companion package of the course *PEFT in Practice: AdaLoRA & QLoRA*.

One module per concept, in the order the book teaches them:

- :mod:`companion.profiles`  -- the ``ci`` / ``gpu`` notebook profiles, seeding, device checks
- :mod:`companion.models`    -- offline MiniLM, tiny Llama-architecture models, hub models
- :mod:`companion.data`      -- generated sentiment and instruction datasets
- :mod:`companion.architectures` -- published model configs and the parameter tensors they define
- :mod:`companion.memory`    -- memory accounting for full, LoRA, AdaLoRA and QLoRA fine-tuning, on one card or several
- :mod:`companion.measure`   -- bytes a loaded model really stores (incl. 4-bit state)
- :mod:`companion.gradstats` -- per-module gradient-norm recording (Chapter 1)
- :mod:`companion.adalora`   -- AdaLoRA from scratch, equal to PEFT (Chapters 2-3)
- :mod:`companion.quant`     -- NF4/FP4/Int4, double quantization, Linear4bit (Chapter 4)
- :mod:`companion.paged`     -- PagedAdamW: optimizer state paged through a device pool (Chapter 4)
- :mod:`companion.memtrack`  -- live tensor bytes on CPU, peak memory on CUDA (Chapters 4-5)
- :mod:`companion.qlora`     -- the 4-bit fine-tuning pipeline: load, target, generate, save, merge (Chapter 5)
- :mod:`companion.train`     -- one small training loop shared by the chapters, and a Trainer recipe
- :mod:`companion.bench`     -- the comparison harness: five methods, equal budgets, results files, plots (Chapter 6)
- :mod:`companion.select`    -- `recommend`: which method fits which card, and the decision tree it draws (Chapter 7)
- :mod:`companion.fsdp_qlora` -- QLoRA sharded over several GPUs (or CPU processes) with FSDP2, under torchrun (Chapter 7)
- :mod:`companion.migrate`   -- a trained LoRA/QLoRA adapter into AdaLoRA through an SVD (Chapter 7)
- :mod:`companion.pissa`     -- PiSSA initialisation, equal to PEFT's (Chapter 7)
- :mod:`companion.exercises` -- graded exercises of every chapter, ``check``, and the teachers' ``grade`` command
- :mod:`companion.check_env` -- ``python -m companion.check_env``

Submodules are imported on demand, so ``import companion`` stays cheap.

**Sharing the CPU.** Importing the package sets ``GOMP_SPINCOUNT=3000`` unless you set it or
``OMP_WAIT_POLICY`` yourself. PyTorch's CPU kernels run on GNU OpenMP threads, which by default spin
for about 300,000 iterations at every barrier before they sleep. Alone that is fast; beside another
CPU-bound program (a second notebook, a browser tab) a spinning thread holds a core the other program
needs, and a training cell runs four to fifteen times slower instead of twice. A short spin keeps most
of the speed of spinning alone and gives the core back when it is contended; ``OMP_WAIT_POLICY=PASSIVE``
(never spin) is fairer still but makes the course's small models about twice as slow on an idle
machine (``python -m benchmarks busy`` measures all of it). OpenMP reads the setting once, when
``torch`` is first imported, so the notebooks import ``companion`` first; if ``torch`` was imported
before and nothing is set, a warning says how to get the setting.
"""

import os as _os
import sys as _sys
import warnings as _warnings

__version__ = "0.1.0"

GOMP_SPINCOUNT = "3000"  # OpenMP barrier spins before a waiting thread sleeps (libgomp default: 300,000)
_SET_BY_USER = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")

if not any(name in _os.environ for name in _SET_BY_USER):
    if "torch" not in _sys.modules:
        _os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    else:
        _warnings.warn("torch was imported before companion, so its OpenMP threads keep spinning while they wait: "
                       "beside another busy program training can run 10x slower. Import companion before torch "
                       f"(a fresh kernel), or set GOMP_SPINCOUNT={GOMP_SPINCOUNT} in the environment that starts "
                       "Jupyter.", RuntimeWarning, stacklevel=2)
