"""Tiny in-code models shared by several test files (pytest puts tests/ on sys.path)."""

import torch
from transformers import BertConfig, BertForSequenceClassification


def tiny_bert(seed=0):
    """A 2-layer, 16-wide BERT classifier with random weights: AdaLoRA targets in seconds."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16))


def separable(n, seed):
    """Random tokens whose first token (1 or 2) is the label: a task :func:`tiny_bert` learns in a few steps."""
    from companion.data import TensorDictDataset

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids = torch.randint(5, 60, (n, 8), generator=g)  # (n, T), inside tiny_bert's 60-token vocabulary
    ids[:, 0] = 1 + labels
    return TensorDictDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
