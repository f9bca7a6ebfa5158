"""What each notebook's ``gpu`` profile runs, as :class:`companion.budget.Run` lists, and its T4 estimate.

``plan(notebook, **params)`` takes the notebook's parameters-cell names (``MAX_STEPS=...``): every one the
plan reads (no defaults here, so a plan cannot drift from the notebook's; others such as ``PROFILE`` are
ignored), with derived defaults (``MAX_STEPS = None`` -> 2000 on a GPU) resolved as the notebook's second
code cell resolves them. Each plan follows the notebook's ``gpu``
branch: models and dtypes as loaded (``load_hub_model`` without ``dtype=`` gives float32; a 4-bit model
after ``prepare_model_for_kbit_training`` keeps its other weights and activations in float32), batches as
padded (an upper bound: ``max_length``), and the models a notebook keeps alive while the next one trains.
``notebook_estimate`` and ``estimate_line`` are what notebooks, ``scripts/t4_budget.py`` and
``tests/test_t4_budget.py`` call; :func:`notebook_parameters` reads a notebook's defaults.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from pathlib import Path

from .budget import Estimate, Run, estimate

SST2_VALIDATION = 872  # GLUE SST-2 validation examples
GLUE_VALIDATION = {"sst2": SST2_VALIDATION, "mnli": 9815}  # mnli: validation_matched
ALPACA_TEST = 100  # ch05: the last 100 Alpaca records are held out
BERT_TARGETS = ("query", "key", "value", "output.dense", "intermediate.dense")
DEBERTA_TARGETS = ("query_proj", "key_proj", "value_proj", "output.dense", "intermediate.dense")
PLANS = {}


def _plan(function):
    PLANS[function.__name__] = function
    return function


def _stored(run: Run, copies: int = 1, optimizer: bool = False) -> int:
    """Bytes of ``copies`` more models like ``run``'s kept alive: weights, adapter (and optimizer state)."""
    rep = run.report()
    return copies * (rep.weight_bytes + rep.adapter_bytes + (rep.optimizer_bytes if optimizer else 0))


def _evals(steps: int, every: int) -> int:
    """How often companion.train.train evaluates: every ``every`` steps and after the last."""
    return steps // every + (steps % every != 0)


@_plan
def ch01_memory_wall(**_):
    return [Run("Qwen2.5-0.5B loaded in NF4, weights measured", "qwen2.5-0.5b", "qlora", "float16")]


@_plan
def ch01_lora_gradients(*, R, MAX_STEPS, BATCH_SIZE, **_):
    return [Run("LoRA on RoBERTa-base, SST-2", "roberta-base", "lora", "float32", BATCH_SIZE, 64, MAX_STEPS, r=R,
                target_modules=("query", "value"),
                eval_batches=_evals(MAX_STEPS, 100) * math.ceil(SST2_VALIDATION / BATCH_SIZE))]


@_plan
def ch02_adalora_theory(*, INIT_R, MAX_STEPS, BATCH_SIZE, **_):
    return [Run("AdaLoRA (companion) on DeBERTaV3-base, SST-2", "deberta-v3-base", "adalora", "float32", BATCH_SIZE,
                64, MAX_STEPS or 2000, r=INIT_R, target_modules=DEBERTA_TARGETS,
                eval_batches=math.ceil(SST2_VALIDATION / BATCH_SIZE))]


@_plan
def ch03_adalora_practice(*, INIT_R, MAX_STEPS, BATCH_SIZE, **_):
    run = Run("AdaLoRA, PEFT then companion, DeBERTaV3-base", "deberta-v3-base", "adalora", "float32", BATCH_SIZE, 64,
              MAX_STEPS or 3000, r=INIT_R, target_modules=DEBERTA_TARGETS, repeats=2,
              eval_batches=math.ceil(SST2_VALIDATION / BATCH_SIZE))
    return [Run(**{**run.__dict__, "resident_bytes": _stored(run)})]  # the first model stays while the second trains


@_plan
def ch03_adalora_ablation(*, SEEDS, MAX_STEPS, BATCH_SIZE, **_):
    batch = BATCH_SIZE or 16
    common = dict(model="deberta-v3-base", compute_dtype="float32", batch_size=batch, seq_len=64,
                  steps=MAX_STEPS or 400, target_modules=DEBERTA_TARGETS,
                  eval_batches=math.ceil(SST2_VALIDATION / batch))
    return [Run("five AdaLoRA arms x seeds", method="adalora", r=6, repeats=5 * len(SEEDS), **common),
            Run("LoRA arm x seeds, and once at the AdaLoRA rate", method="lora", r=4, repeats=len(SEEDS) + 1, **common)]


@_plan
def ch04_nf4_double_quant(**_):
    return [Run("Qwen2.5-0.5B in float32, its weights quantised one by one", "qwen2.5-0.5b", "full", "float32")]


@_plan
def ch04_paged_optimizers(*, SHORT_LEN, LONG_LEN, LONG_EVERY, STEPS, BATCH_SIZE, **_):
    n_long = STEPS // LONG_EVERY
    first = Run("", "ch04-paged-llama", "full", "float32")
    kept = _stored(first, 3)  # the reference weights, the sweep's last model, the AdamW run's model
    common = dict(model="ch04-paged-llama", method="full", compute_dtype="float32", batch_size=BATCH_SIZE,
                  gradient_checkpointing=True, repeats=2, resident_bytes=kept)
    return [Run(f"{LONG_LEN}-token steps, AdamW and PagedAdamW", seq_len=LONG_LEN, steps=n_long, **common),
            Run(f"{SHORT_LEN}-token steps and the warm-up", seq_len=SHORT_LEN, steps=STEPS - n_long + 1, **common)]


@_plan
def ch05_qlora_setup(*, MODEL, CLASSIFIER, R, CLS_STEPS, **_):
    llm = Run(f"{MODEL} in NF4, prepared for k-bit training", MODEL, "qlora", "float32", r=R,
              target_modules="all-linear")
    classifier = Run(f"{CLASSIFIER} in NF4: LoRA on query, value + head, SST-2", CLASSIFIER, "qlora", "float32", 32, 64,
                     CLS_STEPS, r=8, target_modules=("query", "value"), skip_modules=("classifier",),
                     matmul_dtype="float16", eval_batches=2 * math.ceil(SST2_VALIDATION / 32),
                     resident_bytes=_stored(llm))
    return [llm, classifier]


@_plan
def ch05_qlora_finetune(*, MODEL, QLORA_STEPS, BATCH_SIZE, R, **_):
    steps, accum = QLORA_STEPS or 100, 4  # gpu: MICRO_BATCH = BATCH_SIZE // 4, GRAD_ACCUM = 4
    # prepared 4-bit model: float32 outside the 4-bit layers; Alpaca rows padded to max_length 512 at most
    common = dict(model=MODEL, method="qlora", compute_dtype="float32", batch_size=BATCH_SIZE // accum, seq_len=512,
                  r=R, target_modules="all-linear", gradient_checkpointing=True, matmul_dtype="float16",
                  generate_rows=ALPACA_TEST, new_tokens=128)
    run_a = Run("run A: SFTTrainer, fp16 autocast, paged 8-bit AdamW", steps=steps, grad_accum=accum,
                optimizer="paged_adamw_8bit", generate_calls=2, **common)
    kept = _stored(run_a, optimizer=True)  # model A and its trainer stay until the adapter is saved
    run_b = Run("run B: companion loop (no autocast), PagedAdamW", steps=steps, grad_accum=accum,
                fp32_output_layer=True, generate_calls=1, resident_bytes=kept, **common)
    table = Run("memory table: a warm-up and a measured step, four optimizers", steps=8, fp32_output_layer=True,
                resident_bytes=2 * kept, **common)
    merge = Run("reload the adapter; merge into 16-bit and dequantised bases", MODEL, "full", "float16", seq_len=512,
                generate_calls=3, generate_rows=ALPACA_TEST, new_tokens=128,
                resident_bytes=2 * _stored(run_a) + _stored(Run("", MODEL, "full", "float16")))
    return [run_a, run_b, table, merge]


@_plan
def ch06_comparison(*, SEEDS, MAX_STEPS, GPU_TASK, GPU_MODEL, **_):
    from .bench import gpu_config, task_model  # the notebook's own gpu choices

    model, config = task_model(GPU_TASK, GPU_MODEL), gpu_config(GPU_TASK, seeds=SEEDS, max_steps=MAX_STEPS or 300)
    evals = _evals(config.max_steps, config.eval_every)
    common = dict(model=model, steps=config.max_steps, repeats=len(config.seeds))
    if GPU_TASK == "instructions":  # instruction_task(batch_size=8): rows padded to max_length 192 at most
        common.update(batch_size=8, seq_len=192, target_modules="all-linear", generate_calls=evals + 1,
                      generate_rows=120, new_tokens=24)
        dtypes = {m: dict(compute_dtype="float32", matmul_dtype="float16", fp32_output_layer=True)
                  if m.startswith("qlora") else dict(compute_dtype="float16") for m in config.methods}
    else:  # sentiment_task: batch 32; validation every eval_every steps, the 2,000 held-out records at the end
        common.update(batch_size=32, seq_len=64 if GPU_TASK == "sst2" else 128,
                      eval_batches=evals * math.ceil(GLUE_VALIDATION[GPU_TASK] / 32) + math.ceil(2000 / 32),
                      target_modules=DEBERTA_TARGETS if model == "deberta-v3-base" else BERT_TARGETS,
                      skip_modules=("classifier", "pooler"))
        dtypes = {m: dict(compute_dtype="float32", matmul_dtype="float16") if m.startswith("qlora")
                  else dict(compute_dtype="float32") for m in config.methods}
    return [Run(f"{method} x {len(config.seeds)} seeds", method=method,
                r=config.init_r if method.endswith("adalora") else config.r,
                master_weights=method == "full" and dtypes[method]["compute_dtype"] != "float32",
                **dtypes[method], **common) for method in config.methods]


@_plan
def ch07_selection(*, STEPS, PISSA_SEEDS, **_):
    steps, seeds = STEPS or 300, len(PISSA_SEEDS or (0, 1, 2))
    common = dict(model="all-minilm-l6-v2", compute_dtype="float32", batch_size=16, seq_len=32, steps=steps,
                  target_modules=BERT_TARGETS, eval_batches=2 * math.ceil(200 / 16))
    return [Run("stage 1 QLoRA and the QLoRA control", method="qlora", r=4, skip_modules=("classifier",), repeats=2,
                **common),
            Run("stage 2 AdaLoRA after migration", method="qlora-adalora", r=6, skip_modules=("classifier",), **common),
            Run("LoRA and PiSSA, two scalings x seeds", method="lora", r=4, repeats=4 * seeds, **common)]


@_plan
def ch07_multi_gpu(*, STEPS, GLOBAL_BATCH, GPU_MODEL, **_):
    # A T4 runtime has one GPU: torchrun starts one rank (FSDP with nothing to shard), then the one-process
    # reference loads the same 4-bit model again; float32 compute (no bfloat16 on a T4), sequences of 64 tokens.
    return [Run(f"FSDP QLoRA on {GPU_MODEL} (one rank on a T4) and the one-process reference", GPU_MODEL, "qlora",
                "float32", batch_size=GLOBAL_BATCH, seq_len=64, steps=STEPS, repeats=2, gradient_checkpointing=True,
                target_modules="all-linear")]


def plan(notebook: str, **params) -> list[Run]:
    """The runs of ``notebook``'s ``gpu`` profile (name without ``.ipynb``) for these parameters."""
    if notebook not in PLANS:
        raise ValueError(f"no T4 plan for notebook {notebook!r}; plans exist for {sorted(PLANS)}")
    return PLANS[notebook](**params)


def notebook_estimate(notebook: str, **params) -> Estimate:
    """:func:`companion.budget.estimate` of :func:`plan`."""
    return estimate(plan(notebook, **params))


def estimate_line(notebook: str, label: str = "gpu defaults", **params) -> str:
    """The line a notebook prints in its ``gpu`` branch and its header states for the defaults."""
    return notebook_estimate(notebook, **params).line(label)


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.Pow: operator.pow, ast.FloorDiv: operator.floordiv}


def _value(node: ast.expr):
    """A literal, or arithmetic on literals (``64 * 1024``, ``1 / 8``, ``2**20``)."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_value(node.left), _value(node.right))
    return ast.literal_eval(node)


def notebook_parameters(path) -> dict:
    """The assignments of the notebook's papermill ``parameters`` cell, evaluated without running it."""
    cells = json.loads(Path(path).read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{path}: expected one cell tagged 'parameters', found {len(tagged)}")
    tree = ast.parse("".join(tagged[0]["source"]))
    return {node.targets[0].id: _value(node.value) for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
