"""PagedAdamW: AdamW's arithmetic with state paged through a bounded device pool."""

import copy
import math

import pytest
import torch

from companion.paged import PagedAdamW


def make_params(seed=0, shapes=((37, 11), (5,), (300,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def run(optimizer_cls, params, steps=5, seed=1, **kwargs):
    opt = optimizer_cls(params, lr=1e-2, weight_decay=0.1, **kwargs)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt


@pytest.mark.parametrize("budget_pages,page_bytes", [(2, 64), (3, 256), (4, 128), (1000, 4096), (2, 4)])
def test_parameters_equal_torch_adamw_bit_for_bit_for_any_budget(budget_pages, page_bytes):
    ours, ref = make_params(), make_params()
    run(PagedAdamW, ours, steps=20, device_budget_bytes=budget_pages * page_bytes, page_bytes=page_bytes)
    run(torch.optim.AdamW, ref, steps=20)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)  # element-wise ops in AdamW's order: slicing changes nothing


def test_a_budget_smaller_than_one_parameters_state_still_gives_adamw():
    ours, ref = make_params(shapes=((64, 64),)), make_params(shapes=((64, 64),))
    page_bytes = 256  # 64 floats: a 4096-float parameter has 64 pages per state tensor
    opt = run(PagedAdamW, ours, device_budget_bytes=2 * page_bytes, page_bytes=page_bytes)
    run(torch.optim.AdamW, ref, foreach=False)
    torch.testing.assert_close(ours[0], ref[0], atol=1e-6, rtol=0)
    assert opt.stats.peak_resident_bytes == 2 * page_bytes < 64 * 64 * 4 * 2


def test_state_equals_torch_adamw_state():
    ours, ref = make_params(), make_params()
    opt = run(PagedAdamW, ours, device_budget_bytes=3 * 128, page_bytes=128)
    ref_opt = run(torch.optim.AdamW, ref, foreach=False)
    for p, q in zip(ours, ref):
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.host_state(p, name), ref_opt.state[q][name], atol=1e-7, rtol=0)


def test_statistics_count_the_pages_that_actually_move():
    page_bytes = 64  # 16 floats
    params = make_params(shapes=((40,), (10,)))  # 3 + 1 pages per state tensor -> 8 pages per step
    opt = run(PagedAdamW, params, steps=1, device_budget_bytes=2 * page_bytes, page_bytes=page_bytes)
    # With two slots every page is paged in once and every page but the last two is evicted.
    assert opt.stats.page_ins == 8 and opt.stats.page_outs == 6 and opt.stats.hits == 0
    # Bytes are those copied: a parameter's last page is partly filled (40 = 16 + 16 + 8 floats).
    assert opt.stats.bytes_moved == 2 * (40 + 10) * 4 + 2 * 40 * 4
    assert opt.resident_bytes() == 2 * page_bytes
    opt.flush()
    assert opt.stats.page_outs == 8 and opt.resident_bytes() == 0


def test_a_budget_that_holds_everything_pages_in_once_and_then_only_hits():
    params = make_params(shapes=((40,), (10,)))
    opt = run(PagedAdamW, params, steps=3, device_budget_bytes=100 * 64, page_bytes=64)
    assert opt.stats.page_ins == 8 and opt.stats.page_outs == 0 and opt.stats.hits == 16
    assert opt.stats.peak_resident_bytes == 8 * 64


def test_least_recently_used_page_is_evicted_first():
    p = make_params(shapes=((32,),))  # 2 pages of 16 floats per state tensor
    opt = PagedAdamW(p, device_budget_bytes=3 * 64, page_bytes=64)
    p[0].grad = torch.ones(32)
    opt.step()  # uses (m,0) (v,0) (m,1) (v,1): the 4th evicts (m,0), the oldest
    resident = [(name, page) for _, name, page in opt._resident]
    assert resident == [("exp_avg_sq", 0), ("exp_avg", 1), ("exp_avg_sq", 1)]


def test_state_dict_round_trip_restores_training():
    a, b = make_params(), make_params()
    opt_a = run(PagedAdamW, a, steps=2, device_budget_bytes=2 * 64, page_bytes=64)
    opt_b = PagedAdamW(b, lr=1e-2, weight_decay=0.1, device_budget_bytes=2 * 64, page_bytes=64)
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for opt, params in ((opt_a, a), (opt_b, b)):
        for p in params:
            p.grad = torch.full(p.shape, 0.5)
        opt.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kwargs,message", [
    (dict(device_budget_bytes=0), "at least two pages"),
    (dict(device_budget_bytes=100, page_bytes=64), "at least two pages"),
    (dict(page_bytes=0), "page_bytes must be positive"),
    (dict(page_bytes=6), "page_bytes=6 is not a multiple of 4 bytes, the size of one torch.float32 element"),
    (dict(lr=-1.0), "invalid AdamW hyper-parameters"),
    (dict(betas=(0.9, 1.0)), "invalid AdamW hyper-parameters"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "a tensor lr must have one element"),
])
def test_bad_settings_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PagedAdamW(make_params(), **kwargs)


def test_sparse_gradients_are_refused_with_the_error_type_of_adamw():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        torch.optim.AdamW(emb.parameters()).step()
    with pytest.raises(RuntimeError, match="sparse gradients; use torch.optim.SparseAdam"):
        PagedAdamW(emb.parameters(), device_budget_bytes=1024, page_bytes=64).step()


def test_parameters_on_two_devices_are_refused():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="all parameters on one device"):
        PagedAdamW([a, b])


def test_trains_a_model_like_adamw():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    twin = copy.deepcopy(model)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    opts = [PagedAdamW(model.parameters(), lr=1e-2, device_budget_bytes=2 * 128, page_bytes=128),
            torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=False)]
    for _ in range(20):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert math.isfinite(opts[0].stats.bytes_moved) and opts[0].stats.page_outs > 0


# --------------------------------------------------- whatever torch.optim.AdamW accepts, step by step
def random_like(p, g):
    """A random tensor shaped like ``p`` in its dtype (complex drawn as complex, 16-bit rounded from fp32)."""
    return torch.randn(p.shape, generator=g, dtype=p.dtype if p.is_complex() else torch.float32).to(p.dtype)


def make_typed(dtype, shapes=((37, 11), (5,), (300,), (), (0,))):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(random_like(torch.empty(s, dtype=dtype), g)) for s in shapes]


def step_both(paged, adamw, ours, ref, steps, seed=1, skip=()):
    """``steps`` steps with the same gradients; parameters listed in ``skip`` get no gradient."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for i, (p, q) in enumerate(zip(ours, ref)):
            p.grad = None if i in skip else random_like(p, g)
            q.grad = None if p.grad is None else p.grad.clone()
        paged.step()
        adamw.step()


def assert_same_state(paged, adamw, ours, ref):
    for p, q in zip(ours, ref):
        assert torch.equal(p, q) and p.dtype == q.dtype
        assert paged.state[p].keys() == adamw.state[q].keys()
        for name in adamw.state[q]:
            mine = paged.host_state(p, name) if name != "step" else paged.state[p]["step"]
            assert torch.equal(mine, adamw.state[q][name]) and mine.dtype == adamw.state[q][name].dtype, name


def test_16bit_linear_layers_step_like_torch_adamw():
    # shared/cases/robustness/paged_adamw_16bit_params.py: the step crashed ("expected dtype float for `end`")
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        ref = torch.nn.Linear(8, 2).to(dtype)
        torch.manual_seed(0)
        m = torch.nn.Linear(8, 2).to(dtype)
        x = torch.randn(4, 8).to(dtype)
        ref(x).sum().backward()
        m(x).sum().backward()
        torch.optim.AdamW(ref.parameters(), lr=1e-2).step()
        PagedAdamW(m.parameters(), lr=1e-2).step()
        for p, q in zip(m.parameters(), ref.parameters()):
            assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.complex64, torch.float32])
@pytest.mark.parametrize("budget_pages,page_bytes", [(2, 16), (3, 64), (1000, 4096)])
def test_parameters_and_state_equal_torch_adamw_bit_for_bit_in_every_dtype(dtype, budget_pages, page_bytes):
    ours, ref = make_typed(dtype), make_typed(dtype)  # includes a 0-dim and an empty parameter
    paged = PagedAdamW(ours, lr=1e-2, weight_decay=0.1, device_budget_bytes=budget_pages * page_bytes,
                       page_bytes=page_bytes)
    adamw = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    step_both(paged, adamw, ours, ref, steps=8)
    assert_same_state(paged, adamw, ours, ref)  # state in the parameter's dtype, as AdamW keeps it


@pytest.mark.parametrize("flags", [dict(amsgrad=True), dict(maximize=True), dict(amsgrad=True, maximize=True),
                                   dict(foreach=False, fused=False), dict(weight_decay=0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
def test_amsgrad_maximize_and_flag_values_adamw_accepts_give_adamw(flags, dtype):
    ours, ref = make_typed(dtype), make_typed(dtype)
    paged = PagedAdamW(ours, lr=1e-2, device_budget_bytes=3 * 64, page_bytes=64, **flags)
    adamw = torch.optim.AdamW(ref, lr=1e-2, **flags)
    step_both(paged, adamw, ours, ref, steps=6)
    assert_same_state(paged, adamw, ours, ref)
    assert paged.state_dict()["param_groups"] == adamw.state_dict()["param_groups"]


def test_channels_last_transposed_and_strided_parameters_equal_adamw():
    def make():
        g = torch.Generator().manual_seed(0)
        conv = torch.randn(8, 3, 3, 3, generator=g).to(memory_format=torch.channels_last)
        transposed = torch.randn(37, 11, generator=g).t()
        strided = torch.randn(20, 10, generator=g)[:, 2:5]  # a view with gaps between rows
        return [torch.nn.Parameter(t) for t in (conv, transposed, strided)]
    ours, ref = make(), make()
    assert not any(p.is_contiguous() for p in ours)
    paged = PagedAdamW(ours, lr=1e-2, device_budget_bytes=2 * 64, page_bytes=64)
    adamw = torch.optim.AdamW(ref, lr=1e-2)
    step_both(paged, adamw, ours, ref, steps=5)
    assert_same_state(paged, adamw, ours, ref)
    for p, q in zip(ours[:2], ref[:2]):  # dense layouts: the state keeps the parameter's strides, as in AdamW
        assert paged.state[p]["exp_avg"].stride() == adamw.state[q]["exp_avg"].stride() == p.stride()


def test_param_groups_with_their_own_lr_and_weight_decay_and_one_added_later_equal_adamw():
    ours, ref = make_typed(torch.float32), make_typed(torch.float32)
    groups = lambda ps: [{"params": ps[:2], "lr": 3e-2, "weight_decay": 0.0}, {"params": ps[2:3]}]  # noqa: E731
    paged = PagedAdamW(groups(ours), lr=1e-2, weight_decay=0.1, device_budget_bytes=3 * 64, page_bytes=64)
    adamw = torch.optim.AdamW(groups(ref), lr=1e-2, weight_decay=0.1)
    step_both(paged, adamw, ours, ref, steps=3, skip=(3, 4))
    paged.add_param_group({"params": ours[3:], "lr": 5e-3, "amsgrad": True})
    adamw.add_param_group({"params": ref[3:], "lr": 5e-3, "amsgrad": True})
    step_both(paged, adamw, ours, ref, steps=3)
    assert_same_state(paged, adamw, ours, ref)
    assert paged.state_dict()["param_groups"] == adamw.state_dict()["param_groups"]


def test_a_tensor_lr_and_a_lambda_lr_scheduler_follow_adamw():
    ours, ref = make_typed(torch.bfloat16), make_typed(torch.bfloat16)
    paged = PagedAdamW(ours, lr=torch.tensor(1e-2), device_budget_bytes=2 * 64, page_bytes=64)
    adamw = torch.optim.AdamW(ref, lr=torch.tensor(1e-2))
    warmup = lambda step: min(1.0, (step + 1) / 4)  # noqa: E731
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, warmup) for o in (paged, adamw)]
    for _ in range(6):
        step_both(paged, adamw, ours, ref, steps=1)
        for s in schedulers:
            s.step()
    assert_same_state(paged, adamw, ours, ref)
    assert torch.equal(paged.param_groups[0]["lr"], adamw.param_groups[0]["lr"])
    assert schedulers[0].state_dict() == schedulers[1].state_dict()


def test_parameters_without_a_gradient_keep_their_value_and_their_step_count_like_adamw():
    ours, ref = make_typed(torch.float32), make_typed(torch.float32)
    paged = PagedAdamW(ours, lr=1e-2, device_budget_bytes=2 * 64, page_bytes=64)
    adamw = torch.optim.AdamW(ref, lr=1e-2)
    step_both(paged, adamw, ours, ref, steps=2)
    before = ours[1].detach().clone()
    step_both(paged, adamw, ours, ref, steps=3, skip=(1,))
    assert torch.equal(ours[1], before) and paged.state[ours[1]]["step"] == 2
    assert_same_state(paged, adamw, ours, ref)


def test_zero_grad_clears_gradients_like_adamw():
    for set_to_none in (True, False):
        ours, ref = make_typed(torch.float32), make_typed(torch.float32)
        paged, adamw = PagedAdamW(ours), torch.optim.AdamW(ref)
        step_both(paged, adamw, ours, ref, steps=1)
        paged.zero_grad(set_to_none=set_to_none)
        adamw.zero_grad(set_to_none=set_to_none)
        for p, q in zip(ours, ref):
            assert (p.grad is None) == (q.grad is None) and (p.grad is None or not p.grad.any())


def test_closure_is_evaluated_with_gradients_enabled_and_its_loss_returned():
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 1), torch.randn(8, 4)
    twin = copy.deepcopy(model)
    paged = PagedAdamW(model.parameters(), lr=1e-2)
    adamw = torch.optim.AdamW(twin.parameters(), lr=1e-2)

    def closure(m, opt):
        def f():
            opt.zero_grad()
            loss = m(x).square().mean()
            loss.backward()
            return loss
        return f
    for _ in range(3):
        assert torch.equal(paged.step(closure(model, paged)), adamw.step(closure(twin, adamw)))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_a_step_with_no_gradient_or_no_parameter_changes_nothing():
    empty = PagedAdamW([{"params": []}])  # AdamW accepts an empty group to fill with add_param_group
    assert empty.step() is None and empty.step(lambda: 3.0) == 3.0
    params = make_typed(torch.float32)
    empty.add_param_group({"params": params})
    before = [p.detach().clone() for p in params]
    empty.step()  # no gradients yet
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert len(empty.state) == 0 and empty.stats.page_ins == 0 and empty.state_dict()["state"] == {}


# ------------------------------------------------------ what paging cannot do: refused at the call
@pytest.mark.parametrize("flag", ["foreach", "fused", "capturable", "differentiable"])
def test_flags_paging_cannot_honour_are_refused_at_construction_with_the_fix(flag):
    fix = "None" if flag in ("foreach", "fused") else "False"
    with pytest.raises(ValueError, match=rf"{flag}=True is not supported by PagedAdamW: .*; use {flag}={fix}"):
        PagedAdamW(make_params(), **{flag: True})


def test_a_group_with_a_refused_flag_is_refused_at_add_param_group_and_leaves_the_optimizer_as_it_was():
    opt = PagedAdamW(make_params())
    with pytest.raises(ValueError, match=r"param_groups\[1\]: fused=True is not supported"):
        opt.add_param_group({"params": make_params(seed=1), "fused": True})
    assert len(opt.param_groups) == 1


def test_amsgrad_needs_a_budget_of_three_pages_also_when_it_comes_from_a_state_dict():
    message = "amsgrad=True pages three state tensors .* at least 3 \\* page_bytes = 192"
    with pytest.raises(ValueError, match=message):
        PagedAdamW(make_params(), amsgrad=True, device_budget_bytes=2 * 64, page_bytes=64)
    adamw = run(torch.optim.AdamW, make_params(), steps=1, amsgrad=True)
    paged = PagedAdamW(make_params(), device_budget_bytes=2 * 64, page_bytes=64)
    with pytest.raises(ValueError, match=r"state_dict\['param_groups'\]\[0\]: " + message):
        paged.load_state_dict(adamw.state_dict())


@pytest.mark.parametrize("dtype,page_bytes,size", [(torch.float64, 4, 8), (torch.complex128, 8, 16),
                                                  (torch.bfloat16, 3, 2)])
def test_page_bytes_must_hold_whole_elements_of_every_parameter(dtype, page_bytes, size):
    message = (rf"page_bytes={page_bytes} is not a multiple of {size} bytes, the size of one {dtype} element of "
               rf"parameter 0; use a multiple of {size}")
    with pytest.raises(ValueError, match=message):
        PagedAdamW(make_typed(dtype, shapes=((3,),)), device_budget_bytes=100 * page_bytes, page_bytes=page_bytes)
    opt = PagedAdamW([{"params": []}], device_budget_bytes=100 * page_bytes, page_bytes=page_bytes)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": make_typed(dtype, shapes=((3,),))})
    assert len(opt.param_groups) == 1


def test_a_parameter_group_on_another_device_is_refused_at_add_param_group():
    opt = PagedAdamW(make_params())
    with pytest.raises(ValueError, match="all parameters on one device"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, device="meta"))]})
    assert len(opt.param_groups) == 1


def test_parameters_cast_after_the_first_step_are_refused_with_a_fix_that_continues_like_adamw():
    ours, ref = make_typed(torch.float32), make_typed(torch.float32)
    paged = PagedAdamW(ours, lr=1e-2, device_budget_bytes=2 * 64, page_bytes=64)
    adamw = torch.optim.AdamW(ref, lr=1e-2)
    step_both(paged, adamw, ours, ref, steps=2)
    for p in ours + ref:  # what model.to(torch.bfloat16) does to each parameter
        p.data = p.data.to(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    for p in ours:
        p.grad = random_like(p, g)
    with pytest.raises(RuntimeError, match=r"is now torch.bfloat16 .* call optimizer.load_state_dict\(optimizer"):
        paged.step()
    paged.load_state_dict(paged.state_dict())  # the fix: AdamW's loader casts the state to the parameters
    adamw.load_state_dict(copy.deepcopy(adamw.state_dict()))
    step_both(paged, adamw, ours, ref, steps=3)
    assert_same_state(paged, adamw, ours, ref)


# ------------------------------------------------------------- state dicts, in AdamW's format
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_has_torch_adamw_format_and_adamw_continues_from_it_bit_exactly(dtype):
    ours, ref, twin = make_typed(dtype), make_typed(dtype), make_typed(dtype)
    paged = PagedAdamW(ours, lr=1e-2, amsgrad=True, device_budget_bytes=3 * 64, page_bytes=64)
    adamw = torch.optim.AdamW(ref, lr=1e-2, amsgrad=True)
    step_both(paged, adamw, ours, ref, steps=3)
    mine, theirs = paged.state_dict(), adamw.state_dict()
    assert mine["param_groups"] == theirs["param_groups"] and mine["state"].keys() == theirs["state"].keys()
    for k, s in theirs["state"].items():
        assert mine["state"][k].keys() == s.keys()
        for name, t in s.items():
            assert torch.equal(mine["state"][k][name], t) and mine["state"][k][name].dtype == t.dtype
    with torch.no_grad():
        for p, q in zip(ours, twin):
            q.copy_(p)
    follower = torch.optim.AdamW(twin, lr=1e-2, amsgrad=True)
    follower.load_state_dict(copy.deepcopy(mine))
    step_both(paged, follower, ours, twin, steps=3)
    assert_same_state(paged, follower, ours, twin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
def test_a_torch_adamw_state_dict_loads_into_paged_adamw_and_continues_bit_exactly(dtype):
    ref, ours = make_typed(dtype), make_typed(dtype)
    adamw = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    step_both(adamw, torch.optim.SGD(ours, lr=0.0), ref, ours, steps=3)
    with torch.no_grad():
        for p, q in zip(ours, ref):
            p.copy_(q)
    paged = PagedAdamW(ours, device_budget_bytes=2 * 64, page_bytes=64)  # groups come from the state dict
    paged.load_state_dict(copy.deepcopy(adamw.state_dict()))
    assert paged.param_groups[0]["lr"] == 1e-2 and paged.param_groups[0]["weight_decay"] == 0.1
    assert all(not s["exp_avg"].device.type == "meta" for s in paged.state.values())
    step_both(paged, adamw, ours, ref, steps=3)
    assert_same_state(paged, adamw, ours, ref)


def _reordered(sd):
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][::-1]


def _flag(name, value):
    def mutate(sd):
        sd["param_groups"][0][name] = value
    return mutate


@pytest.mark.parametrize("mutate,message", [
    (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0], params=[])),
     r"state_dict has 2 param groups but this optimizer has 1; build it with the same groups"),
    (lambda sd: sd["param_groups"][0]["params"].pop(),
     r"state_dict\['param_groups'\]\[0\] lists 2 parameters but param_groups\[0\] has 3"),
    (_reordered, r"state_dict\['state'\]\[0\]\['exp_avg'\] is torch.float32 \(37, 11\) but its parameter is "
                 r"torch.float32 \(300,\): the state dict belongs to other parameters or another order"),
    (lambda sd: sd["state"][1].pop("exp_avg_sq"), r"state_dict\['state'\]\[1\] has keys .* needs .*exp_avg_sq"),
    (lambda sd: sd["state"][1].update(momentum_buffer=torch.zeros(5)), r"it is not an AdamW state"),
    (lambda sd: sd["state"].update({7: sd["state"][0]}), r"state_dict\['state'\]\[7\] belongs to no parameter"),
    (_flag("fused", True), r"state_dict\['param_groups'\]\[0\]: fused=True is not supported by PagedAdamW"),
    (_flag("amsgrad", True), r"state_dict\['state'\]\[0\] has keys .* needs .*max_exp_avg_sq"),
    (_flag("decoupled_weight_decay", False), r"torch.optim.Adam's L2 penalty"),
])
def test_state_dicts_that_do_not_fit_are_refused_at_load_state_dict_leaving_the_optimizer_as_it_was(mutate, message):
    ref, ours = make_params(), make_params()
    adamw = run(torch.optim.AdamW, ref, steps=2)
    paged = run(PagedAdamW, ours, steps=2, device_budget_bytes=3 * 64, page_bytes=64)
    sd = copy.deepcopy(adamw.state_dict())
    mutate(sd)
    before = copy.deepcopy(paged.state_dict())
    with pytest.raises(ValueError, match=message):
        paged.load_state_dict(sd)
    after = paged.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][k][n], t) for k, s in before["state"].items() for n, t in s.items())
