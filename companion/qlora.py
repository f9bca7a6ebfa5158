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
    """Make bitsandbytes' ``Linear4bit`` use the same dequantize-then-matmul path in eval mode on a CPU.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight in place for a faster
    kernel the first time it runs in eval mode without gradients: that rewrites the stored weight
    (double quantization is undone), needs ``out_features`` divisible by 32, and gives other
    numbers than the training-time path, so results would depend on the CPU. This switches the
    repacking off; GPU models are not affected.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def linear_layers(model: torch.nn.Module) -> pd.DataFrame:
    """One row per kind of linear layer (the last part of its name): how many there are, their class
    (``Linear4bit`` when bitsandbytes quantized them), shape and weight dtype. This is what to look
    at before choosing ``LoraConfig(target_modules=...)``."""
    rows: dict[str, dict] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):  # bitsandbytes' Linear4bit subclasses nn.Linear
            continue
        leaf = name.rsplit(".", 1)[-1]
        row = rows.setdefault(leaf, {"count": 0, "class": type(module).__name__,
                                     "in_features": module.in_features, "out_features": module.out_features,
                                     "weight dtype": str(module.weight.dtype).removeprefix("torch."),
                                     "example": name})
        row["count"] += 1
    if not rows:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to put LoRA on")
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
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token first")
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
    """Save only the adapter (``adapter_model.safetensors`` + ``adapter_config.json``) and list the files."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    files = sorted(p for p in directory.iterdir() if p.is_file())
    return pd.DataFrame({"bytes": [p.stat().st_size for p in files]}, index=[p.name for p in files])


def load_adapter(base, directory, *, is_trainable: bool = False):
    """``peft.PeftModel.from_pretrained(base, directory)``, with a hint when the adapter was trained on
    another base model (peft then fails with a size mismatch or with no matching target modules)."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").exists():
        raise FileNotFoundError(f"no adapter_config.json in {directory}; save the adapter with save_adapter first")
    try:
        return PeftModel.from_pretrained(base, directory, is_trainable=is_trainable)
    except (RuntimeError, ValueError) as err:
        config = json.loads((directory / "adapter_config.json").read_text())
        trained_on = (config.get("base_model_name_or_path")
                      or (config.get("auto_mapping") or {}).get("base_model_class", "unknown"))
        targets = sorted({str(t).rsplit(".", 1)[-1] for t in config.get("target_modules") or []})
        said = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])[:400]
        raise ValueError(
            f"The adapter in {directory} does not fit this {type(base).__name__}. peft says: {said} ... "
            f"An adapter only loads onto the base model it was trained on (here: {trained_on}; adapted layers "
            f"{targets}): load that base model, with the same config, and try again, "
            "or train a new adapter for this one.") from err


def merge_adapter(base_16bit, directory):
    """Load the adapter onto a **16-bit** copy of the base and fold it in: ``W <- W + (alpha / r) B A``.

    Returns a plain transformers model without peft layers, for inference. Merging into the 4-bit
    model instead would dequantize, add and re-quantize every weight (peft warns about rounding
    errors), so load the base in 16 bit for this step (peft#638, peft#1043).
    """
    if any(getattr(p, "quant_state", None) is not None for p in base_16bit.parameters()):
        raise ValueError("merge_adapter needs the base model in 16 bit; load it without quantization_config "
                         "(dtype=torch.bfloat16 or torch.float16)")
    return load_adapter(base_16bit, directory).merge_and_unload()
