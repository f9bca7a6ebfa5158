"""Companion package of the course *PEFT in Practice: AdaLoRA & QLoRA*.

One module per concept, in the order the book teaches them:

- :mod:`companion.profiles`  -- the ``ci`` / ``gpu`` notebook profiles, seeding, device checks
- :mod:`companion.models`    -- offline MiniLM, tiny Llama-architecture models, hub models
- :mod:`companion.data`      -- generated sentiment and instruction datasets
- :mod:`companion.memory`    -- memory accounting for full, LoRA, AdaLoRA and QLoRA fine-tuning
- :mod:`companion.gradstats` -- per-module gradient-norm recording (Chapter 1)
- :mod:`companion.train`     -- one small training loop shared by the chapters
- :mod:`companion.check_env` -- ``python -m companion.check_env``

Submodules are imported on demand, so ``import companion`` stays cheap.
"""

__version__ = "0.1.0"
