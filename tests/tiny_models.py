"""Tiny in-code models shared by several test files (pytest puts tests/ on sys.path)."""

import torch
from transformers import BertConfig, BertForSequenceClassification


def tiny_bert(seed=0):
    """A 2-layer, 16-wide BERT classifier with random weights: AdaLoRA targets in seconds."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16))
