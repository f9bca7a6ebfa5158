"""The T4 budget: peak GPU memory and run time of a notebook's ``gpu`` profile on a Colab T4, estimated.

Nothing here is measured. A notebook's work is written down as a list of :class:`Run` (model, method,
batch, sequence length, steps, evaluation and generation) by :func:`companion.budget_plans.plan`;
:func:`estimate` turns it into an :class:`Estimate` with two numbers:

- **peak memory**: the largest :func:`companion.memory.footprint` ``total_bytes`` of any run (weights,
  adapter, gradients, optimizer state, saved activations, logits), plus what that run keeps beside it:
  other models still alive in the notebook (``resident_bytes``), a KV cache while generating, and the
  attention matrices of models that do not use a fused attention kernel (DeBERTa-v2's disentangled
  attention keeps its (batch, heads, seq, seq) softmax, its dropout mask and its dropped-out copy).
  The budget is :data:`T4`'s ``usable_gb``: 14 of the card's 16 GB, the rest left for the CUDA context,
  allocator fragmentation and the temporaries ``footprint`` does not count.
- **time**: FLOPs divided by an assumed throughput, with a floor for small models. FLOPs follow the
  Kaplan et al. 2020 convention (Table 1, §2.1; the "6ND" of Hoffmann et al. 2022): a forward pass costs
  ``F = 2 N + 2 n_layer seq d_attn`` per token, N the parameters that take part in matrix products (the
  non-embedding parameters, plus the output projection of a language model even when it is tied to the
  input embedding). Training costs ``3 F`` per token with every weight trained (forward, gradients of
  activations, gradients of weights) and ``2 F`` with a frozen base and adapters (the adapters' own
  FLOPs are negligible); gradient checkpointing adds one more forward, ``F``. Evaluation is ``F`` per token,
  generation ``F`` per prompt and generated token. Throughput is :data:`MFU` times the T4's datasheet
  peak for the dtype the run computes in: 65 TFLOPS for float16 on the tensor cores, 8.1 TFLOPS for
  float32 (Turing has no TF32). The floor: eager PyTorch launches each layer's kernels one by one, which
  we take to cost at least :data:`LAYER_PASS_S` per layer and pass (a training step is three passes,
  forward and a backward of about twice the kernels, four with checkpointing; a generated token is one).
  The GPU computes while Python launches the next kernels, so each phase takes the longer of the two.
  A 4-bit model after ``peft.prepare_model_for_kbit_training`` keeps every other weight in float32, and
  without autocast its activations and its output layer follow (``Run.fp32_output_layer``): on a T4 that
  layer then runs at the float32 peak, which for Qwen2.5's 152k-token vocabulary dominates a step.
  Downloads and model loading are not counted.

:data:`MFU`, model FLOPs utilisation, is defined in the PaLM paper (Chowdhery et al. 2022, §4.1); its
540B model reached 46.2% on TPU v4 with a tuned system. We assume 25% on a T4: the course's models are
small (matrices of 384-4864 columns), run eagerly with many memory-bound operations (norms, softmax over
up to 152k vocabulary entries, 4-bit dequantisation), and the T4's 70 W power cap holds its clock below
the boost clock its datasheet peak assumes. Both constants are assumptions: change them and the
estimates move with them.

T4 figures: NVIDIA T4 Tensor Core GPU datasheet (2019), https://www.nvidia.com/content/dam/en-zz/
Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf: 16 GB GDDR6, 65 TFLOPS mixed
precision (FP16/FP32), 8.1 TFLOPS single precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .memory import DECODERS, PUBLISHED_CONFIGS, footprint


@dataclass(frozen=True)
class GPU:
    """A card's datasheet figures and the share of its memory the budget lets tensors use."""

    name: str
    memory_gb: float  # decimal GB, as the datasheet gives it
    usable_gb: float  # tensor bytes the budget allows: the rest is CUDA context, fragmentation, temporaries
    peak_tflops: dict  # compute dtype -> dense peak in TFLOPS

    def tflops(self, dtype: str) -> float:
        if dtype not in self.peak_tflops:
            raise ValueError(f"no peak for compute dtype {dtype!r} on {self.name}; "
                             f"choose one of {sorted(self.peak_tflops)}")
        return self.peak_tflops[dtype]


T4 = GPU("Colab T4", memory_gb=16.0, usable_gb=14.0, peak_tflops={"float16": 65.0, "float32": 8.1})
MFU = 0.25  # assumed model FLOPs utilisation (see the module docstring)
LAYER_PASS_S = 1e-3  # assumed floor: seconds per layer per pass of eager kernel launches
BUDGET_MINUTES = 30.0
GENERATE_BATCH = 64  # companion.qlora.generate's batch_size

# Models the notebooks use that companion.memory does not publish, as kwargs footprint understands.
# sentence-transformers/all-MiniLM-L6-v2 config.json. microsoft/deberta-v3-base (model_type deberta-v2)
# is written as the BERT layout it shares: same 12 layers of Linear shapes, word embeddings of 128,100,
# its 512 x 768 relative-position embeddings in place of BERT's position embeddings, no token types,
# ContextPooler + classifier in place of BERT's pooler + classifier. Its parameter count (184.4M) is
# DeBERTa's to within the 1,536 of the relative-position LayerNorm that BERT has no place for.
EXTRA_CONFIGS = {
    "all-minilm-l6-v2": dict(model_type="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                             intermediate_size=1536, vocab_size=30522, max_position_embeddings=512, type_vocab_size=2),
    "deberta-v3-base": dict(model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, vocab_size=128100, max_position_embeddings=512, type_vocab_size=0),
    # ch04_paged_optimizers' gpu model: tiny_llama_config(...) in its second code cell
    "ch04-paged-llama": dict(model_type="llama", hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                             num_key_value_heads=16, intermediate_size=2816, vocab_size=32000,
                             tie_word_embeddings=False),
}
EAGER_ATTENTION = {"deberta-v3-base"}  # keeps (batch, heads, seq, seq) attention matrices for backward
# Module names of DeBERTa-v2 -> the BERT names of its stand-in config (peft's suffix match is the same)
DEBERTA_TO_BERT = {"query_proj": "query", "key_proj": "key", "value_proj": "value"}


def model_config(name: str) -> dict:
    """The config kwargs of ``name`` (:data:`companion.memory.PUBLISHED_CONFIGS` or :data:`EXTRA_CONFIGS`)."""
    configs = {**PUBLISHED_CONFIGS, **EXTRA_CONFIGS}
    if name not in configs:
        raise ValueError(f"no config for model {name!r}; add it to EXTRA_CONFIGS or choose one of {sorted(configs)}")
    return dict(configs[name])


def matmul_params(name: str) -> tuple[int, int]:
    """N of the FLOPs convention, split as (body, output layer): parameters in matrix products, without
    input embeddings; a causal LM's output projection (vocab x hidden) counts even when tied."""
    cfg = model_config(name)
    h, total = cfg["hidden_size"], footprint(cfg, "full").total_params
    if cfg["model_type"] in DECODERS:
        head = cfg["vocab_size"] * h
        return total - head - (0 if cfg.get("tie_word_embeddings") else head), head
    embeddings = cfg["vocab_size"] + cfg.get("max_position_embeddings", 512) + cfg.get("type_vocab_size", 2)
    return total - embeddings * h, 0


@dataclass(frozen=True)
class Run:
    """One piece of a notebook's work, repeated ``repeats`` times (seeds x arms).

    ``method`` is a :data:`companion.memory.METHODS` name; ``steps`` optimizer steps of ``grad_accum``
    micro-batches of (``batch_size``, ``seq_len``) tokens (``steps=0``: no training, only evaluation or
    generation on the loaded model). ``eval_batches``: forward passes of a training-shaped batch, all
    evaluations of the run together. ``generate_calls`` x ``generate_rows`` prompts of ``seq_len`` tokens
    (an upper bound) each get ``new_tokens`` greedy tokens, in batches of :data:`GENERATE_BATCH`.
    ``resident_bytes``: other tensors alive on the GPU meanwhile (earlier models the notebook keeps).
    The remaining fields go to :func:`companion.memory.footprint` as they are.
    """

    label: str
    model: str
    method: str
    compute_dtype: str  # unquantised weights and activations, as footprint takes it
    batch_size: int = 1
    seq_len: int = 512
    steps: int = 0
    grad_accum: int = 1
    repeats: int = 1
    eval_batches: int = 0
    generate_calls: int = 0
    generate_rows: int = 0
    new_tokens: int = 0
    gradient_checkpointing: bool = False
    r: int = 8
    target_modules: tuple | str | None = None
    optimizer: str = "adamw"
    skip_modules: tuple | None = None
    resident_bytes: int = 0
    matmul_dtype: str | None = None  # dtype of the matrix products (None: compute_dtype)
    fp32_output_layer: bool = False  # the LM head multiplies in float32 (prepared 4-bit model, no autocast)
    master_weights: bool = False  # full fine-tuning of a 16-bit model keeps float32 master weights

    def report(self):
        """``companion.memory.footprint`` of one micro-batch of this run."""
        targets = self.target_modules
        if self.model in EXTRA_CONFIGS and isinstance(targets, tuple):
            targets = tuple(DEBERTA_TO_BERT.get(t, t) for t in targets)
        return footprint(model_config(self.model), self.method, r=self.r, target_modules=targets,
                         double_quant=self.method.startswith("qlora"), compute_dtype=self.compute_dtype,
                         skip_modules=None if self.skip_modules is None else list(self.skip_modules),
                         optimizer=self.optimizer, batch_size=self.batch_size, seq_len=self.seq_len,
                         gradient_checkpointing=self.gradient_checkpointing, master_weights=self.master_weights)

    def peak_bytes(self) -> int:
        """Training: footprint's total; otherwise the stored model; plus KV cache, eager attention, residents."""
        cfg, rep = model_config(self.model), self.report()
        wb = 4 if self.compute_dtype == "float32" else 2
        held = rep.total_bytes if self.steps else rep.weight_bytes + rep.adapter_bytes
        if self.steps and self.model in EAGER_ATTENTION:  # softmax + dropped-out copy + uint8 dropout mask
            held += (cfg["num_hidden_layers"] * self.batch_size * cfg["num_attention_heads"]
                     * self.seq_len ** 2 * (2 * wb + 1))
        if self.generate_calls:  # keys and values of every layer for one generate() batch
            kv_dim = cfg["hidden_size"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) \
                // cfg["num_attention_heads"]
            held += (min(self.generate_rows, GENERATE_BATCH) * (self.seq_len + self.new_tokens)
                     * cfg["num_hidden_layers"] * 2 * kv_dim * wb)
        return held + self.resident_bytes

    def seconds(self, gpu: GPU = T4, mfu: float = MFU, layer_pass_s: float = LAYER_PASS_S) -> float:
        """Estimated wall time of all repeats: per phase, the longer of compute and the launch floor."""
        cfg = model_config(self.model)
        layers, body, head = cfg["num_hidden_layers"], *matmul_params(self.model)
        matmul = self.matmul_dtype or self.compute_dtype
        # seconds per token of one forward pass F = 2N + 2 n_layer seq d_attn, the head at its own rate
        forward = ((2 * body + 2 * layers * self.seq_len * cfg["hidden_size"]) / gpu.tflops(matmul)
                   + 2 * head / gpu.tflops("float32" if self.fp32_output_layer else matmul)) / (mfu * 1e12)
        train_passes = (3 if self.method == "full" else 2) + self.gradient_checkpointing
        micro = self.steps * self.grad_accum
        generate_batches = self.generate_calls * math.ceil(self.generate_rows / GENERATE_BATCH)
        phases = [  # (compute seconds, eager passes through every layer)
            (micro * self.batch_size * self.seq_len * train_passes * forward,
             micro * (3 + self.gradient_checkpointing)),
            (self.eval_batches * self.batch_size * self.seq_len * forward, self.eval_batches),
            (self.generate_calls * self.generate_rows * (self.seq_len + self.new_tokens) * forward,
             generate_batches * (1 + self.new_tokens)),
        ]
        return self.repeats * sum(max(compute, passes * layers * layer_pass_s) for compute, passes in phases)


@dataclass(frozen=True)
class Estimate:
    """Peak GPU memory (decimal GB) and minutes of a list of runs, and whether they fit ``gpu``'s budget."""

    peak_gb: float
    minutes: float
    gpu: GPU = T4

    @property
    def fits(self) -> bool:
        return self.peak_gb <= self.gpu.usable_gb and self.minutes <= BUDGET_MINUTES

    def line(self, label: str = "gpu defaults") -> str:
        """One line for a notebook's header or output, e.g. ``T4 estimate (gpu defaults): peak 9.8 GB, 24 min``;
        over budget it says so and by what."""
        minutes = "under 1 min" if self.minutes < 1 else f"{self.minutes:.0f} min"
        text = f"T4 estimate ({label}): peak {self.peak_gb:.1f} GB, {minutes}"
        if not self.fits:
            text += (f" -- over the T4 budget of {self.gpu.usable_gb:.0f} GB and {BUDGET_MINUTES:.0f} min: "
                     "fine on a larger GPU, or lower the steps, batch or model in the parameters cell")
        return text


def estimate(runs: list[Run], gpu: GPU = T4, mfu: float = MFU, layer_pass_s: float = LAYER_PASS_S) -> Estimate:
    """Peak over the runs (they run one after another) and total time; ``ValueError`` on an empty plan."""
    if not runs:
        raise ValueError("estimate() needs at least one Run; a notebook without GPU work has nothing to estimate")
    peak = max(run.peak_bytes() for run in runs)
    seconds = sum(run.seconds(gpu, mfu, layer_pass_s) for run in runs)
    return Estimate(peak_gb=peak / 1e9, minutes=seconds / 60, gpu=gpu)
