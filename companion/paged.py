"""A paged AdamW you can read: optimizer state in host memory, paged into a bounded device pool.

QLoRA's paged optimizers (Dettmers et al., 2023, §3) keep optimizer state in NVIDIA unified
memory, so the driver moves it to CPU RAM when the GPU runs out during a memory spike and back
when the update needs it. bitsandbytes does this with ``cudaMallocManaged`` and
``cudaMemPrefetchAsync`` (``bitsandbytes.functional.get_paged``, ``Optimizer8bit.prefetch_state``);
the page size and the eviction policy belong to the CUDA driver.

:class:`PagedAdamW` makes the same idea explicit, so it can be read, tested and measured on any
machine:

* each state tensor (``exp_avg``, ``exp_avg_sq``) lives in **host memory**, cut into pages of
  ``page_bytes``;
* the update runs **page by page**: the two state pages that cover one slice of a parameter are
  brought into a **device pool** of at most ``device_budget_bytes``, updated there, and evicted
  back to the host, least recently used first, when the pool is full;
* on CUDA the pages of the next slice are copied ahead on a side stream (prefetch) while the
  current slice is computed;
* statistics count page-ins, page-outs, bytes moved and the peak of resident bytes.

On a CPU-only machine "host" and "device" are both CPU memory: the copies, the limits and the
statistics are still real. The arithmetic is ``torch.optim.AdamW``'s (decoupled weight decay,
bias correction), applied to slices, so the parameters equal AdamW's after any number of steps.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

STATE_NAMES = ("exp_avg", "exp_avg_sq")
FLOAT32_BYTES = 4


@dataclass
class PagingStats:
    page_ins: int = 0  # pages copied host -> device
    page_outs: int = 0  # pages copied device -> host
    bytes_moved: int = 0  # both directions
    hits: int = 0  # page needed and already resident
    peak_resident_bytes: int = 0  # most pool bytes ever holding a page

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter) with paged state; same update as ``torch.optim.AdamW``.

    ``device_budget_bytes`` bounds the device memory the optimizer state may occupy; it must hold
    at least two pages (the ``exp_avg`` and ``exp_avg_sq`` pages of one slice). ``page_bytes``
    must be a positive multiple of 4 (state is float32).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 device_budget_bytes: int = 64 * 2**20, page_bytes: int = 2**20, prefetch: bool = True):
        if page_bytes <= 0 or page_bytes % FLOAT32_BYTES:
            raise ValueError(f"page_bytes must be a positive multiple of 4 (float32 state), got {page_bytes}")
        if device_budget_bytes < 2 * page_bytes:
            raise ValueError(f"device_budget_bytes must hold at least two pages (2 x {page_bytes} bytes: "
                             f"exp_avg and exp_avg_sq of one slice), got {device_budget_bytes}; raise the "
                             "budget or lower page_bytes")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW hyper-parameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        devices = {p.device for group in self.param_groups for p in group["params"]}
        if len(devices) != 1:
            raise ValueError(f"PagedAdamW needs all parameters on one device, got {sorted(map(str, devices))}; "
                             "create one optimizer per device")
        self.device = devices.pop()
        self.page_elems = page_bytes // FLOAT32_BYTES
        self.page_bytes = page_bytes
        self.n_slots = device_budget_bytes // page_bytes
        self.stats = PagingStats()
        self._pool: torch.Tensor | None = None  # (slots, page_elems) on the device, allocated on first use
        self._free: list[int] = []
        self._resident: OrderedDict[tuple, int] = OrderedDict()  # page key -> slot, least recent first
        self._cuda = self.device.type == "cuda"
        self._prefetch = prefetch and self._cuda and self.n_slots >= 4
        self._stream = torch.cuda.Stream(self.device) if self._prefetch else None
        self._ready: dict[tuple, torch.cuda.Event] = {}

    # ------------------------------------------------------------------ host storage
    def _host_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            n_pages = math.ceil(p.numel() / self.page_elems)
            for name in STATE_NAMES:  # host copy, padded to whole pages; pinned for async copies
                buf = torch.zeros(n_pages * self.page_elems, dtype=torch.float32, pin_memory=self._cuda)
                state[name] = buf
            state["step"] = 0
            state["n_pages"] = n_pages
        return state

    def host_state(self, p: torch.Tensor, name: str) -> torch.Tensor:
        """The host copy of ``exp_avg`` or ``exp_avg_sq`` for ``p``, shaped like ``p``.

        Pages still resident on the device are written back first, so the values are current.
        """
        for key in [k for k in self._resident if k[0] is p and k[1] == name]:
            self._evict(key)
        return self.state[p][name][:p.numel()].view_as(p)

    # ---------------------------------------------------------------------- the pool
    def _slot_for(self, key: tuple) -> int:
        if self._pool is None:
            self._pool = torch.empty(self.n_slots, self.page_elems, dtype=torch.float32, device=self.device)
            self._free = list(range(self.n_slots))
        if not self._free:
            self._evict(next(iter(self._resident)))  # least recently used
        return self._free.pop()

    def _evict(self, key: tuple) -> None:
        p, name, page = key
        slot = self._resident.pop(key)
        self._ready.pop(key, None)
        host = self.state[p][name][page * self.page_elems:(page + 1) * self.page_elems]
        host.copy_(self._pool[slot], non_blocking=False)  # device -> host (page-out)
        self.stats.page_outs += 1
        self.stats.bytes_moved += self.page_bytes
        self._free.append(slot)

    def _page_in(self, key: tuple, stream=None) -> int:
        p, name, page = key
        slot = self._slot_for(key)
        host = self.state[p][name][page * self.page_elems:(page + 1) * self.page_elems]
        if stream is None:
            self._pool[slot].copy_(host, non_blocking=self._cuda)
        else:  # prefetch: copy on the side stream, remember when it is done
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._pool[slot].copy_(host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            self._ready[key] = event
        self._resident[key] = slot
        self.stats.page_ins += 1
        self.stats.bytes_moved += self.page_bytes
        resident = len(self._resident) * self.page_bytes
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, resident)
        return slot

    def _acquire(self, key: tuple) -> torch.Tensor:
        """The device page for ``key``, paged in if needed, marked most recently used."""
        if key in self._resident:
            self.stats.hits += 1
            self._resident.move_to_end(key)
            event = self._ready.pop(key, None)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            slot = self._resident[key]
        else:
            slot = self._page_in(key)
        return self._pool[slot]

    def _prefetch_pages(self, keys: list[tuple]) -> None:
        for key in keys:
            if key not in self._resident and len(self._resident) + 2 < self.n_slots:
                self._page_in(key, stream=self._stream)

    # ------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (param, group) in a fixed order, to know what comes next
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.is_contiguous():
                    raise ValueError("PagedAdamW pages flat slices of each parameter and needs contiguous "
                                     "parameters; call .contiguous() on the parameter data first")
                if p.grad.is_sparse:
                    raise ValueError("PagedAdamW does not support sparse gradients; use torch.optim.SparseAdam "
                                     "for embeddings with sparse=True")
                work.append((p, group))
        slices = [(p, group, page) for p, group in work for page in range(self._host_state(p)["n_pages"])]
        for p, _ in work:
            self.state[p]["step"] += 1
        for i, (p, group, page) in enumerate(slices):
            if self._prefetch and i + 1 < len(slices):
                nxt = slices[i + 1]
                self._prefetch_pages([(nxt[0], name, nxt[2]) for name in STATE_NAMES])
            self._update_slice(p, group, page)
        return loss

    def _update_slice(self, p: torch.Tensor, group: dict, page: int) -> None:
        lo = page * self.page_elems
        hi = min(lo + self.page_elems, p.numel())
        m_page = self._acquire((p, "exp_avg", page))
        v_page = self._acquire((p, "exp_avg_sq", page))
        param = p.view(-1)[lo:hi]  # views: the update writes into p
        grad = p.grad.reshape(-1)[lo:hi]
        exp_avg, exp_avg_sq = m_page[:hi - lo], v_page[:hi - lo]
        beta1, beta2 = group["betas"]
        step = self.state[p]["step"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        # Same operations, in the same order, as torch.optim.AdamW (single-tensor path):
        param.mul_(1 - lr * wd)  # decoupled weight decay
        exp_avg.lerp_(grad, 1 - beta1)  # m_t = beta1 * m + (1 - beta1) * g
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v_t = beta2 * v + (1 - beta2) * g^2
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)  # p -= lr * m_hat / (sqrt(v_hat) + eps)

    def flush(self) -> None:
        """Write every resident page back to host memory and empty the device pool."""
        for key in list(self._resident):
            self._evict(key)

    def state_dict(self):
        self.flush()
        return super().state_dict()

    def resident_bytes(self) -> int:
        """Bytes of the device pool currently holding a page."""
        return len(self._resident) * self.page_bytes

    def state_bytes(self) -> int:
        """Bytes of all optimizer state in host memory (padded to whole pages)."""
        return sum(s[name].nbytes for s in self.state.values() if s for name in STATE_NAMES)
