"""Measure the memory a training step really holds: resident tensor bytes on a CPU, the allocator on CUDA.

On a GPU, ``torch.cuda.max_memory_allocated`` answers "how much memory did the tensors of this step
take at their peak". A CPU has no such counter (the process's resident set size also holds the
Python interpreter, libraries and freed-but-cached pages), so :class:`TensorMemory` counts tensors
itself:

* a ``TorchDispatchMode`` sees every operator that runs while it is active and registers each new
  output storage with its size (an output that shares the storage of an input -- an in-place
  operation, a view -- allocated nothing); a weak reference on the storage subtracts the size when the last
  tensor using it is freed. ``live_bytes`` is the sum of the registered storages, ``peak_bytes``
  its maximum. This is the bookkeeping of ``torch.distributed._tools.mem_tracker.MemTracker``,
  reduced to totals, and the tests check that the two agree;
* tensors that existed before (the model's weights, optimizer state on the device) are counted
  when passed as ``baseline``; anything else created before is not, which is how host memory (the
  pages of :class:`companion.paged.PagedAdamW`) is kept out of the device total;
* ``torch.autograd.graph.saved_tensors_hooks`` reports the tensors autograd keeps for the backward
  pass: ``saved_bytes`` counts their storages once each (several operators often save the same
  input). Inside regions checkpointed with the non-reentrant ``torch.utils.checkpoint``, the
  checkpoint's own hooks take precedence, so there ``saved_bytes`` misses what is recomputed;
  ``live_bytes`` still counts it.

:class:`PeakMemory` gives one interface for both devices.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return None
    return t.untyped_storage()


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and the bitsandbytes 4-bit quantization state beside each ``Params4bit``
    (``absmax``; with double quantization ``state2.absmax`` and ``offset``)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            tensors.append(qs.absmax)
            if qs.nested:
                tensors += [qs.state2.absmax, qs.offset]
    return tensors


def optimizer_device_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer state that occupies the device.

    For :class:`companion.paged.PagedAdamW` that is its page pool (its ``exp_avg`` / ``exp_avg_sq``
    pages live in host memory); for every other optimizer, each state tensor.
    """
    if hasattr(optimizer, "page_bytes"):  # PagedAdamW: only the bounded pool is device memory
        pool = getattr(optimizer, "_pool", None)
        return [] if pool is None else [pool]
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


@dataclass
class Sample:
    """One point of the timeline: after operator number ``op``."""

    op: int
    live_bytes: int
    saved_bytes: int


class _Saved:
    """What the pack hook hands autograd: the tensor, plus a release of its count when autograd drops it."""

    __slots__ = ("tensor", "_release")

    def __init__(self, tensor, release):
        self.tensor, self._release = tensor, release

    def __del__(self):
        self._release()


class TensorMemory(TorchDispatchMode):
    """Count the bytes of live tensor storages on ``device`` while the context is active.

    ``baseline``: tensors that already exist and belong to the device total (weights, optimizer
    state). ``record=True`` keeps a :class:`Sample` after every operator in ``timeline``.
    """

    def __init__(self, baseline: Iterable[torch.Tensor] = (), device="cpu", record: bool = False):
        super().__init__()
        self.device = torch.device(device)
        self.record = record
        self.live_bytes = self.peak_bytes = 0
        self.saved_bytes = self.peak_saved_bytes = 0
        self.timeline: list[Sample] = []
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes, for every counted storage
        self._refs: dict[int, weakref.ref] = {}
        self._saved: dict[int, int] = {}  # id(storage) -> how many saved tensors use it
        self._baseline: set[int] = set()
        self._ops = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        for t in baseline:
            st = _storage(t)
            if st is not None and self._add(st):
                self._baseline.add(id(st))
        self.baseline_bytes = self.live_bytes
        self.peak_bytes = self.live_bytes

    # ------------------------------------------------------------- storage bookkeeping
    def _add(self, st: torch.UntypedStorage) -> bool:
        key = id(st)
        if key in self._sizes or st.device.type != self.device.type:
            return False
        self._sizes[key] = st.nbytes()
        self._refs[key] = weakref.ref(st, lambda _, key=key: self._remove(key))
        self.live_bytes += self._sizes[key]
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return True

    def _remove(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key)
        self._refs.pop(key, None)
        self._baseline.discard(key)

    def _sample(self) -> None:
        self._ops += 1
        if self.record:
            self.timeline.append(Sample(self._ops, self.live_bytes, self.saved_bytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output that shares an input's storage (in-place op, view, out=) allocated nothing.
        inputs = {id(st) for t in tree_flatten((args, kwargs))[0] if (st := _storage(t)) is not None}
        for t in tree_flatten(out)[0]:
            st = _storage(t)
            if st is not None and id(st) not in inputs:
                self._add(st)
        self._sample()
        return out

    # ------------------------------------------------------------ saved for backward
    def _pack(self, t: torch.Tensor):
        st = _storage(t)
        key = None if st is None else id(st)
        if key is None or key not in self._sizes or key in self._baseline:
            return t  # weights and tensors from outside the context are not activations
        if self._saved.get(key, 0) == 0:
            self.saved_bytes += self._sizes[key]
            self.peak_saved_bytes = max(self.peak_saved_bytes, self.saved_bytes)
        self._saved[key] = self._saved.get(key, 0) + 1
        size = self._sizes[key]

        def release():
            self._saved[key] -= 1
            if self._saved[key] == 0:
                del self._saved[key]
                self.saved_bytes -= size
        return _Saved(t, release)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    # ------------------------------------------------------------------- the context
    def __enter__(self):
        self._hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._hooks.__exit__(*exc)
        return out

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now (e.g. after a warm-up step)."""
        self.peak_bytes, self.peak_saved_bytes = self.live_bytes, self.saved_bytes


class PeakMemory:
    """Peak tensor memory of the code run inside the context, on CPU or CUDA.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` -- every tensor the
    caching allocator holds on that GPU; memory bitsandbytes' paged optimizers take with
    ``cudaMallocManaged`` does not go through the allocator and is not included. CPU:
    :class:`TensorMemory` with ``baseline`` (weights, device optimizer state).
    """

    def __init__(self, device, baseline: Iterable[torch.Tensor] = ()):
        self.device = torch.device(device)
        self._baseline = list(baseline)
        self._tracker: TensorMemory | None = None
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker = TensorMemory(self._baseline, device=self.device).__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._tracker.__exit__(*exc)
            self.peak_bytes = self._tracker.peak_bytes
        return False
