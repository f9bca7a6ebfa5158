"""Turn generated examples into tensors: classification batches and masked causal-LM batches.

Batches are dicts of tensors (``input_ids``, ``attention_mask``, ``labels``) that a Hugging
Face model takes as keyword arguments, which is what :func:`companion.train.train` expects.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.data import DataLoader, Dataset

from .instructions import InstructionExample, format_prompt
from .sentiment import SentimentExample, make_sentiment_splits

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss skips these positions


class TensorDictDataset(Dataset):
    """Rows of a dict of equally long tensors; the default collate stacks them back into a dict."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"all tensors need the same first dimension, got {lengths}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: t[i] for k, t in self.tensors.items()}


def _some(items: list) -> str:
    """The first five of ``items``, for a warning."""
    return ", ".join(map(str, items[:5])) + (", ..." if len(items) > 5 else "")


def encode_sentiment(examples: list[SentimentExample], tokenizer,
                     max_length: int = 64) -> dict[str, torch.Tensor]:
    """Tokenize a split for sequence classification, padded to its longest sentence.

    Returns ``input_ids`` and ``attention_mask`` of shape (N, T), T <= ``max_length``, and
    ``labels`` of shape (N,). Examples with ``text_pair`` (MNLI) are encoded as pairs. Longer
    examples are truncated (the tokenizer's ``"longest_first"``: a pair loses tokens from its
    longer side), with a warning that counts them.
    """
    if not examples:
        raise ValueError("encode_sentiment got no examples; pass a non-empty split")
    pairs = [e.text_pair for e in examples]
    if any(p is None for p in pairs) and any(p is not None for p in pairs):
        raise ValueError("either every example has a text_pair or none has; got a mix")
    texts, pairs = [e.text for e in examples], None if pairs[0] is None else pairs
    lengths = [len(ids) for ids in tokenizer(texts, pairs, return_attention_mask=False)["input_ids"]]
    cut = [i for i, n in enumerate(lengths) if n > max_length]
    if cut:
        warnings.warn(f"encode_sentiment: truncated {len(cut)} of {len(examples)} examples to max_length={max_length} "
                      f"tokens (example {_some(cut)}; the longest has {max(lengths)}); raise max_length to keep them "
                      "whole", stacklevel=2)
    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([e.label for e in examples], dtype=torch.long)}


def sentiment_dataloaders(tokenizer, batch_size: int = 32, seed: int = 0, max_length: int = 64,
                          splits: dict[str, list[SentimentExample]] | None = None,
                          **split_sizes) -> dict[str, DataLoader]:
    """DataLoaders over ``splits`` (default: :func:`make_sentiment_splits` with ``split_sizes``,
    ``n_train`` ...; the ``gpu`` profile passes GLUE records from :func:`load_glue`).

    Only train is shuffled, by a ``torch.Generator`` seeded with ``seed``: the same seed gives
    the same batches in the same order.
    """
    if splits is None:
        splits = make_sentiment_splits(seed=seed, **split_sizes)
    elif split_sizes:
        raise ValueError(f"pass either splits or split sizes, not both (got {sorted(split_sizes)})")
    generator = torch.Generator().manual_seed(seed)
    return {name: DataLoader(TensorDictDataset(encode_sentiment(examples, tokenizer, max_length)),
                             batch_size=batch_size, shuffle=name == "train",
                             generator=generator if name == "train" else None)
            for name, examples in splits.items()}


def _token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(example: InstructionExample, tokenizer) -> list[int]:
    """Token ids of the prompt alone (with BOS when the tokenizer has one), for generation."""
    bos = getattr(tokenizer, "bos_token_id", None)
    prompt = _token_ids(tokenizer, format_prompt(example, include_output=False))
    return ([bos] if bos is not None else []) + prompt


def encode_instructions(examples: list[InstructionExample], tokenizer,
                        max_length: int = 192) -> dict[str, torch.Tensor]:
    """Tokenize for causal-LM fine-tuning with the loss on the response only.

    Each row is ``[BOS] prompt response [EOS]`` (BOS/EOS when the tokenizer has them), right-padded
    with ``pad_token_id`` to the longest row. ``labels`` copy ``input_ids`` except on the prompt and
    the padding, which are -100. As in Stanford Alpaca's ``preprocess``, the prompt length comes from
    tokenizing the prompt alone, which assumes the full text's tokens start with the prompt's (true
    when the prompt ends in a newline, as :func:`format_prompt`'s does). Shapes: (N', T) for all
    three tensors, T <= ``max_length``, N' <= N (see below). The default ``max_length`` fits every
    generated example with a character-level tokenizer.

    Rows longer than ``max_length`` tokens are handled as TRL's ``SFTTrainer`` handles them
    (``truncation_mode="keep_start"``; trl 1.16 ``SFTTrainer._prepare_dataset``): a row keeps its first
    ``max_length`` tokens, so a long response loses its end and its EOS; a row left without a single
    response token (its prompt alone fills ``max_length``, e.g. a long Alpaca input) is dropped, as it
    would add no loss. Either change is reported in one warning with its count and example indices.
    Raises ``ValueError`` when every example would be dropped, when ``max_length`` < 2, or when the
    tokenizer has no pad token.
    """
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("the tokenizer has no pad token (pad_token_id is None); set one first, "
                         "e.g. tokenizer.pad_token = tokenizer.eos_token")
    if not examples:
        raise ValueError("encode_instructions got no examples; pass a non-empty list")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError("max_length must be an integer >= 2 (a prompt token and a response token), "
                         f"got {max_length!r}")
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    rows, masks, dropped, truncated = [], [], {}, []
    for i, example in enumerate(examples):
        prompt = encode_prompt(example, tokenizer)
        full = (([bos] if bos is not None else []) + _token_ids(tokenizer, format_prompt(example))
                + ([eos] if eos is not None else []))
        if len(prompt) >= min(len(full), max_length):  # no response token left to put the loss on
            dropped[i] = len(prompt)
            continue
        truncated += [i] if len(full) > max_length else []
        rows.append(full[:max_length])
        masks.append(len(prompt))
    if not rows:
        raise ValueError(f"no example keeps a response token within max_length={max_length}: the prompts take "
                         f"{min(dropped.values())} to {max(dropped.values())} tokens; raise max_length")
    if dropped or truncated:
        done = ([f"dropped {len(dropped)} whose prompt leaves no response token (example "
                 f"{_some([f'{i}: {n}-token prompt' for i, n in dropped.items()])})"] if dropped else [])
        done += ([f"cut the response of {len(truncated)} (example {_some(truncated)}: their end and EOS are not "
                  "trained)"] if truncated else [])
        warnings.warn(f"encode_instructions: {len(dropped) + len(truncated)} of {len(examples)} examples do not fit "
                      f"max_length={max_length} tokens; {' and '.join(done)}, as TRL's SFTTrainer does. Raise "
                      "max_length to keep them whole.", stacklevel=2)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(zip(rows, masks)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, n_prompt: len(ids)] = input_ids[i, n_prompt: len(ids)]  # response (+ EOS)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
