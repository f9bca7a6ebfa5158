"""QLoRA sharded over processes with FSDP2: the course's distributed training entry point (Chapter 7).

Run it on N processes with torchrun, or in one process without torchrun as the reference::

    torchrun --standalone --nproc_per_node 2 -m companion.fsdp_qlora --out runs/fsdp --compute float32
    python -m companion.fsdp_qlora --out runs/single --compute float32

What each process does, with the library call behind each step:

    start        torch.distributed.init_process_group (gloo on CPU, nccl on cuda:LOCAL_RANK) from torchrun's env
    load 4 bit   AutoModelForCausalLM.from_pretrained(..., BitsAndBytesConfig(nf4, double quant,
                 bnb_4bit_quant_storage=torch.bfloat16)); LoRA on all linear layers (peft.get_peft_model)
    shard        torch.distributed.fsdp.fully_shard on every decoder layer, then on the root
    train        the same global batch every step, rank r takes rows r::world_size (DistributedSampler's split)
    save         torch.distributed.checkpoint (each rank writes its shards) and, on rank 0, a plain PEFT adapter

Why ``bnb_4bit_quant_storage=torch.bfloat16``: FSDP shards and all-gathers the packed 4-bit weights as ordinary
parameters. bitsandbytes packs two NF4 codes per uint8 by default; FSDP1 (what accelerate's FSDP plugin wraps)
flattens each unit into one FlatParameter, which cannot hold integers ("Cannot flatten integer dtype tensors").
bfloat16 storage holds the same bytes, four codes per element. FSDP2 shards each parameter on its own, but a
``MixedPrecisionPolicy(param_dtype=...)`` other than the storage dtype would cast the codes as numbers, so none is
used: the base loads in the ``compute`` dtype and bitsandbytes computes in it. ``prepare_model_for_kbit_training``
is not called (TRL's SFTTrainer does not either): its fp32 up-cast of norms, embeddings and head would double them.

With ``--compute float32`` two processes follow the one-process losses to about 1e-6 (only the order of the
gradient sums differs); bfloat16 compute drifts by about 1e-4 in 5 steps. Every rank loads the whole 4-bit model
before ``fully_shard`` keeps its shards, so each device must hold it once. References: Zhao et al. 2023, "PyTorch
FSDP" (VLDB); Dettmers et al. 2023, QLoRA §3; the FSDP2 tutorial (pytorch.org/tutorials/intermediate/
FSDP_tutorial.html); bitsandbytes docs, "FSDP-QLoRA".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

COMPUTE_DTYPES = ("float32", "bfloat16")
QUANT_STORAGES = ("bfloat16", "uint8")  # uint8: bitsandbytes' default, one process only
# Bytes of model state by part. weight_bytes = the base model: every part but "adapter" and "code_tables"
# (the per-layer NF4 and nested code tables, 1,088 bytes per 4-bit layer, which companion.memory leaves out).
SHARDED = ("packed_4bit", "other_base", "adapter")  # parameters: FSDP2 shards them on dim 0
REPLICATED = ("buffers", "absmax", "nested_absmax", "offset", "code_tables")  # FSDP2 leaves them whole
WEIGHT_PARTS = ("packed_4bit", "other_base", "buffers", "absmax", "nested_absmax", "offset")
TOY_TOKENS = (4, 100)  # token ids of the toy data and the probe: the character tokenizer's 96 printable characters


@dataclass(frozen=True)
class RunConfig:
    """One run; the defaults are the ``ci`` profile's (a tiny Llama, 5 steps, seconds on a CPU)."""

    out: str
    model: str = "tiny"  # "tiny" (companion.models.build_tiny_llama, offline), a local path or a hub id
    steps: int = 5
    global_batch: int = 4  # sequences per optimizer step, over all ranks together
    seq_len: int = 64  # tokens per sequence
    compute: str = "bfloat16"  # bnb_4bit_compute_dtype and the dtype of the unquantized layers
    quant_storage: str = "bfloat16"  # bnb_4bit_quant_storage
    seed: int = 0  # LoRA initialisation and data; the tiny base is always built from seed 0
    r: int = 8
    lora_alpha: int = 16
    lr: float = 1e-2  # AdamW


def launch_info(env=os.environ) -> tuple[int, bool]:
    """``(world_size, fsdp)`` from torchrun's environment: FSDP whenever torchrun started us (even on 1 rank)."""
    fsdp = "LOCAL_RANK" in env and "WORLD_SIZE" in env
    return (int(env["WORLD_SIZE"]) if fsdp else 1), fsdp


def check_config(config: RunConfig, world_size: int, fsdp: bool) -> None:
    """Raise ``ValueError`` naming the fix for a run that would fail or not compare with the one-process run."""
    if config.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {config.steps}")
    if config.global_batch < 1 or config.global_batch % world_size:
        fix = max(1, math.ceil(config.global_batch / world_size)) * world_size  # the next multiple up
        raise ValueError(f"--global-batch {config.global_batch} does not split evenly over {world_size} processes: "
                         "every rank takes global_batch / world_size rows of the same global batch, so that the "
                         f"run equals the one-process run; use --global-batch {fix} (a multiple of {world_size}) "
                         "or change --nproc_per_node")
    if config.compute not in COMPUTE_DTYPES or config.quant_storage not in QUANT_STORAGES:
        raise ValueError(f"--compute must be one of {COMPUTE_DTYPES} and --quant-storage one of {QUANT_STORAGES}, "
                         f"got {config.compute!r} and {config.quant_storage!r}")
    if fsdp and config.quant_storage == "uint8":
        raise ValueError("--quant-storage uint8 is not sharded here: FSDP shards the packed 4-bit weights as ordinary "
                         "parameters, and uint8 ones break the usual set-ups (FSDP1 and accelerate's FSDP plugin stop "
                         "with 'Cannot flatten integer dtype tensors'; an FSDP2 MixedPrecisionPolicy would cast the "
                         "codes as numbers). Load the base with BitsAndBytesConfig(bnb_4bit_quant_storage="
                         "torch.bfloat16) (--quant-storage bfloat16): the same bytes, four NF4 codes per element")


def init_distributed(fsdp: bool) -> tuple[int, torch.device]:
    """``(rank, device)``; joins torchrun's process group when ``fsdp``: gloo on CPU, nccl on ``cuda:LOCAL_RANK``."""
    cuda = torch.cuda.is_available()
    if not fsdp:
        return 0, torch.device("cuda", 0) if cuda else torch.device("cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return dist.get_rank(), device


def save_tiny_base(directory) -> Path:
    """Write the tiny Llama (bfloat16 safetensors, like a hub checkpoint) and its tokenizer to ``directory``."""
    from .models import build_tiny_llama, char_tokenizer

    build_tiny_llama(seed=0, dtype=torch.bfloat16).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return Path(directory)


def load_4bit(name_or_path, compute: str, quant_storage: str = "bfloat16", device="cpu"):
    """The base model in NF4 with double quantization (QLoRA §3) on ``device``, unquantized layers in ``compute``."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .models import resolve_hub_name
    from .qlora import keep_dequantize_kernel_on_cpu

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=getattr(torch, compute),
                             bnb_4bit_quant_storage=getattr(torch, quant_storage))
    model = AutoModelForCausalLM.from_pretrained(resolve_hub_name(str(name_or_path)), quantization_config=bnb,
                                                 dtype=getattr(torch, compute), device_map={"": str(device)})
    if model.config.vocab_size < TOY_TOKENS[1]:
        raise ValueError(f"the toy data uses token ids below {TOY_TOKENS[1]}; {name_or_path} has only "
                         f"{model.config.vocab_size}: use --model tiny or a model with a real vocabulary")
    return keep_dequantize_kernel_on_cpu(model)  # no AVX512-BF16 repacking of the packed weight on a CPU


def add_lora(model, config: RunConfig):
    """Non-reentrant activation checkpointing, then LoRA on every linear layer (``"all-linear"``), seeded."""
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False  # no key/value cache while training (checkpointing would switch it off anyway)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(config.seed)  # the same initialisation on every rank and in the one-process run
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated alias is_gradient_checkpointing
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora)


def shard(model, device: torch.device, world_size: int):
    """``fully_shard`` each decoder layer (one all-gather per layer), then the root (embeddings, norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    layer_classes = set(model.get_base_model()._no_split_modules)  # transformers' decoder-layer classes
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def toy_batches(steps: int, global_batch: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """``steps`` global batches, (global_batch, seq_len) token ids each: x_t = 4 + (start + stride * t) mod 96,
    start in {0, 32, 64} and stride in {1, 2, 3} per row, so the loss falls within a few steps."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(seq_len)
    span = TOY_TOKENS[1] - TOY_TOKENS[0]
    rows = [torch.randint(0, 3, (2, global_batch, 1), generator=g) for _ in range(steps)]  # start, stride: (batch, 1)
    return [TOY_TOKENS[0] + (32 * start + (1 + stride) * t) % span for start, stride in rows]  # (batch, seq_len)


def train_steps(model, optimizer, batches: list[torch.Tensor], rank: int, world_size: int,
                device: torch.device) -> list[float]:
    """One AdamW step per global batch on this rank's rows ``r::world_size``; returns the global mean losses.

    Every rank has the same number of tokens, so the mean of the rank means is the global mean, and FSDP's
    reduce-scatter averages the gradients over ranks: the step equals a one-process step on the whole batch.
    Rank 0 prints one line per step.
    """
    model.train()
    losses, start = [], time.perf_counter()
    for step, batch in enumerate(batches, 1):
        ids = batch[rank::world_size].to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().float()
        if dist.is_initialized():
            dist.all_reduce(value)  # sum of the rank means
            value /= world_size
        losses.append(value.item())
        if rank == 0:
            print(f"step {step}/{len(batches)}  loss {losses[-1]:.6f}  {time.perf_counter() - start:.1f} s",
                  flush=True)
    return losses


def padded_shard_bytes(shape, element_size: int, world_size: int) -> int:
    """Bytes FSDP2 allocates on each rank for a parameter sharded on dim 0: ceil(dim0 / world_size) rows
    (``torch.chunk``'s split, the last ranks' shorter or empty chunks padded to that size)."""
    rows = math.ceil(shape[0] / world_size) if len(shape) else 1
    return rows * math.prod(shape[1:]) * element_size


def shard_bytes(model, world_size: int) -> dict[str, int]:
    """Bytes of model state this rank holds, by part (``SHARDED`` and ``REPLICATED``), plus totals.

    How it counts: a parameter that FSDP2 sharded (a DTensor) counts as FSDP2 allocates it,
    :func:`padded_shard_bytes`; ``padding`` says how many of those bytes are padding beyond the rank's real
    rows (``DTensor.to_local()``). Anything else counts whole: parameters of an unsharded model, buffers (rotary
    ``inv_freq``) and each 4-bit layer's ``QuantState`` (``absmax``, ``state2.absmax`` as ``nested_absmax``,
    ``offset``, and the two code tables), which bitsandbytes keeps on the module, outside FSDP, on every rank.
    ``weight_bytes`` sums ``WEIGHT_PARTS`` (the base model, as ``companion.memory.footprint`` counts it);
    ``adapter_bytes`` is the LoRA parameters.
    """
    from bitsandbytes.nn import Linear4bit
    from torch.distributed.tensor import DTensor

    held, seen = dict.fromkeys(SHARDED + REPLICATED + ("padding",), 0), set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights count once
                continue
            seen.add(id(p))
            part = ("adapter" if p.requires_grad else
                    "packed_4bit" if isinstance(module, Linear4bit) and name == "weight" else "other_base")
            if isinstance(p, DTensor):
                allocated = padded_shard_bytes(p.shape, p.element_size(), world_size)
                held[part] += allocated
                held["padding"] += allocated - p.to_local().nbytes
            else:
                held[part] += p.nbytes
        held["buffers"] += sum(b.nbytes for b in module.buffers(recurse=False))
        state = getattr(module, "quant_state", None)  # FSDP2's DTensor weight lost it; the Linear4bit keeps it
        if isinstance(module, Linear4bit) and state is not None:
            held["absmax"] += state.absmax.nbytes
            held["code_tables"] += state.code.nbytes
            if state.nested:
                held["nested_absmax"] += state.state2.absmax.nbytes
                held["offset"] += state.offset.nbytes
                held["code_tables"] += state.state2.code.nbytes
    held["weight_bytes"] = sum(held[k] for k in WEIGHT_PARTS)
    held["adapter_bytes"] = held["adapter"]
    return held


def save(model, optimizer, out: Path, rank: int) -> None:
    """LoRA weights and AdamW state as a ``torch.distributed.checkpoint`` under ``out/checkpoint`` (each rank
    writes its shards; it loads back on any number of ranks), and a plain PEFT adapter under ``out/adapter``
    (the LoRA DTensors all-gathered, never the 4-bit base; written by rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    lora = {k: v for k, v in model_state.items() if "lora_" in k}  # the frozen base is the hub checkpoint
    with warnings.catch_warnings():  # one process (the reference) saves the same format, without a process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.save({"model": lora, "optim": optim_state}, checkpoint_id=out / "checkpoint")
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()  # a collective: every rank calls it
            for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        model.save_pretrained(out / "adapter", state_dict=full)


def probe_logits(model, device: torch.device, seed: int = 99) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, logits)`` of the model in eval mode on a fixed (2, 32) probe batch; logits float32 on CPU."""
    ids = torch.randint(*TOY_TOKENS, (2, 32), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return ids, model(input_ids=ids.to(device)).logits.float().cpu()


def run(config: RunConfig) -> dict | None:
    """Train, save and measure one run on this process; rank 0 writes and returns ``out/metrics.json``."""
    from transformers.utils import logging as hf_logging

    world_size, fsdp = launch_info()
    check_config(config, world_size, fsdp)
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per rank would bury the step lines
    start = time.perf_counter()
    rank, device = init_distributed(fsdp)
    try:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        base = out / "base" if config.model == "tiny" else config.model
        if config.model == "tiny" and rank == 0:
            save_tiny_base(base)
        if fsdp:  # the tiny base is on disk before any rank loads it
            dist.barrier()
        model = add_lora(load_4bit(base, config.compute, config.quant_storage, device), config)
        if fsdp:
            shard(model, device, world_size)
        held = shard_bytes(model, world_size)
        if fsdp:  # the step times start when every rank is ready
            dist.barrier()
        loaded = time.perf_counter()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                      weight_decay=0.0)
        batches = toy_batches(config.steps, config.global_batch, config.seq_len, config.seed)
        losses = train_steps(model, optimizer, batches, rank, world_size, device)
        trained = time.perf_counter()
        save(model, optimizer, out, rank)
        ids, logits = probe_logits(model, device)
        per_rank = [held] * world_size
        if fsdp:
            dist.all_gather_object(per_rank, held)
        if rank != 0:
            return None
        torch.save({"input_ids": ids, "logits": logits}, out / "probe.pt")
        metrics = {"world_size": world_size, "fsdp": fsdp, "device": str(device), "model": config.model,
                   "compute": config.compute, "quant_storage": config.quant_storage, "steps": config.steps,
                   "global_batch": config.global_batch, "seq_len": config.seq_len, "seed": config.seed,
                   "losses": losses, "bytes_per_rank": per_rank,
                   "seconds": {"load": loaded - start, "train": trained - loaded,
                               "total": time.perf_counter() - start}}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        print(f"world size {world_size}: {config.steps} steps in {metrics['seconds']['train']:.1f} s, "
              f"{out / 'metrics.json'}", flush=True)
        return metrics
    finally:
        if fsdp:
            dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m companion.fsdp_qlora",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for metrics.json, checkpoint/, adapter/, probe.pt")
    parser.add_argument("--model", default="tiny", help="'tiny' (offline), a local folder or a hub id")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=4, help="sequences per step over all ranks")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--compute", default="bfloat16", choices=COMPUTE_DTYPES)
    parser.add_argument("--quant-storage", default="bfloat16", choices=QUANT_STORAGES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = RunConfig(**vars(args))  # the options are RunConfig's fields
    try:
        check_config(config, *launch_info())
    except ValueError as err:
        parser.error(str(err))
    run(config)


if __name__ == "__main__":
    main()
