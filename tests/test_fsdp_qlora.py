"""QLoRA sharded with FSDP2 over two CPU processes (torchrun, gloo) is the one-process run, split.

Both runs are the real entry point, ``python -m companion.fsdp_qlora``, in subprocesses: the tiny Llama in NF4
(bfloat16 quant storage), LoRA on all linear layers, float32 compute, 5 AdamW steps on the same global batches.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from companion.fsdp_qlora import (REPLICATED, SHARDED, RunConfig, check_config, load_4bit, padded_shard_bytes,
                                  toy_batches)
from companion.memory import footprint
from companion.models import tiny_llama_config
from companion.qlora import load_adapter

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "GOMP_SPINCOUNT": "3000", "OMP_NUM_THREADS": "1"}
ARGS = ["--model", "tiny", "--steps", "5", "--global-batch", "4", "--compute", "float32"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# float32 compute: two ranks differ from one process only in the order of the gradient sums (rank halves
# reduce-scattered, then averaged), about 1e-7 relative per step; measured 1e-6 on the losses after 5 AdamW steps
# (lr 1e-2). 1e-5 leaves a factor 10 for other CPUs and BLAS builds and is still far below a real bug: an
# unaveraged gradient or a wrong row split changes the loss by more than 1e-3 from step 2 on.
LOSS_ATOL = 1e-5
# Probe logits (largest about 0.7): the reloaded adapter gives the run's own logits exactly in one thread (0.0
# measured), the one-process run's to 1.4e-6 after 5 steps; 1e-5 allows other thread counts and BLAS builds.
LOGITS_ATOL = 1e-5


def entry_point(out, *args, nproc=None):
    """``python -m companion.fsdp_qlora`` alone, or under torchrun on 2 processes when ``nproc``."""
    cmd = (TORCHRUN if nproc else [sys.executable]) + ["-m", "companion.fsdp_qlora", "--out", str(out), *args]
    return subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process, timeout=300):
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process and the 1-process run of the same 5 global batches, started together."""
    root = tmp_path_factory.mktemp("fsdp_qlora")
    started = {"fsdp": entry_point(root / "fsdp", *ARGS, nproc=2), "single": entry_point(root / "single", *ARGS)}
    out = {}
    for name, process in started.items():
        rc, stdout, stderr = finished(process)
        assert rc == 0, f"{name} run failed:\n{stderr[-3000:]}"
        out[name] = {"dir": root / name, "stdout": stdout,
                     "metrics": json.loads((root / name / "metrics.json").read_text())}
    return out


def test_two_processes_follow_the_one_process_loss_trajectory(runs):
    fsdp, single = runs["fsdp"]["metrics"], runs["single"]["metrics"]
    assert (fsdp["world_size"], fsdp["fsdp"], single["world_size"], single["fsdp"]) == (2, True, 1, False)
    assert len(fsdp["losses"]) == len(single["losses"]) == 5
    assert fsdp["losses"] == pytest.approx(single["losses"], rel=0, abs=LOSS_ATOL)
    assert fsdp["losses"][-1] < fsdp["losses"][0] - 0.05  # it trains: the toy sequences are learnable


def test_rank_0_alone_prints_one_line_per_step(runs):
    lines = [line for line in runs["fsdp"]["stdout"].splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{i}/5" for i in range(1, 6)]


def test_the_gathered_adapter_reloads_in_one_process_and_gives_the_distributed_logits(runs):
    run = runs["fsdp"]["dir"]
    probe = torch.load(run / "probe.pt")
    base = load_4bit(run / "base", "float32")
    with torch.no_grad():
        base_logits = base(input_ids=probe["input_ids"]).logits
        logits = load_adapter(base, run / "adapter").eval()(input_ids=probe["input_ids"]).logits
    assert (logits - probe["logits"]).abs().max() < LOGITS_ATOL
    assert (logits - torch.load(runs["single"]["dir"] / "probe.pt")["logits"]).abs().max() < LOGITS_ATOL
    assert (logits - base_logits).abs().max() > 1000 * LOGITS_ATOL  # the adapter changes the model


def test_each_rank_holds_half_of_the_sharded_parameters_and_all_of_the_quant_state(runs):
    whole = runs["single"]["metrics"]["bytes_per_rank"][0]
    ranks = runs["fsdp"]["metrics"]["bytes_per_rank"]
    assert len(ranks) == 2 and whole["padding"] == 0
    # the real rows of the shards add up to the whole parameters: nothing duplicated, nothing missing
    assert sum(rank[p] for rank in ranks for p in SHARDED) - sum(rank["padding"] for rank in ranks) \
        == sum(whole[p] for p in SHARDED)
    for rank in ranks:
        # every dim 0 of the tiny Llama is even, so FSDP2 pads nothing and each rank holds exactly half
        assert rank["padding"] == 0
        assert {p: rank[p] for p in SHARDED} == {p: whole[p] // 2 for p in SHARDED}
        assert {p: rank[p] for p in REPLICATED} == {p: whole[p] for p in REPLICATED}
        assert rank["weight_bytes"] < whole["weight_bytes"] and rank["adapter_bytes"] == whole["adapter_bytes"] // 2


def test_one_process_bytes_are_what_companion_memory_counts(runs):
    whole = runs["single"]["metrics"]["bytes_per_rank"][0]
    report = footprint(tiny_llama_config(), "qlora", r=8, target_modules="all-linear", double_quant=True,
                       compute_dtype="float32")
    assert (whole["weight_bytes"], whole["adapter_bytes"]) == (report.weight_bytes, report.adapter_bytes)


def test_the_sharded_checkpoint_loads_in_one_process_and_holds_the_adapter_and_adamw_state(runs, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run = runs["fsdp"]["dir"]
    assert sorted(p.name for p in (run / "checkpoint").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    dcp_to_torch_save(run / "checkpoint", tmp_path / "whole.pt")  # the two ranks' shards, resharded to one
    checkpoint = torch.load(tmp_path / "whole.pt")
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert {k.replace(".default", ""): v for k, v in checkpoint["model"].items()}.keys() == adapter.keys()
    for key, value in checkpoint["model"].items():
        assert torch.equal(value, adapter[key.replace(".default", "")])
        state = checkpoint["optim"]["state"][key]
        assert int(state["step"]) == 5 and state["exp_avg"].shape == state["exp_avg_sq"].shape == value.shape


def test_padded_shards_round_dim_0_up_like_torch_chunk():
    assert padded_shard_bytes((5, 3), 4, 2) == 3 * 3 * 4  # rows 3 + 2, the second padded to 3
    assert padded_shard_bytes((7, 1), 2, 3) == max(c.shape[0] for c in torch.zeros(7).chunk(3)) * 2
    assert padded_shard_bytes((8,), 4, 2) == 16 and padded_shard_bytes((), 4, 2) == 4


def test_every_rank_takes_its_rows_of_the_same_global_batches():
    batches = toy_batches(3, 4, 16, seed=0)
    assert all(b.shape == (4, 16) and b.min() >= 4 and b.max() < 100 for b in batches)
    assert all(torch.equal(a, b) for a, b in zip(batches, toy_batches(3, 4, 16, seed=0)))
    assert torch.equal(torch.cat([batches[0][0::2], batches[0][1::2]]).sort(0).values, batches[0].sort(0).values)


def test_bad_runs_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="--steps must be at least 1, got 0"):
        check_config(RunConfig(out="x", steps=0), 1, False)
    with pytest.raises(ValueError, match="does not split evenly over 2 processes.*use --global-batch 4"):
        check_config(RunConfig(out="x", global_batch=3), 2, True)
    with pytest.raises(ValueError, match="Cannot flatten integer dtype.*bnb_4bit_quant_storage=torch.bfloat16"):
        check_config(RunConfig(out="x", quant_storage="uint8"), 2, True)
    check_config(RunConfig(out="x", quant_storage="uint8"), 1, False)  # bitsandbytes' default, one process
    check_config(RunConfig(out="x", global_batch=3), 1, False)


def test_torchrun_stops_an_uneven_global_batch_before_loading_a_model(tmp_path):
    rc, _, stderr = finished(entry_point(tmp_path, "--global-batch", "5", nproc=2), timeout=120)
    assert rc != 0 and "--global-batch 5 does not split evenly over 2 processes" in stderr
    assert "use --global-batch 6" in stderr and not (tmp_path / "base").exists()


def test_each_ranks_bytes_are_what_footprint_estimates_for_fsdp(runs):
    world_size = runs["fsdp"]["metrics"]["world_size"]
    report = footprint(tiny_llama_config(), "qlora", r=8, target_modules="all-linear", double_quant=True,
                       compute_dtype="float32", world_size=world_size, sharding="fsdp", quant_storage="bfloat16")
    for rank in runs["fsdp"]["metrics"]["bytes_per_rank"]:
        assert (rank["weight_bytes"], rank["adapter_bytes"]) == (report.weight_bytes, report.adapter_bytes)
