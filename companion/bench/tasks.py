"""The tasks the comparison harness runs every method on: one model loader, one data set, one metric.

A :class:`Task` is everything that is *not* the method: how to load the base model (in 16/32 bit or
in 4-bit NF4 with double quantization), the data loaders, the accuracy metric, and which layers an
adapter goes on. Keeping it separate is what makes the comparison fair: every arm gets the same task
object, the same seeds and the same batches.

- :func:`sentiment_task` -- ``ci``: pretrained all-MiniLM-L6-v2 on the course's generated negation
  sentiment task (held-out words and templates in the test split). ``gpu``: RoBERTa-base or
  DeBERTaV3-base on GLUE SST-2 or MNLI.
- :func:`instruction_task` -- a causal LM on the course's generated instruction families, scored by
  exact match of greedy completions (``gpu``: Qwen2.5-0.5B or TinyLlama-1.1B; ``ci``: a tiny Llama,
  for tests only -- it knows nothing before training).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from ..adalora.ablation import BERT_MATRICES
from ..data import (TensorDictDataset, encode_instructions, load_glue, make_instruction_splits,
                    sentiment_dataloaders)
from ..models import build_tiny_llama, char_tokenizer, load_hub_model, load_minilm_classifier, resolve_hub_name
from ..profiles import Profile
from ..qlora import bnb_4bit_config, exact_match_table, generate
from ..train import classification_accuracy

LLAMA_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEBERTA_MATRICES = ("query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
                    "output.dense")
GLUE_LABELS = {"sst2": 2, "mnli": 3}
ENCODERS = ("deberta-v3-base", "roberta-base")
CAUSAL_LMS = ("qwen2.5-0.5b", "tinyllama-1.1b")
TASK_MODELS = {"sst2": ENCODERS, "mnli": ENCODERS, "instructions": CAUSAL_LMS}  # the first is the task's default


def task_model(task: str, model: str | None = None) -> str:
    """The ``gpu`` profile's model for ``task`` (``"sst2"``, ``"mnli"`` or ``"instructions"``): ``model``,
    or the task's default when ``None`` (DeBERTaV3-base, the AdaLoRA paper's GLUE backbone; Qwen2.5-0.5B
    for the instruction families). Raises ``ValueError`` for an unknown task or a model that does not fit it
    (a classifier encoder cannot generate instructions; a causal LM has no GLUE head here)."""
    if task not in TASK_MODELS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASK_MODELS)}")
    if model is None:
        return TASK_MODELS[task][0]
    if model not in TASK_MODELS[task]:
        fits = [t for t, models in TASK_MODELS.items() if model in models]
        raise ValueError(f"model {model!r} does not fit task {task!r}: use one of {list(TASK_MODELS[task])}, or "
                         f"None for {TASK_MODELS[task][0]!r}" + (f" ({model!r} runs the tasks {fits})" if fits else ""))
    return model


@dataclass
class Task:
    """What every arm of the comparison shares.

    ``load_model(seed, quantized)`` returns a fresh base model on ``device`` (classification heads
    initialised from ``seed``); ``evaluate(model, split)`` returns accuracy in [0, 1].
    """

    name: str
    description: str
    load_model: Callable[[int, bool], nn.Module]
    loaders: dict[str, DataLoader]
    evaluate: Callable[[nn.Module, str], float]
    target_modules: tuple[str, ...]
    trainable_modules: tuple[str, ...]
    device: torch.device

    def __post_init__(self):
        missing = {"train", "validation", "test"} - set(self.loaders)
        if missing:
            raise ValueError(f"task {self.name!r} needs train, validation and test loaders; missing {sorted(missing)}")


def trim_padding(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Collate right-padded rows and cut the batch to its longest sequence (dynamic padding, as
    ``transformers.DataCollatorWithPadding``): (B, T_split) -> (B, T_batch). A split is padded to its longest
    sentence; most batches are shorter, and the padded positions are masked, so they cost time and change
    nothing else. Raises ``ValueError`` for left-padded rows, which the cut would shorten."""
    batch = default_collate(rows)
    longest = int(batch["attention_mask"].sum(dim=1).max())
    if batch["attention_mask"][:, longest:].any():
        raise ValueError("trim_padding needs right-padded rows (tokenizer.padding_side = 'right'); these have "
                         "padding before their tokens")
    return {k: v[:, :longest] if v.dim() == 2 else v for k, v in batch.items()}


def _dynamic_padding(loaders: dict[str, DataLoader]) -> dict[str, DataLoader]:
    return {name: DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=name == "train",
                             generator=loader.generator, collate_fn=trim_padding) for name, loader in loaders.items()}


def _to_4bit(model: nn.Module, compute_dtype: torch.dtype, skip_modules: list[str] | None = None) -> nn.Module:
    """A model built in code, reloaded with NF4 + double-quantized weights (``ci`` profile stand-in for a hub load);
    ``load_in_4bit`` keeps bitsandbytes' CPU kernel the training-time one."""
    from ..measure import load_in_4bit

    return load_in_4bit(model, compute_dtype=compute_dtype, skip_modules=skip_modules)


def _device_map(profile) -> dict:
    """``device_map`` for ``from_pretrained``: the whole model on the profile's device (GPU index 0 when unset)."""
    return {"": profile.device.index or 0} if profile.device.type == "cuda" else {"": profile.device.type}


def sentiment_task(profile: Profile, *, model: str = "deberta-v3-base", glue_task: str = "sst2",
                   batch_size: int = 16, max_length: int = 32, n_train: int = 1000, n_validation: int = 200,
                   n_test: int = 200, n_glue_test: int = 2000, n_glue_validation: int = 1000) -> Task:
    """Sequence classification. ``ci``: MiniLM on generated data (``model``/``glue_task`` unused).
    ``gpu``: ``model`` (``"roberta-base"`` or ``"deberta-v3-base"``) on GLUE ``glue_task``; GLUE's test
    labels are hidden, so the last ``n_glue_test`` training records are held out as the test split, and the
    validation split is GLUE's first ``n_glue_validation`` validation records (all 872 of SST-2; MNLI-m has
    9,815, which evaluated every ``eval_every`` steps would cost more than the training)."""
    if profile.is_ci:
        tokenizer = load_minilm_classifier(num_labels=2)[1]
        loaders = _dynamic_padding(sentiment_dataloaders(tokenizer, batch_size=batch_size, seed=profile.seed,
                                                         max_length=max_length, n_train=n_train,
                                                         n_validation=n_validation, n_test=n_test))

        def load(seed: int, quantized: bool) -> nn.Module:
            base = load_minilm_classifier(num_labels=2, seed=seed)[0]
            # the new head stays out of 4 bit, or it could not be trained (the list replaces the defaults)
            return (_to_4bit(base, profile.dtype, ["classifier"]) if quantized else base).to(profile.device)

        return Task("negation-sentiment", "all-MiniLM-L6-v2 (22.7M parameters) on the course's generated "
                    "negation sentiment task", load, loaders, _accuracy(loaders), BERT_MATRICES, ("classifier",),
                    profile.device)

    if glue_task not in GLUE_LABELS:
        raise ValueError(f"glue_task must be one of {sorted(GLUE_LABELS)}, got {glue_task!r}")
    if model not in ("roberta-base", "deberta-v3-base"):
        raise ValueError(f"model must be 'roberta-base' or 'deberta-v3-base' for the sentiment task, got {model!r}")
    num_labels = GLUE_LABELS[glue_task]
    train = load_glue(glue_task, "train")
    validation = load_glue(glue_task, "validation_matched" if glue_task == "mnli" else "validation")
    splits = {"train": train[:-n_glue_test], "validation": validation[:n_glue_validation], "test": train[-n_glue_test:]}
    tokenizer = load_hub_model(model, task="seq-cls", num_labels=num_labels)[1]
    loaders = _dynamic_padding(sentiment_dataloaders(tokenizer, batch_size=batch_size, seed=profile.seed,
                                                     max_length=max_length, splits=splits))
    head = ("classifier", "pooler") if model == "deberta-v3-base" else ("classifier",)
    targets = DEBERTA_MATRICES if model == "deberta-v3-base" else BERT_MATRICES

    def load(seed: int, quantized: bool) -> nn.Module:
        torch.manual_seed(seed)
        kwargs = dict(num_labels=num_labels, device_map=_device_map(profile))
        if quantized:
            kwargs.update(quantization_config=bnb_4bit_config(profile.dtype, skip_modules=list(head)),
                          dtype=profile.dtype)
        return load_hub_model(model, task="seq-cls", **kwargs)[0]

    return Task(f"{glue_task}-{model}", f"{resolve_hub_name(model)} on GLUE {glue_task.upper()}", load, loaders,
                _accuracy(loaders), targets, head, profile.device)


def _accuracy(loaders: dict[str, DataLoader]) -> Callable[[nn.Module, str], float]:
    return lambda model, split: classification_accuracy(model, loaders[split])


def instruction_task(profile: Profile, *, model: str = "qwen2.5-0.5b", families: list[str] | None = None,
                     batch_size: int = 16, n_train: int = 2000, n_test: int = 120, max_length: int = 192,
                     max_new_tokens: int = 24) -> Task:
    """Causal-LM instruction tuning on generated families, accuracy = exact match of greedy completions.
    Validation and test are two disjoint held-out sets of the same families."""
    families = families or ["count_letters", "number_to_words"]
    if not profile.is_ci and model in ENCODERS:
        raise ValueError(f"{model!r} is a classifier encoder and cannot generate the instruction task's answers; "
                         f"use a causal LM, one of {list(CAUSAL_LMS)} (task_model('instructions') picks the default)")
    if profile.is_ci:
        tokenizer = char_tokenizer()
    else:
        tokenizer = load_hub_model(model)[1]
    split = make_instruction_splits(seed=profile.seed, n_train=n_train, n_test=2 * n_test, families=families)
    held_out = {"validation": split["test"][:n_test], "test": split["test"][n_test:]}
    train_data = TensorDictDataset(encode_instructions(split["train"], tokenizer, max_length=max_length))
    loaders = {"train": DataLoader(train_data, batch_size=batch_size, shuffle=True,
                                   generator=torch.Generator().manual_seed(profile.seed)),
               **{name: DataLoader(examples, batch_size=64, collate_fn=list) for name, examples in held_out.items()}}

    def load(seed: int, quantized: bool) -> nn.Module:
        if profile.is_ci:
            base = build_tiny_llama(seed=seed)
            return (_to_4bit(base, profile.dtype) if quantized else base).to(profile.device)
        kwargs = dict(dtype=profile.dtype, device_map=_device_map(profile))
        if quantized:
            kwargs["quantization_config"] = bnb_4bit_config(profile.dtype)
        return load_hub_model(model, **kwargs)[0]

    def evaluate(m: nn.Module, split_name: str) -> float:
        examples = held_out[split_name]
        return exact_match_table(examples, generate(m, tokenizer, examples, max_new_tokens))["all"] / 100

    name = "tiny-llama" if profile.is_ci else resolve_hub_name(model)
    return Task(f"instructions-{name}", f"{name} on the generated instruction families {families}", load, loaders,
                evaluate, LLAMA_MATRICES, (), profile.device)
