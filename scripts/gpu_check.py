"""Check the QLoRA stack on one CUDA GPU with no network, and print one verdict line per check.

    python scripts/gpu_check.py                 # gpu: Llama-2-7B shape, random weights; < 8 min on one data-centre GPU
    python scripts/gpu_check.py --profile ci    # the same checks on a tiny Llama on the CPU, < 1 min (run in CI)

1. ``load-4bit``: a Llama of the profile's shape with random weights, loaded by transformers'
   ``from_pretrained(None, state_dict=..., quantization_config=BitsAndBytesConfig(nf4, double quant))``,
   the loading path of a hub checkpoint without the disk. The checkpoint entries are drawn lazily, one
   parameter at a time, when the loader reads them (:class:`RandomCheckpointEntry`), so the 16-bit model
   never exists as a whole. Every decoder ``nn.Linear`` must become ``Linear4bit``; the stored bytes are
   compared with ``companion.memory.footprint``.
   ``build-peak``: the device peak of that build (``PeakMemory``: the CUDA allocator's
   ``max_memory_allocated`` on a GPU, live tensor bytes on a CPU) stays within the built 4-bit model
   plus one decoder layer in 16 bit. Llama-2-7B: 3.87 GB + 0.40 GB; drawing the whole bf16 model first
   (13.5 GB) and quantizing it while it lived peaked at about 17.4 GB.
2. ``qlora-bnb-paged``: QLoRA steps (LoRA r on all linear layers, gradient checkpointing) with the
   optimizer ``TrainingArguments(optim="paged_adamw_8bit")`` builds, ``bitsandbytes.optim.AdamW(optim_bits=8,
   is_paged=True)``. Loss finite, adapter moved, 4-bit weights untouched; peak memory against the estimate
   (``torch.cuda.max_memory_allocated`` does not see the unified memory of paged states, so their bytes are
   added); tokens per second.
3. ``qlora-companion-paged``: the same steps with ``companion.paged.PagedAdamW`` and a device budget of a
   quarter of its state; the estimate counts that budget instead of the full state.
4. ``paged-equals-adamw``: ``PagedAdamW`` against ``torch.optim.AdamW`` on the device (on CUDA with the
   prefetch stream), bit for bit.
5. ``quantizer-bitexact``: ``companion.quant.quantize_4bit`` against bitsandbytes' kernels on the device
   (CUDA kernels on a GPU): packed codes, block constants, double-quantization state, dequantized weights.
6. ``fits-16gb``: the largest device peak of the run (build, both QLoRA checks) within the 14 GB that a
   16 GB card such as a T4 leaves to tensors.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from companion.memory import footprint, published_config  # noqa: E402
from companion.memtrack import PeakMemory, model_tensors, optimizer_device_tensors  # noqa: E402
from companion.models import tiny_llama_config  # noqa: E402
from companion.paged import PagedAdamW  # noqa: E402
from companion.profiles import require_cuda, seed_everything  # noqa: E402

PROFILES = {
    "gpu": dict(model="llama-2-7b", device="cuda", batch_size=1, seq_len=1024, steps=4, r=64, page_bytes=2**20,
                quant_shape=(4096, 4096)),
    "ci": dict(model="tiny-llama", device="cpu", batch_size=2, seq_len=128, steps=2, r=8, page_bytes=2**12,
               quant_shape=(256, 192)),
}
RATIO_OK = (0.67, 1.5)  # measured / estimated peak memory that counts as agreeing (temporaries are not estimated)
# Tensor bytes a 16 GB card can hold: a T4 gives PyTorch about 15 GB, and the CUDA context, cuBLAS'
# workspace and the allocator's cache need the rest (the course's T4 budget: peak within 14 GB).
CARD_16GB_BUDGET = 14e9


def size(n_bytes: float) -> str:
    """Decimal GB, or MB below 1 GB (the ci model is small)."""
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.2f} MB"


@dataclass
class Verdict:
    check: str
    status: str  # PASS, FAIL, WARN or N/A
    detail: str
    peak_bytes: float | None = None  # device peak the check measured, for fits-16gb

    def __str__(self):
        return f"[{self.status:<4}] {self.check}: {self.detail}"


class RandomCheckpointEntry:
    """One entry of a random-weight checkpoint, drawn on ``device`` only when the loader reads it.

    transformers reads a safetensors checkpoint lazily: each entry is a slice object that becomes a
    tensor when indexed with ``entry[...]`` (``transformers.core_model_loading._materialize_copy``), and
    with on-the-fly quantization it reads, quantizes and places one parameter before it reads the next
    (no loader threads, so that 16-bit tensors do not pile up). This entry is such a slice: ``entry[...]``
    copies the module that owns ``key`` from the meta-device ``skeleton``, allocates it on ``device``,
    initialises it with the model's own ``_init_weights`` (what ``_from_config`` draws: normal(0,
    ``initializer_range``) for linear and embedding weights, ones for RMSNorm) and returns the parameter.
    """

    def __init__(self, skeleton: torch.nn.Module, key: str, device: torch.device):
        self.skeleton, self.key, self.device = skeleton, key, device

    def __getitem__(self, index) -> torch.Tensor:
        if index is not Ellipsis:
            raise TypeError(f"{self.key}: a random checkpoint entry is read whole (entry[...]), got entry[{index!r}]")
        prefix, _, name = self.key.rpartition(".")
        module = copy.deepcopy(self.skeleton.get_submodule(prefix)).to_empty(device=self.device)
        self.skeleton._init_weights(module)
        return getattr(module, name).detach()


def build_4bit_llama(name: str, device: torch.device, config=None):
    """Random-weight Llama of ``name``'s shape (or of ``config``), quantized to NF4 + double quantization
    by transformers while it loads, one parameter at a time: the device holds the 4-bit model built so
    far plus one 16-bit parameter and its quantization temporaries, never the 16-bit model.
    Returns ``(model, config)``; raises ``RuntimeError`` if the loader skipped or added a parameter."""
    from transformers import LlamaForCausalLM

    from companion.qlora import bnb_4bit_config, keep_dequantize_kernel_on_cpu

    if config is None:
        config = tiny_llama_config(max_position_embeddings=512) if name == "tiny-llama" else published_config(name)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        skeleton = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    checkpoint = {key: RandomCheckpointEntry(skeleton, key, device) for key in skeleton.state_dict()}
    model, info = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=checkpoint, dtype=torch.bfloat16,
                                                   quantization_config=bnb_4bit_config(torch.bfloat16),
                                                   device_map=str(device), output_loading_info=True)
    wrong = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if wrong:  # a parameter the loader initialised itself would not be bounded by the per-parameter draw
        raise RuntimeError(f"from_pretrained did not load the random checkpoint one to one: {wrong}")
    return keep_dequantize_kernel_on_cpu(model), config


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages a built model keeps on its device: parameters, buffers and every
    tensor of each 4-bit weight's quantization state (its code tables too, unlike ``stored_bytes``)."""
    tensors = model_tensors(model)
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            tensors += [qs.code] + ([qs.state2.code] if qs.nested else [])
    return sum({st.data_ptr(): st.nbytes() for t in tensors if (st := t.untyped_storage()).nbytes()}.values())


def decoder_layer_bytes(config) -> int:
    """Bytes of one decoder layer of ``config`` in bfloat16 (Llama-2-7B: 0.40 GB)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, layer_idx=0).to(torch.bfloat16)
    return sum(p.nbytes for p in layer.parameters())


def check_build_peak(model, config, peak: float) -> Verdict:
    held, layer = held_bytes(model), decoder_layer_bytes(config)
    ok = peak <= held + layer
    return Verdict("build-peak", "PASS" if ok else "FAIL",
                   f"peak {size(peak)} while building vs 4-bit model {size(held)} + one 16-bit decoder layer "
                   f"{size(layer)} = {size(held + layer)} (transient {size(peak - held)})", peak_bytes=peak)


def check_fits_16gb(verdicts: list[Verdict]) -> Verdict:
    peaks = {v.check: v.peak_bytes for v in verdicts if v.peak_bytes is not None}
    if not peaks:
        return Verdict("fits-16gb", "FAIL", "no check measured a peak")
    worst = max(peaks, key=peaks.get)
    return Verdict("fits-16gb", "PASS" if peaks[worst] <= CARD_16GB_BUDGET else "FAIL",
                   f"largest peak {size(peaks[worst])} ({worst}) vs {size(CARD_16GB_BUDGET)} for tensors on a "
                   "16 GB card; " + ", ".join(f"{k} {size(v)}" for k, v in peaks.items()))


def check_load(model, config) -> Verdict:
    import bitsandbytes as bnb

    from companion.measure import stored_bytes

    linears = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    not_4bit = [n for n, kind in linears.items() if n != "lm_head" and kind != bnb.nn.Linear4bit.__name__]
    measured, estimated = stored_bytes(model), footprint(config, "qlora", double_quant=True).weight_bytes
    rel = abs(measured - estimated) / estimated
    ok = not not_4bit and rel < 0.01
    return Verdict("load-4bit", "PASS" if ok else "FAIL",
                   f"{len(linears) - 1} decoder Linear layers in NF4+DQ ({len(not_4bit)} not); stored "
                   f"{size(measured)} vs footprint {size(estimated)} (rel. diff {rel:.1e})")


def qlora_steps(model, optimizer, batches, device) -> dict:
    """One warm-up step (creates the optimizer state), then timed steps under PeakMemory."""
    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step(batches[0])
    baseline = model_tensors(model) + optimizer_device_tensors(optimizer)
    start = time.perf_counter()
    with PeakMemory(device, baseline=baseline) as peak:
        losses = [step(b) for b in batches[1:]]
    seconds = time.perf_counter() - start
    tokens = sum(b["input_ids"].numel() for b in batches[1:])
    return {"losses": losses, "peak": peak.peak_bytes, "tokens_per_s": tokens / seconds}


def check_qlora(model, config, p: dict, device, optimizer_name: str) -> Verdict:
    import bitsandbytes as bnb

    trainable = [q for q in model.parameters() if q.requires_grad]
    frozen = next(q for q in model.parameters() if isinstance(q, bnb.nn.Params4bit))
    frozen_before = frozen.detach().clone()
    lora_b = next(q for n, q in model.named_parameters() if "lora_B" in n)
    b_before = lora_b.detach().clone()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(3, config.vocab_size, (p["batch_size"], p["seq_len"]),
                                                    generator=g).to(device)), "labels": ids}
               for _ in range(p["steps"] + 1)]
    estimate = footprint(config, "qlora", r=p["r"], target_modules="all-linear", double_quant=True,
                         compute_dtype="bfloat16", batch_size=p["batch_size"], seq_len=p["seq_len"],
                         gradient_checkpointing=True,
                         optimizer="paged_adamw_8bit" if optimizer_name == "bnb" else "adamw")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if optimizer_name == "bnb":  # what TrainingArguments(optim="paged_adamw_8bit") builds
            optimizer = bnb.optim.AdamW(trainable, lr=2e-4, optim_bits=8, is_paged=True)
        else:
            state = 8 * sum(q.numel() for q in trainable)
            page = p["page_bytes"]
            optimizer = PagedAdamW(trainable, lr=2e-4, page_bytes=page,
                                   device_budget_bytes=max(4 * page, state // 4 // page * page))
        run = qlora_steps(model, optimizer, batches, device)
    fell_back = any("not supported on CPU" in str(w.message) for w in caught)
    if optimizer_name == "bnb":
        paged = [t for s in optimizer.state.values() for t in s.values() if getattr(t, "is_paged", False)]
        unified = sum(t.nbytes for t in paged)  # cudaMallocManaged: outside the caching allocator
        measured, expected = run["peak"] + unified, estimate.total_bytes
        paging = (f"{len(paged)} state tensors paged ({size(unified)} unified memory)" if not fell_back
                  else "bitsandbytes fell back to unpaged state on the CPU, as it warns")
    else:
        measured = run["peak"]
        expected = estimate.total_bytes - estimate.optimizer_bytes + optimizer.n_slots * optimizer.page_bytes
        s = optimizer.stats
        paging = (f"budget {size(optimizer.n_slots * optimizer.page_bytes)} of {size(optimizer.state_bytes())} state; "
                  f"{s.page_ins} page-ins, {s.page_outs} page-outs, {size(s.bytes_moved)} moved")
    ratio = measured / expected
    finite = all(torch.isfinite(torch.tensor(run["losses"])))
    moved, untouched = not torch.equal(lora_b, b_before), torch.equal(frozen, frozen_before)
    status = "FAIL" if not (finite and moved and untouched) else "PASS" if RATIO_OK[0] <= ratio <= RATIO_OK[1] else "WARN"
    name = "qlora-bnb-paged" if optimizer_name == "bnb" else "qlora-companion-paged"
    return Verdict(name, status, f"loss {run['losses'][-1]:.3f} (finite {finite}), adapter moved {moved}, 4-bit "
                   f"weights untouched {untouched}; peak {size(measured)} vs footprint {size(expected)} "
                   f"(x{ratio:.2f}); {run['tokens_per_s']:,.0f} tokens/s; {paging}", peak_bytes=measured)


def check_paged_equals_adamw(device) -> Verdict:
    g = torch.Generator().manual_seed(0)
    shapes = ((4096, 64), (1000,), (64, 4096))
    ours = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    ref = [torch.nn.Parameter(q.detach().clone()) for q in ours]
    worst = []
    for budget_pages in (2, 8, 10_000):  # smaller than one parameter, a few pages (prefetch on CUDA), everything
        a = [torch.nn.Parameter(q.detach().clone()) for q in ours]
        b = [torch.nn.Parameter(q.detach().clone()) for q in ref]
        paged = PagedAdamW(a, lr=1e-2, weight_decay=0.1, page_bytes=4096, device_budget_bytes=budget_pages * 4096)
        adamw = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=False)
        for _ in range(5):
            for x, y in zip(a, b):
                x.grad = torch.randn(x.shape, generator=g).to(device)
                y.grad = x.grad.clone()
            paged.step()
            adamw.step()
        worst.append(max((x - y).abs().max().item() for x, y in zip(a, b)))
    exact = all(w == 0 for w in worst)
    return Verdict("paged-equals-adamw", "PASS" if exact else "FAIL",
                   f"5 steps at budgets of 2, 8 and 10,000 pages on {device}: max |diff| {max(worst):.1e}"
                   + (" (bit-exact)" if exact else ""))


def check_quantizer(device, shape) -> Verdict:
    try:
        from companion.quant import quantize_4bit, dequantize_4bit
    except ImportError as err:
        return Verdict("quantizer-bitexact", "N/A", f"companion.quant not available ({err})")
    import bitsandbytes.functional as F

    W = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    method = "nearest" if device.type == "cuda" else "cpu-lut"  # CUDA picks the nearest 8-bit code, the CPU a table
    mismatches = []
    for dq in (False, True):
        packed_ref, qs = F.quantize_4bit(W, blocksize=64, compress_statistics=dq, quant_type="nf4")
        try:
            packed, state = quantize_4bit(W, blocksize=64, quant_type="nf4", double_quant=dq, dq_method=method)
        except (RuntimeError, NotImplementedError):  # if it only runs on a CPU: quantize a CPU copy
            packed, state = quantize_4bit(W.cpu(), blocksize=64, quant_type="nf4", double_quant=dq, dq_method=method)
        pairs = {"packed": (packed, packed_ref), "absmax": (state.absmax, qs.absmax),
                 "dequantized": (dequantize_4bit(packed, state), F.dequantize_4bit(packed_ref, qs))}
        if dq:
            pairs.update(offset=(state.offset, qs.offset), absmax2=(state.state2.absmax, qs.state2.absmax))
        mismatches += [f"{k}{' (DQ)' if dq else ''}" for k, (a, b) in pairs.items() if not torch.equal(a.cpu(), b.cpu())]
    kernels = "CUDA" if device.type == "cuda" else "CPU"
    return Verdict("quantizer-bitexact", "FAIL" if mismatches else "PASS",
                   f"{shape[0]}x{shape[1]} bf16, NF4 with and without double quant, vs bitsandbytes {kernels} kernels: "
                   + (f"differs in {', '.join(mismatches)}" if mismatches else "all fields equal"))


def guarded(check: str, fn, *args) -> Verdict:
    """Run one check; an exception becomes its FAIL verdict, so the other checks still report."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - a device run is expensive: report, do not stop
        return Verdict(check, "FAIL", f"raised {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")


def run_checks(profile: str) -> list[Verdict]:
    from peft import LoraConfig, get_peft_model

    p = PROFILES[profile]
    if p["device"] == "cuda":
        require_cuda("gpu_check.py --profile gpu")
    device = torch.device(p["device"])
    seed_everything(0)
    start = time.perf_counter()
    with PeakMemory(device) as build:  # the allocator's peak on CUDA, live tensor bytes on a CPU
        model, config = build_4bit_llama(p["model"], device)
    verdicts = [guarded("load-4bit", check_load, model, config),
                guarded("build-peak", check_build_peak, model, config, build.peak_bytes)]
    print(f"built and quantized {p['model']} in {time.perf_counter() - start:.0f} s", flush=True)
    model.train()  # checkpointing only acts in training mode
    model.activation_checkpointing_enable()  # what SFTTrainer does; no fp32 up-casting of the 16-bit layers
    model = get_peft_model(model, LoraConfig(r=p["r"], lora_alpha=16, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    for name, check in (("bnb", "qlora-bnb-paged"), ("companion", "qlora-companion-paged")):
        verdicts.append(guarded(check, check_qlora, model, config, p, device, name))
        print(verdicts[-1], flush=True)
    verdicts.append(guarded("paged-equals-adamw", check_paged_equals_adamw, device))
    verdicts.append(guarded("quantizer-bitexact", check_quantizer, device, p["quant_shape"]))
    verdicts.append(guarded("fits-16gb", check_fits_16gb, verdicts))
    return verdicts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        verdicts = run_checks(args.profile)
    except RuntimeError as err:
        if "needs a CUDA GPU" not in str(err):
            raise
        print(f"[FAIL] setup: {err}")
        return 2
    print(f"\n{args.profile} profile, {time.perf_counter() - start:.0f} s, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() and args.profile == "gpu" else ""))
    for verdict in verdicts:
        print(verdict)
    return 1 if any(v.status == "FAIL" for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
