"""The steps of a 4-bit fine-tune (Chapter 5) that are more than one library call.

The pipeline, with the library call that does each step::

    load in 4 bit     AutoModelForCausalLM.from_pretrained(..., quantization_config=bnb_4bit_config(...))
    inspect           linear_layers(model)  ->  LoraConfig(target_modules=[...] or "all-linear")
    prepare + LoRA    peft.prepare_model_for_kbit_training(model); peft.get_peft_model(model, lora_config)
    train             companion.train.train (any optimizer) or transformers.Trainer (optim="paged_adamw_8bit")
    generate          generate(model, tokenizer, examples)
    save / reload     save_adapter(model, directory); load_adapter(base, directory)
    merge             merge_adapter(base_16bit, directory)

:func:`bnb_4bit_config` writes the QLoRA paper's storage/compute split (NF4 + double quantization,
16-bit compute; Dettmers et al. 2023 §3) explicitly, because transformers' defaults are FP4, no
double quantization and float32 compute. The base weights stay frozen: bitsandbytes'
``MatMul4Bit.backward`` returns no gradient for them, and only the adapter is saved.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import torch

from .data import InstructionExample, encode_prompt, exact_match


def bnb_4bit_config(compute_dtype: torch.dtype = torch.bfloat16, *, quant_type: str = "nf4",
                    double_quant: bool = True, skip_modules: list[str] | None = None):
    """``BitsAndBytesConfig`` for QLoRA: 4-bit ``quant_type`` storage, ``compute_dtype`` matmuls.

    ``compute_dtype``: ``torch.bfloat16`` on Ampere and newer, ``torch.float16`` on a T4 or V100
    (no bf16 hardware). ``skip_modules`` becomes ``llm_int8_skip_modules`` and *replaces*
    transformers' default list, so name the head yourself (``"lm_head"``, ``"classifier"``).
    """
    from transformers import BitsAndBytesConfig

    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' (QLoRA) or 'fp4', got {quant_type!r}")
    if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"compute_dtype must be torch.bfloat16, torch.float16 or torch.float32, got {compute_dtype}")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=skip_modules)


def keep_dequantize_kernel_on_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """Make every bitsandbytes ``Linear4bit`` of ``model`` compute with the dequantize-then-matmul path
    it trains with, on any CPU. Returns ``model`` (changed in place); calling it again changes nothing.

    On a CPU with AVX512-BF16, ``Linear4bit.forward`` (bitsandbytes 0.50) repacks the stored weight
    in place the first time it runs on a CPU input in eval mode without gradients (``torch.no_grad``,
    ``inference_mode``, ``generate``): double quantization is undone, ``absmax`` is rounded to
    bfloat16, ``out_features`` must be divisible by 32 (else ``AssertionError: N must be divisible
    by block_n``) and the numbers depend on the CPU. This clears each module's
    ``support_avx512bf16_for_cpu`` (read only in that forward, so the setting survives ``.to()``,
    ``eval()`` and PEFT wrapping), and puts weights that were already repacked back into the
    standard layout with bitsandbytes' own inverse (what ``Linear4bit`` does before saving), with a
    warning, because their ``absmax`` stays rounded. GPU models are not affected.

    The companion's 4-bit loaders (``measure.load_in_4bit``, ``models.load_hub_model``), ``generate``,
    ``load_adapter`` and the bench tasks call this themselves.
    """
    restored = []
    for name, module in model.named_modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes.nn.Linear4bit and subclasses
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            restored.append(name)
    if restored:
        warnings.warn(f"{len(restored)} 4-bit layers (e.g. {restored[0]!r}) had already been repacked by bitsandbytes' "
                      "AVX512-BF16 CPU path (the model ran in eval mode without gradients before); their standard "
                      "layout is restored but absmax stays rounded to bfloat16. Reload the model for the exact "
                      "weights.", stacklevel=2)
    return model


def linear_layers(model: torch.nn.Module) -> pd.DataFrame:
    """One row per kind of linear layer (the last part of its name): how many there are, their class
    (``Linear4bit`` when bitsandbytes quantized them), shape and weight dtype. ``nn.Linear`` and its
    subclasses count, and so does transformers' ``Conv1D`` (GPT-2), as in PEFT's ``"all-linear"``. This
    is what to look at before choosing ``LoraConfig(target_modules=...)``."""
    from transformers.pytorch_utils import Conv1D

    rows: dict[str, dict] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):  # bitsandbytes' Linear4bit subclasses nn.Linear
            d_in, d_out = module.in_features, module.out_features
        elif isinstance(module, Conv1D):  # GPT-2's linear layers: weight (in, out); PEFT's all-linear takes them
            d_in, d_out = module.weight.shape
        else:
            continue
        leaf = name.rsplit(".", 1)[-1]
        row = rows.setdefault(leaf, {"count": 0, "class": type(module).__name__,
                                     "in_features": d_in, "out_features": d_out,
                                     "weight dtype": str(module.weight.dtype).removeprefix("torch."),
                                     "example": name})
        row["count"] += 1
    if not rows:
        raise ValueError(f"{type(model).__name__} has no nn.Linear (or Conv1D) layers to put LoRA on")
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("name")


def lora_target_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of every linear layer except the output embedding: QLoRA's ``find_all_linear_names``
    (artidoro/qlora), which is what ``target_modules="all-linear"`` resolves to in peft."""
    names = set(linear_layers(model).index)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if output is not None and module is output:
            names.discard(name.rsplit(".", 1)[-1])
    return sorted(names)


@torch.no_grad()
def generate(model, tokenizer, examples: list[InstructionExample], max_new_tokens: int = 32,
             batch_size: int = 64) -> list[str]:
    """Greedy completions of the prompts of ``examples`` (the course's prompt format), cut at EOS.

    Prompts are left-padded so that every row of a batch continues from its last prompt token.
    A bitsandbytes 4-bit model keeps its training-time kernel on a CPU (:func:`keep_dequantize_kernel_on_cpu`
    is applied to ``model``), so completions do not depend on whether the CPU has AVX512-BF16.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token first")
    keep_dequantize_kernel_on_cpu(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    completions = []
    for start in range(0, len(examples), batch_size):
        prompts = [encode_prompt(e, tokenizer) for e in examples[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):  # left padding: (batch, width)
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention_mask[i, width - len(p):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        completions += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return completions


def exact_match_table(examples: list[InstructionExample], predictions: list[str]) -> pd.Series:
    """Exact-match rate per task family (and ``"all"``), in percent."""
    if len(examples) != len(predictions):
        raise ValueError(f"got {len(examples)} examples but {len(predictions)} predictions")
    hits = pd.DataFrame({"family": [e.family for e in examples],
                         "hit": [exact_match(p, e) for p, e in zip(predictions, examples)]})
    table = hits.groupby("family")["hit"].mean() * 100
    table.loc["all"] = hits["hit"].mean() * 100
    return table.rename("exact match (%)")


def save_adapter(model, directory) -> pd.DataFrame:
    """Save only the adapter (``adapter_model.safetensors`` + ``adapter_config.json``) and list the files.

    Raises ``TypeError`` when ``model`` is not a ``peft.PeftModel`` (a transformers model's
    ``save_pretrained`` would write the whole base model instead).
    """
    if not hasattr(model, "peft_config"):
        raise TypeError(f"save_adapter needs a peft model (get_peft_model(base, config)), got {type(model).__name__}; "
                        "a plain model's save_pretrained would write the whole model, not an adapter")
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    files = sorted(p for p in directory.iterdir() if p.is_file())
    return pd.DataFrame({"bytes": [p.stat().st_size for p in files]}, index=[p.name for p in files])


def _name_or_path(model) -> str | None:
    """What PEFT writes as ``base_model_name_or_path`` for ``model`` (``None`` for a model built from a config)."""
    return (model.__dict__.get("name_or_path") or getattr(getattr(model, "config", None), "_name_or_path", None)
            or None)


def _same_model(a: str, b: str) -> bool:
    return a == b or (Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve())


def _key_prefixes(stored: str, expected: list[str]) -> str:
    """An adapter key, the model key nearest to it (longest common dotted suffix) and the part where they differ,
    e.g. ``'model.'`` vs ``''`` after ``'base_model.model.'`` for a ``LlamaForCausalLM`` adapter on a ``LlamaModel``."""
    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n
    if not expected:
        return f"the adapter's keys look like {stored!r}, this model expects no adapter tensors"
    parts = stored.split(".")
    best = max(expected, key=lambda k: common(parts[::-1], k.split(".")[::-1]))
    other = best.split(".")
    head = common(parts, other)
    tail = common(parts[head:][::-1], other[head:][::-1])
    said = f"the adapter's keys look like {stored!r}, this model's like {best!r}"
    if head or tail:
        a, b = (".".join(x[head:len(x) - tail]) for x in (parts, other))
        where = f"after {'.'.join(parts[:head]) + '.'!r}" if head else "at the start"
        said += f" ({where} the adapter has {a + '.' if a else ''!r}, the model {b + '.' if b else ''!r})"
    return said


def _check_loaded(model, base_class: str, directory: Path, config: dict, base_name: str | None):
    """Count the stored adapter tensors that found a parameter (PEFT's ``load_state_dict(strict=False)`` only warns
    about missing ones); raise when none did, warn when some did not or the base has another name."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    key_mapping = getattr(model.get_base_model(), "_checkpoint_conversion_mapping", None) or None
    if key_mapping is None and (directory / "adapter_model.safetensors").exists():
        from safetensors import safe_open

        with safe_open(directory / "adapter_model.safetensors", framework="pt") as f:  # names only, no tensors
            stored = set(f.keys())
    else:  # PEFT's own reading, with the key renaming that from_pretrained applies
        stored = set(load_peft_weights(str(directory), device="cpu", key_mapping=key_mapping))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "could not identify embedding layers": irrelevant to a key count
        # the keys save_adapter would write for this model, i.e. the names each stored tensor must have
        expected = set(get_peft_model_state_dict(model, save_embedding_layers=True))
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(model.peft_config["default"].peft_type, "")
    adapter_keys = sorted(k for k in stored if prefix in k)
    loaded = [k for k in adapter_keys if k in expected]
    trained_on = config.get("base_model_name_or_path")
    trained_class = (config.get("auto_mapping") or {}).get("base_model_class")
    names = (f"the adapter was trained on {trained_class or 'a model'} {trained_on or '(no name_or_path)'}, this "
             f"base is a {base_class} {base_name or '(no name_or_path)'}")
    if adapter_keys and not loaded:
        model.unload()  # leave the caller's base as it was
        raise ValueError(
            f"The adapter in {directory} loaded 0 of its {len(adapter_keys)} tensors onto this {base_class}, so it "
            f"would do nothing: {_key_prefixes(adapter_keys[0], sorted(k for k in expected if prefix in k))}; "
            f"{names}. Load the adapter onto the model class and checkpoint it was trained on.")
    unexpected = sorted(set(stored) - expected)
    missing = sorted(k for k in expected if prefix in k and k not in stored)
    if unexpected or missing:
        warnings.warn(f"The adapter in {directory} loaded {len(loaded)} of its {len(adapter_keys)} adapter tensors "
                      f"onto this {base_class}: {len(unexpected)} stored tensors match no parameter "
                      f"{unexpected[:4]}, {len(missing)} adapter parameters got no stored tensor and keep their "
                      f"initialisation {missing[:4]}; {names}.", stacklevel=3)
    elif trained_on and base_name and not _same_model(trained_on, base_name):
        warnings.warn(f"The adapter in {directory} loaded fully, but {names}: check that it is the same checkpoint "
                      "(an adapter is only meaningful on the weights it was trained with).", stacklevel=3)


def load_adapter(base, directory, *, is_trainable: bool = False):
    """``peft.PeftModel.from_pretrained(base, directory)``, checked for what PEFT lets through.

    PEFT loads with ``load_state_dict(strict=False)`` and only warns about missing keys, so an adapter
    whose keys match no layer (e.g. one trained on ``LlamaForCausalLM`` loaded onto a ``LlamaModel``)
    loads as a no-op. Here: 0 of the stored adapter tensors loaded -> ``ValueError`` naming the
    directory, the base class and the keys on each side (``base`` is left unchanged); some stored
    tensors unused or some adapter parameters not in the file -> ``UserWarning`` listing them;
    ``base_model_name_or_path`` in ``adapter_config.json`` differs from ``base.name_or_path`` ->
    ``UserWarning`` naming both, or in the ``ValueError`` when the shapes disagree too (PEFT's size
    mismatch). A 4-bit model comes back with :func:`keep_dequantize_kernel_on_cpu` applied.
    """
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").exists():
        raise FileNotFoundError(f"no adapter_config.json in {directory}; save the adapter with save_adapter first")
    config = json.loads((directory / "adapter_config.json").read_text())
    base_class, base_name = type(base).__name__, _name_or_path(base)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Found missing adapter keys")  # counted by _check_loaded
            model = PeftModel.from_pretrained(base, directory, is_trainable=is_trainable)
    except (RuntimeError, ValueError) as err:
        trained_on = (config.get("base_model_name_or_path")
                      or (config.get("auto_mapping") or {}).get("base_model_class", "unknown"))
        targets = sorted({str(t).rsplit(".", 1)[-1] for t in config.get("target_modules") or []})
        said = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])[:400]
        raise ValueError(
            f"The adapter in {directory} does not fit this {base_class} ({base_name or 'no name_or_path'}). "
            f"peft says: {said} ... "
            f"An adapter only loads onto the base model it was trained on (here: {trained_on}; adapted layers "
            f"{targets}): load that base model, with the same config, and try again, "
            "or train a new adapter for this one.") from err
    _check_loaded(model, base_class, directory, config, base_name)
    return keep_dequantize_kernel_on_cpu(model)


def merge_adapter(base_16bit, directory):
    """Load the adapter onto a **16-bit** copy of the base and fold it in: ``W <- W + (alpha / r) B A``.

    Returns a plain transformers model without peft layers, for inference; the adapter is checked as in
    :func:`load_adapter` (``ValueError`` when none of its tensors fits this base). Merging into the 4-bit
    model instead would dequantize, add and re-quantize every weight (peft warns about rounding
    errors), so load the base in 16 bit for this step (peft#638, peft#1043).
    """
    if any(getattr(p, "quant_state", None) is not None for p in base_16bit.parameters()):
        raise ValueError("merge_adapter needs the base model in 16 bit; load it without quantization_config "
                         "(dtype=torch.bfloat16 or torch.float16)")
    return load_adapter(base_16bit, directory).merge_and_unload()
