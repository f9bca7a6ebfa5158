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
    assert opt.stats.bytes_moved == (8 + 6) * page_bytes
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
    (dict(page_bytes=0), "positive multiple of 4"),
    (dict(page_bytes=6), "positive multiple of 4"),
    (dict(lr=-1.0), "invalid AdamW hyper-parameters"),
])
def test_bad_settings_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PagedAdamW(make_params(), **kwargs)


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = PagedAdamW(emb.parameters(), device_budget_bytes=1024, page_bytes=64)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()


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
