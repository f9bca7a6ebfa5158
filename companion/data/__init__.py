"""Generated datasets for the course: a sentiment task and an instruction task.

- :mod:`companion.data.sentiment`    -- sentences labelled through negation, contrast, degree
- :mod:`companion.data.instructions` -- Alpaca-style tasks checked by exact match
- :mod:`companion.data.tokenize`     -- examples to dicts of tensors and DataLoaders

None of them imports ``datasets``; only :func:`load_glue` and :func:`load_alpaca` (``gpu``
profile) do, when called.
"""

from .instructions import (FAMILIES, FAMILY_NAMES, InstructionExample, exact_match,
                           format_prompt, from_alpaca_record, is_held_out, load_alpaca,
                           make_instruction_dataset, make_instruction_splits, number_to_words)
from .sentiment import (LABEL_NAMES, PHENOMENA, PHENOMENON_SHARES, TEMPLATES, SentimentExample,
                        compose, from_glue_record, label_for, load_glue, make_sentiment_splits)
from .tokenize import (IGNORE_INDEX, TensorDictDataset, encode_instructions, encode_prompt,
                       encode_sentiment, sentiment_dataloaders)

__all__ = [
    "FAMILIES", "FAMILY_NAMES", "IGNORE_INDEX", "InstructionExample", "LABEL_NAMES", "PHENOMENA",
    "PHENOMENON_SHARES", "SentimentExample", "TEMPLATES", "TensorDictDataset", "compose",
    "encode_instructions", "encode_prompt", "encode_sentiment", "exact_match", "format_prompt",
    "from_alpaca_record", "from_glue_record", "is_held_out", "label_for", "load_alpaca",
    "load_glue", "make_instruction_dataset", "make_instruction_splits", "make_sentiment_splits",
    "number_to_words", "sentiment_dataloaders",
]
