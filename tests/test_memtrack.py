"""TensorMemory counts live tensor storages like torch's MemTracker, and autograd's saved tensors once each."""

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from companion.memtrack import PeakMemory, TensorMemory, model_tensors, optimizer_device_tensors
from companion.models import build_tiny_llama, tiny_llama_config
from companion.paged import PagedAdamW


def test_live_and_peak_bytes_follow_allocations_and_frees():
    with TensorMemory() as mem:
        a = torch.empty(1000)  # 4,000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4,000 bytes
        assert mem.live_bytes == 8000
        del a
        assert mem.live_bytes == 4000
        c = b.view(50, 10)  # a view shares the storage: nothing new
        assert mem.live_bytes == 4000
        del b, c
    assert mem.live_bytes == 0 and mem.peak_bytes == 8000


def test_baseline_tensors_count_and_tensors_from_outside_do_not():
    weight = torch.zeros(256)
    outside = torch.zeros(1024)
    with TensorMemory(baseline=[weight]) as mem:
        y = outside + 1  # new: counted; `outside` itself is not
    assert mem.baseline_bytes == weight.nbytes
    assert mem.peak_bytes == weight.nbytes + y.nbytes


def test_saved_for_backward_counts_each_storage_once_and_is_released_by_backward():
    w = torch.nn.Parameter(torch.randn(16, 32))
    with TensorMemory(baseline=[w]) as mem:
        x = torch.randn(8, 16, requires_grad=True)
        h = x @ w  # mm saves x and w; w is a weight, not an activation
        r = torch.relu(h)  # relu saves its output
        loss = (r * r).sum()  # mul saves r twice: one storage
        assert mem.saved_bytes == x.nbytes + r.nbytes
        loss.backward()
        assert mem.saved_bytes == 0
    assert mem.peak_saved_bytes == x.nbytes + r.nbytes


def training_step(model, optimizer, input_ids):
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_peak_of_a_training_step_equals_torch_memtracker(checkpointing):
    model = build_tiny_llama(tiny_llama_config(max_position_embeddings=512), seed=0)
    if checkpointing:
        model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    input_ids = torch.randint(4, 100, (2, 256), generator=torch.Generator().manual_seed(0))
    training_step(model, optimizer, input_ids)  # optimizer state exists from here on
    with TensorMemory(model_tensors(model) + optimizer_device_tensors(optimizer)) as mem:
        training_step(model, optimizer, input_ids)
    reference = MemTracker()
    reference.track_external(model, optimizer)
    with reference:
        training_step(model, optimizer, input_ids)
    assert mem.peak_bytes == reference.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_paged_adamw_occupies_the_device_with_its_pool_only():
    params = [torch.nn.Parameter(torch.randn(4096))]
    paged = PagedAdamW(params, device_budget_bytes=4 * 1024, page_bytes=1024)
    assert optimizer_device_tensors(paged) == []  # no pool before the first step
    params[0].grad = torch.ones(4096)
    paged.step()
    (pool,) = optimizer_device_tensors(paged)
    assert pool.nbytes == 4 * 1024 < paged.state_bytes()
    adamw = torch.optim.AdamW(params)
    adamw.step()
    assert sum(t.nbytes for t in optimizer_device_tensors(adamw)) == 2 * 4096 * 4 + 4  # exp_avg, exp_avg_sq, step


def test_peak_memory_on_cpu_uses_the_tensor_count():
    weight = torch.zeros(100)
    with PeakMemory("cpu", baseline=[weight]) as peak:
        tmp = torch.ones(300)
        del tmp
    assert peak.peak_bytes == 400 + 1200


def test_writing_into_a_tensor_from_outside_allocates_nothing():
    host = torch.zeros(4096)  # e.g. PagedAdamW's host pages, created before the measurement
    with TensorMemory() as mem:
        page = torch.ones(1024)
        host[:1024].copy_(page)  # in place, through a view: no new storage
        host.mul_(2)
    assert mem.peak_bytes == page.nbytes
