"""Imported by the rehearsal kernel before the first cell: turns this CPU into a pretend T4 or RTX card.

Set by :mod:`tests.rehearsal.run` through the kernel spec's environment:

* ``REHEARSAL_DTYPE`` (``float16``: a Colab T4; ``bfloat16``: an RTX card) -- ``setup_profile("gpu")`` returns
  the gpu profile with that compute dtype on the CPU device, after the same seeding;
  ``companion.profiles.bf16_native`` answers as that card would.
* ``REHEARSAL_CWD`` -- the notebooks folder, so relative paths resolve as in the book.
* ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE=1`` -- the stand-in checkpoints of :mod:`tests.rehearsal.hub`.

``datasets.load_dataset`` is answered by :mod:`tests.rehearsal.data`; Llamas built from a large config are
shrunk (:func:`tiny_llama_config`). A training loss that is not finite
when ``backward()`` is called on it raises ``FloatingPointError`` in the notebook, so nbval fails that cell.
The notebooks themselves are not changed: only their parameters are injected (papermill) before this runs.
"""

from __future__ import annotations

import os

import companion  # noqa: F401  (first, so its CPU-sharing setting precedes torch's import)
import datasets
import torch
from companion import models, profiles

from tests.rehearsal import data

DTYPE = getattr(torch, os.environ["REHEARSAL_DTYPE"])
os.chdir(os.environ["REHEARSAL_CWD"])
datasets.load_dataset = data.load_dataset


def setup_profile(profile: str, seed: int = 0) -> profiles.Profile:
    """``companion.profiles.setup_profile`` as on the pretend card: gpu profile, CPU device, card dtype."""
    profiles.check_profile(profile)
    if profile != "gpu":
        raise AssertionError("the rehearsal runs the gpu profile; PROFILE was not injected")
    profiles.seed_everything(seed)
    return profiles.Profile(name="gpu", device=torch.device("cpu"), dtype=DTYPE, seed=seed)


def bf16_native() -> bool:
    return DTYPE == torch.bfloat16


profiles.setup_profile = setup_profile
profiles.bf16_native = bf16_native
for name in ("setup_profile", "bf16_native"):
    if hasattr(companion, name):
        setattr(companion, name, getattr(profiles, name))

_backward = torch.Tensor.backward


def _checked_backward(self, *args, **kwargs):
    if self.dim() == 0 and self.requires_grad and not torch.isfinite(self.detach()).item():
        raise FloatingPointError(f"rehearsal: non-finite training loss {self.item()} ({self.dtype}) "
                                 f"on a pretend {'T4' if DTYPE == torch.float16 else 'RTX card'}")
    return _backward(self, *args, **kwargs)


torch.Tensor.backward = _checked_backward

_tiny_llama_config = models.tiny_llama_config


def tiny_llama_config(**overrides):
    """The Llamas a gpu branch builds from a config (ch04's 168M-parameter one), shrunk as the hub stand-ins
    are: 2 layers, 8 dimensions per head, a 1,000-token vocabulary. Same classes and code path, CPU seconds."""
    if overrides.get("hidden_size", 0) > 256:
        heads = overrides.get("num_attention_heads", 4)
        overrides.update(hidden_size=8 * heads, intermediate_size=16 * heads, num_hidden_layers=2,
                         vocab_size=min(overrides.get("vocab_size", 1000), 1000))
    return _tiny_llama_config(**overrides)


models.tiny_llama_config = tiny_llama_config

if DTYPE == torch.bfloat16:  # an RTX card has bf16: TrainingArguments(bf16=True) must not ask for use_cpu
    import transformers.training_args

    transformers.training_args.is_torch_bf16_gpu_available = lambda: True
