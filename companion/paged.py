"""A paged AdamW you can read: optimizer state in host memory, paged into a bounded device pool.

QLoRA's paged optimizers (Dettmers et al., 2023, §3) keep optimizer state in NVIDIA unified
memory, so the driver moves it to CPU RAM when the GPU runs out during a memory spike and back
when the update needs it. bitsandbytes does this with ``cudaMallocManaged`` and
``cudaMemPrefetchAsync`` (``bitsandbytes.functional.get_paged``, ``Optimizer8bit.prefetch_state``);
the page size and the eviction policy belong to the CUDA driver.

:class:`PagedAdamW` makes the same idea explicit, so it can be read, tested and measured on any
machine:

* each state tensor (``exp_avg``, ``exp_avg_sq``, with ``amsgrad`` also ``max_exp_avg_sq``) lives in
  **host memory**, in the parameter's dtype and memory layout (as ``torch.optim.AdamW`` keeps it),
  cut into pages of ``page_bytes``;
* the update runs **page by page**: the state pages that cover one slice of a parameter are
  brought into a **device pool** of at most ``device_budget_bytes``, updated there, and evicted
  back to the host, least recently used first, when the pool is full;
* on CUDA the pages of the next slice are copied ahead on a side stream (prefetch) while the
  current slice is computed;
* statistics count page-ins, page-outs, bytes moved and the peak of resident bytes.

On a CPU-only machine "host" and "device" are both CPU memory: the copies, the limits and the
statistics are still real. The arithmetic is ``torch.optim.AdamW``'s single-tensor path
(``torch.optim.adam._single_tensor_adam``, decoupled weight decay), applied to slices, so
parameters and state equal AdamW's bit for bit after any number of steps, for every dtype AdamW
takes (fp32, bf16, fp16, fp64, complex), any layout, ``amsgrad``, ``maximize``, a tensor ``lr`` and
LR schedulers; ``state_dict()`` has AdamW's format, so state moves between the two either way.
What paging cannot do is refused where it is asked for: ``foreach=True``, ``fused``,
``capturable``, ``differentiable`` and sparse gradients.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

STATE_NAMES = ("exp_avg", "exp_avg_sq")
# torch.optim.AdamW's param-group flags with its defaults: a PagedAdamW group carries the same keys.
ADAMW_FLAGS = dict(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
                   fused=None, decoupled_weight_decay=True)
REFUSED = {  # flag: (values PagedAdamW accepts, why the others cannot work)
    "foreach": ((None, False), "the update runs one page at a time with AdamW's single-tensor arithmetic"),
    "fused": ((None, False), "the fused kernel needs every state tensor whole on the device"),
    "capturable": ((False,), "a CUDA graph cannot capture copies between host and device pool"),
    "differentiable": ((False,), "autograd cannot follow state that is paged out to the host"),
}


@dataclass
class PagingStats:
    page_ins: int = 0  # pages copied host -> device
    page_outs: int = 0  # pages copied device -> host
    bytes_moved: int = 0  # both directions; a parameter's last page may be partly filled
    hits: int = 0  # page needed and already resident
    peak_resident_bytes: int = 0  # most pool bytes ever holding a page

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _order(t: torch.Tensor) -> list[int]:
    """Dims from the largest stride to the smallest: ``t.permute(order)`` walks t's memory in order."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor as a 1-D view in memory order (any layout, e.g. channels_last or transposed)."""
    return t.permute(_order(t)).view(-1)


def _to_scalar(x):  # torch.optim.optimizer._to_scalar: a 1-element tensor hyper-parameter as 0-dim
    return x.squeeze() if isinstance(x, torch.Tensor) and x.dim() != 0 else x


class PagedAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` (Loshchilov & Hutter) with paged state; same arguments, same update.

    ``device_budget_bytes`` bounds the device memory the optimizer state may occupy; it must hold
    the pages of one slice: two (``exp_avg``, ``exp_avg_sq``), three with ``amsgrad``.
    ``page_bytes`` must be a multiple of every trained parameter's element size (4 for fp32, 2 for
    bf16/fp16, 8 for fp64/complex64, 16 for complex128); a page holds ``page_bytes // element_size``
    elements. ``self.state`` has AdamW's entries (``step``, ``exp_avg``, ... shaped like the
    parameter, on the host); pages still in the pool are newer until :meth:`flush`,
    :meth:`state_dict` or :meth:`host_state` writes them back.

    Raises ``ValueError`` at construction, ``add_param_group`` or ``load_state_dict`` for settings
    paging cannot honour (see ``REFUSED``) and ``RuntimeError`` at ``step`` for sparse gradients,
    like AdamW.
    """

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, device_budget_bytes: int = 64 * 2**20, page_bytes: int = 2**20,
                 prefetch: bool = True):
        if page_bytes <= 0:
            raise ValueError(f"page_bytes must be positive, got {page_bytes}")
        if device_budget_bytes < 2 * page_bytes:
            raise ValueError(f"device_budget_bytes must hold at least two pages (2 x {page_bytes} bytes: "
                             f"exp_avg and exp_avg_sq of one slice), got {device_budget_bytes}; raise the "
                             "budget or lower page_bytes")
        self.page_bytes, self.n_slots, self.prefetch = page_bytes, device_budget_bytes // page_bytes, prefetch
        self.stats = PagingStats()
        self.device: torch.device | None = None  # where the pool lives: the parameters' device
        self._cuda, self._prefetch, self._stream = False, False, None
        self._pool: torch.Tensor | None = None  # (slots, page_bytes) uint8 on the device, allocated on first use
        self._free: list[int] = []
        self._resident: OrderedDict[tuple, int] = OrderedDict()  # (param, name, page) -> slot, least recent first
        self._ready: dict[tuple, torch.cuda.Event] = {}  # prefetched pages whose copy may still run
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **{
            **ADAMW_FLAGS, "amsgrad": amsgrad, "maximize": maximize, "foreach": foreach,
            "capturable": capturable, "differentiable": differentiable, "fused": fused})
        self._check_group({**defaults, "params": []}, "PagedAdamW")
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ validation
    def _check_group(self, group: dict, where: str) -> None:
        """Refuse a param group AdamW would take but paging cannot honour, or AdamW would refuse."""
        if missing := [k for k in ("lr", "betas", "eps", "weight_decay") if k not in group]:
            raise ValueError(f"{where} has no {missing}: it is not an AdamW param group")
        lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"{where}: a tensor lr must have one element, got shape {tuple(lr.shape)}")
        if not (lr >= 0 and eps >= 0 and wd >= 0 and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"invalid AdamW hyper-parameters in {where}: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={wd}; lr, eps and weight_decay must be >= 0, each beta in [0, 1)")
        for flag, (accepted, why) in REFUSED.items():
            if group.get(flag, ADAMW_FLAGS[flag]) not in accepted:
                raise ValueError(f"{where}: {flag}={group[flag]!r} is not supported by PagedAdamW: {why}; "
                                 f"use {flag}={accepted[0]!r}")
        if not group.get("decoupled_weight_decay", True) and wd != 0:
            raise ValueError(f"{where}: decoupled_weight_decay=False is torch.optim.Adam's L2 penalty; PagedAdamW "
                             "is AdamW (decoupled decay): use torch.optim.Adam, or weight_decay=0")
        if group.get("amsgrad") and self.n_slots < 3:
            raise ValueError(f"{where}: amsgrad=True pages three state tensors per slice (exp_avg, exp_avg_sq, "
                             f"max_exp_avg_sq) but device_budget_bytes holds {self.n_slots} pages; raise it to "
                             f"at least 3 * page_bytes = {3 * self.page_bytes}")
        for j, p in enumerate(group["params"]):
            if (p.is_floating_point() or p.is_complex()) and self.page_bytes % p.element_size():
                raise ValueError(f"{where}: page_bytes={self.page_bytes} is not a multiple of {p.element_size()} "
                                 f"bytes, the size of one {p.dtype} element of parameter {j}; use a multiple "
                                 f"of {p.element_size()} (the default 2**20 fits every dtype)")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1], f"param_groups[{len(self.param_groups) - 1}]")
            devices = {p.device for group in self.param_groups for p in group["params"]}
            if len(devices) > 1:
                raise ValueError(f"PagedAdamW needs all parameters on one device, got "
                                 f"{sorted(map(str, devices))}; create one optimizer per device")
        except ValueError:
            self.param_groups.pop()  # refused: the optimizer stays as it was
            raise
        if devices and self.device is None:
            self._bind(devices.pop())

    def _bind(self, device: torch.device) -> None:
        self.device, self._cuda = device, device.type == "cuda"
        self._prefetch = self.prefetch and self._cuda and self.n_slots >= 4
        self._stream = torch.cuda.Stream(device) if self._prefetch else None

    # ------------------------------------------------------------------ host storage
    @staticmethod
    def _names(group: dict) -> tuple[str, ...]:
        return STATE_NAMES + ("max_exp_avg_sq",) if group["amsgrad"] else STATE_NAMES

    def _zeros_like(self, p: torch.Tensor) -> torch.Tensor:
        """Host zeros shaped like ``p``, laid out in ``p``'s memory order; pinned for async copies."""
        order = _order(p)
        host = torch.zeros([p.shape[d] for d in order], dtype=p.dtype, pin_memory=self._cuda)
        return host.permute([order.index(d) for d in range(p.dim())])

    def _prepare_state(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:  # lazily, as AdamW: step is a float tensor on the CPU
            scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.tensor(0.0, dtype=scalar)
        for name in self._names(group):
            if name not in state:
                state[name] = self._zeros_like(p)
            elif not state[name].permute(_order(p)).is_contiguous():  # p's layout changed: follow it
                self._write_back(p)
                state[name] = self._zeros_like(p).copy_(state[name])

    def host_state(self, p: torch.Tensor, name: str) -> torch.Tensor:
        """The host copy of ``exp_avg``, ``exp_avg_sq`` or ``max_exp_avg_sq`` for ``p``, shaped like ``p``.

        Pages still resident on the device are written back first, so the values are current.
        """
        for key in [k for k in self._resident if k[0] is p and k[1] == name]:
            self._evict(key)
        return self.state[p][name]

    def _write_back(self, p: torch.Tensor) -> None:
        for key in [k for k in self._resident if k[0] is p]:
            self._evict(key)

    # ---------------------------------------------------------------------- the pool
    def _host_page(self, key: tuple) -> torch.Tensor:
        p, name, page = key
        host = _flat(self.state[p][name])
        n = self.page_bytes // host.element_size()
        return host[page * n:(page + 1) * n]

    def _slot_for(self, key: tuple) -> int:
        if self._pool is None:
            self._pool = torch.empty(self.n_slots, self.page_bytes, dtype=torch.uint8, device=self.device)
            self._free = list(range(self.n_slots))
        if not self._free:
            self._evict(next(iter(self._resident)))  # least recently used
        return self._free.pop()

    def _evict(self, key: tuple) -> None:
        slot = self._resident.pop(key)
        event = self._ready.pop(key, None)
        if event is not None:  # a prefetch may still be writing the slot: let it finish first
            torch.cuda.current_stream(self.device).wait_event(event)
        host = self._host_page(key)
        host.copy_(self._pool[slot].view(host.dtype)[:host.numel()], non_blocking=False)  # page-out
        self.stats.page_outs += 1
        self.stats.bytes_moved += host.nbytes
        self._free.append(slot)

    def _page_in(self, key: tuple, stream=None) -> int:
        slot = self._slot_for(key)
        host = self._host_page(key)
        device = self._pool[slot].view(host.dtype)[:host.numel()]
        if stream is None:
            device.copy_(host, non_blocking=self._cuda)
        else:  # prefetch: copy on the side stream, remember when it is done
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                device.copy_(host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            self._ready[key] = event
        self._resident[key] = slot
        self.stats.page_ins += 1
        self.stats.bytes_moved += host.nbytes
        resident = len(self._resident) * self.page_bytes
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, resident)
        return slot

    def _acquire(self, key: tuple) -> torch.Tensor:
        """The device page for ``key`` in the state's dtype, paged in if needed, marked most recently used."""
        if key in self._resident:
            self.stats.hits += 1
            self._resident.move_to_end(key)
            event = self._ready.pop(key, None)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            slot = self._resident[key]
        else:
            slot = self._page_in(key)
        return self._pool[slot].view(self.state[key[0]][key[1]].dtype)

    def _prefetch_pages(self, keys: list[tuple]) -> None:
        for key in keys:  # only into free slots: a prefetch never evicts
            if key not in self._resident and len(self._resident) + len(keys) < self.n_slots:
                self._page_in(key, stream=self._stream)

    def _drop_pool(self) -> None:
        """Forget the resident pages without writing them back (their state is being replaced)."""
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        self._resident.clear()
        self._ready.clear()
        self._free = list(range(self.n_slots)) if self._pool is not None else []

    # ------------------------------------------------------------------------ step
    def _collect(self) -> list[tuple]:
        """The (param, group) pairs to update, all checked before anything changes."""
        work = []
        for i, group in enumerate(self.param_groups):
            self._check_group(group, f"param_groups[{i}]")  # catches flags changed after construction
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW, like torch.optim.AdamW, does not support sparse gradients; "
                                       "use torch.optim.SparseAdam for embeddings with sparse=True")
                state, where = self.state.get(p), f"parameter {j} of param_groups[{i}]"
                if state and (missing := [n for n in self._names(group) if n not in state]):
                    raise RuntimeError(f"{where} has no {missing} state: amsgrad was switched on after its first "
                                       "step, which torch.optim.AdamW cannot do either; set it at construction")
                if state and any(state[n].shape != p.shape or state[n].dtype != p.dtype for n in STATE_NAMES):
                    raise RuntimeError(f"{where} is now {p.dtype} {tuple(p.shape)} but its state is "
                                       f"{state['exp_avg'].dtype} {tuple(state['exp_avg'].shape)}: it changed after "
                                       "its first step; after a dtype change call optimizer.load_state_dict("
                                       "optimizer.state_dict()) to cast the state, after a shape change build a "
                                       "new optimizer")
                work.append((p, group))
        devices = {p.device for p, _ in work}
        if len(devices) > 1:
            raise ValueError(f"PagedAdamW needs all parameters on one device, got {sorted(map(str, devices))}; "
                             "create one optimizer per device")
        if devices and (device := devices.pop()) != self.device:  # parameters moved: so does the pool
            self.flush()
            self._pool = None
            self._bind(device)
        return work

    def _n_pages(self, p: torch.Tensor) -> int:
        return -(-p.numel() * p.element_size() // self.page_bytes)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on every parameter with a gradient; returns ``closure()``'s loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._collect()
        for p, group in work:
            self._prepare_state(p, group)
            if p.numel() == 0:
                self.state[p]["step"] += 1
        slices = [(p, group, page) for p, group in work for page in range(self._n_pages(p))]
        for i, (p, group, page) in enumerate(slices):
            if page == 0:  # like AdamW: count the step, then update this parameter
                self.state[p]["step"] += 1
                order = _order(p)
                view = p.permute(order)  # param and grad as 1-D, in the state's memory order
                copied = not view.is_contiguous()  # p has gaps (a strided slice): update a copy
                param = view.contiguous().view(-1)
                grad = p.grad.permute(order).reshape(-1)
            if self._prefetch and i + 1 < len(slices):
                q, q_group, q_page = slices[i + 1]
                self._prefetch_pages([(q, name, q_page) for name in self._names(q_group)])
            self._update_slice(p, group, page, param, grad)
            if copied and page == self._n_pages(p) - 1:
                view.copy_(param.view(view.shape))
        return loss

    def _update_slice(self, p: torch.Tensor, group: dict, page: int, param: torch.Tensor,
                      grad: torch.Tensor) -> None:
        n = self.page_bytes // p.element_size()
        lo, hi = page * n, min((page + 1) * n, p.numel())
        exp_avg, exp_avg_sq, *max_exp_avg_sq = (self._acquire((p, name, page))[:hi - lo]
                                                 for name in self._names(group))
        param, grad = param[lo:hi], grad[lo:hi]  # views: the update writes into p
        grad = -grad if group["maximize"] else grad
        lr, eps, wd = _to_scalar(group["lr"]), group["eps"], group["weight_decay"]
        beta1, beta2 = map(_to_scalar, group["betas"])
        step = self.state[p]["step"].item()
        # Same operations, in the same order, as torch.optim.adam._single_tensor_adam (AdamW):
        if wd != 0:
            param.mul_(1 - lr * wd)  # decoupled weight decay
        if torch.is_complex(param):  # real and imaginary parts are updated as independent reals
            param, grad, exp_avg, exp_avg_sq, *max_exp_avg_sq = map(
                torch.view_as_real, (param, grad, exp_avg, exp_avg_sq, *max_exp_avg_sq))
        device_beta1 = (beta1.to(device=param.device, dtype=param.dtype, non_blocking=True)
                        if isinstance(beta1, torch.Tensor) else beta1)  # a tensor beta, as AdamW casts it
        exp_avg.lerp_(grad, 1 - device_beta1)  # m_t = beta1 * m + (1 - beta1) * g
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v_t = beta2 * v + (1 - beta2) * g^2
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        if max_exp_avg_sq:  # amsgrad: normalise by the largest v_t so far
            torch.maximum(max_exp_avg_sq[0], exp_avg_sq, out=max_exp_avg_sq[0])
            denom = (max_exp_avg_sq[0].sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)  # p -= lr * m_hat / (sqrt(v_hat) + eps)

    # ------------------------------------------------------------------ state dicts
    def flush(self) -> None:
        """Write every resident page back to host memory and empty the device pool."""
        for key in list(self._resident):
            self._evict(key)

    def state_dict(self) -> dict:
        """``torch.optim.AdamW``'s format (state tensors on the host): AdamW can load it and go on."""
        self.flush()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of PagedAdamW or ``torch.optim.AdamW``; the state is cast to each parameter's
        dtype, as AdamW does, and kept on the host.

        Raises ``ValueError``, before anything changes, if the groups or the state do not fit this
        optimizer's parameters (count, shape, keys) or ask for what PagedAdamW refuses (``REFUSED``).
        """
        saved_groups = [{**ADAMW_FLAGS, **g} for g in state_dict["param_groups"]]  # older dicts lack flags
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups but this optimizer has "
                             f"{len(self.param_groups)}; build it with the same groups before loading")
        owner = {}  # saved parameter id -> (parameter, saved group)
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict['param_groups'][{i}] lists {len(saved['params'])} parameters but "
                                 f"param_groups[{i}] has {len(group['params'])}; build the optimizer over the "
                                 "same parameters, in the same order")
            self._check_group({**saved, "params": group["params"]}, f"state_dict['param_groups'][{i}]")
            owner.update((k, (p, saved)) for k, p in zip(saved["params"], group["params"]))
        states = {}
        for k, s in state_dict["state"].items():
            where = f"state_dict['state'][{k!r}]"
            if k not in owner:
                raise ValueError(f"{where} belongs to no parameter of state_dict['param_groups']")
            p, saved = owner[k]
            needed = {"step", *self._names(saved)}
            if not needed <= set(s) <= {"step", *STATE_NAMES, "max_exp_avg_sq"}:
                raise ValueError(f"{where} has keys {sorted(s)} but AdamW's state needs {sorted(needed)}: "
                                 "it is not an AdamW state for these param groups")
            for name, value in s.items():
                if name != "step" and (value.shape != p.shape or value.is_complex() != p.is_complex()):
                    raise ValueError(f"{where}[{name!r}] is {value.dtype} {tuple(value.shape)} but its parameter "
                                     f"is {p.dtype} {tuple(p.shape)}: the state dict belongs to other parameters "
                                     "or another order; load it into an optimizer over the same model")
            states[p] = s
        self._drop_pool()
        super().load_state_dict({**state_dict, "param_groups": saved_groups, "state": {}})  # groups, hooks
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for p, s in states.items():  # host copies in p's dtype and layout, never a full copy on the device
            self.state[p] = {name: torch.tensor(float(v), dtype=scalar) if name == "step"
                             else self._zeros_like(p).copy_(v) for name, v in s.items()}

    def resident_bytes(self) -> int:
        """Bytes of the device pool currently holding a page."""
        return len(self._resident) * self.page_bytes

    def state_bytes(self) -> int:
        """Bytes of all ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` state in host memory."""
        return sum(t.nbytes for s in self.state.values() for name, t in s.items() if name != "step")
