"""Companion package of the course *PEFT in Practice: AdaLoRA & QLoRA*.

One module per concept, in the order the book teaches them:

- :mod:`companion.profiles`  -- the ``ci`` / ``gpu`` notebook profiles, seeding, device checks
- :mod:`companion.models`    -- offline MiniLM, tiny Llama-architecture models, hub models
- :mod:`companion.data`      -- generated sentiment and instruction datasets
- :mod:`companion.memory`    -- memory accounting for full, LoRA, AdaLoRA and QLoRA fine-tuning
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
- :mod:`companion.migrate`   -- a trained LoRA/QLoRA adapter into AdaLoRA through an SVD (Chapter 7)
- :mod:`companion.pissa`     -- PiSSA initialisation, equal to PEFT's (Chapter 7)
- :mod:`companion.check_env` -- ``python -m companion.check_env``

Submodules are imported on demand, so ``import companion`` stays cheap.

**Sharing the CPU.** Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` unless you set it yourself.
PyTorch's CPU kernels run on GNU OpenMP threads, which by default spin for a while at every barrier
instead of sleeping. Alone that is harmless; beside another CPU-bound program (a second notebook, a
browser tab) a spinning thread holds a core the other program needs, and a training cell runs ten or
more times slower instead of twice (``python -m benchmarks busy`` measures it). OpenMP reads the
setting once, when ``torch`` is first imported, so the notebooks import ``companion`` first; if
``torch`` was imported before and the variable is unset, a warning says how to get the setting.
"""

import os as _os
import sys as _sys
import warnings as _warnings

__version__ = "0.1.0"

OMP_WAIT_POLICY = "PASSIVE"  # waiting OpenMP threads sleep instead of spinning (see above)

if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
elif "OMP_WAIT_POLICY" not in _os.environ:
    _warnings.warn("torch was imported before companion, so its OpenMP threads keep spinning while they wait: "
                   "beside another busy program training can run 10x slower. Import companion before torch "
                   "(a fresh kernel), or set OMP_WAIT_POLICY=PASSIVE in the environment that starts Jupyter.",
                   RuntimeWarning, stacklevel=2)
