"""Model architectures as the memory accounting sees them: published configs and their parameter tensors.

:func:`_modules` lists, from a config alone, every module with parameters of a transformers model (llama,
mistral, qwen2 decoders; bert, roberta encoders), named and shaped as transformers builds it, in
``named_parameters`` order; :mod:`companion.memory` counts their bytes. :data:`PUBLISHED_CONFIGS` holds the
configs of the models the course sizes, copied from each model's ``config.json`` on the Hugging Face Hub.
"""

from __future__ import annotations

from dataclasses import dataclass

DECODERS = ("llama", "mistral", "qwen2")
ENCODERS = ("bert", "roberta")

# Published configs (each model's config.json on the Hugging Face Hub), as transformers config kwargs.
PUBLISHED_CONFIGS = {
    "llama-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False),
    "llama-13b": dict(model_type="llama", hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, intermediate_size=13824, vocab_size=32000, tie_word_embeddings=False),
    "llama-33b": dict(model_type="llama", hidden_size=6656, num_hidden_layers=60, num_attention_heads=52,
                      num_key_value_heads=52, intermediate_size=17920, vocab_size=32000, tie_word_embeddings=False),
    "llama-65b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=64, intermediate_size=22016, vocab_size=32000, tie_word_embeddings=False),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False),
    "llama-2-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=28672, vocab_size=32000, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, intermediate_size=13824, vocab_size=32000, tie_word_embeddings=False),
    "tinyllama-1.1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, intermediate_size=5632, vocab_size=32000, tie_word_embeddings=False),
    "bert-base-uncased": dict(model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072, vocab_size=30522, max_position_embeddings=512, type_vocab_size=2),
    "roberta-base": dict(model_type="roberta", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1),
    "roberta-large": dict(model_type="roberta", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          intermediate_size=4096, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1),
}


@dataclass(frozen=True)
class _Module:
    """A module with parameters, in ``named_parameters`` order; a Linear weight is (out, in), as in torch."""

    name: str
    kind: str  # "linear" | "embedding" | "norm"
    out: int
    in_: int = 1
    bias: bool = False
    tied: bool = False  # weight shared with the input embedding: no parameters of its own

    @property
    def tensors(self) -> tuple[int, ...]:
        """numel of each parameter tensor: weight, then bias."""
        return () if self.tied else (self.out * self.in_,) + ((self.out,) if self.bias else ())


def _as_dict(config) -> dict:
    if isinstance(config, str):
        if config not in PUBLISHED_CONFIGS:
            raise ValueError(f"unknown published config {config!r}; choose one of {sorted(PUBLISHED_CONFIGS)}")
        return dict(PUBLISHED_CONFIGS[config])
    cfg = dict(config) if isinstance(config, dict) else config.to_dict()
    if cfg.get("model_type") not in DECODERS + ENCODERS:
        raise ValueError(f"unsupported architecture model_type={cfg.get('model_type')!r}; "
                         f"supported: {sorted(DECODERS + ENCODERS)} or a name in {sorted(PUBLISHED_CONFIGS)}")
    return cfg


def _attention_dims(cfg: dict) -> tuple[int, int, int]:
    """(head_dim, q_dim, kv_dim); grouped-query attention shares kv heads: kv_dim = num_key_value_heads * head_dim."""
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return head_dim, heads * head_dim, (cfg.get("num_key_value_heads") or heads) * head_dim


def _modules(cfg: dict, head: str) -> list[_Module]:
    """Named as in transformers ``*ForCausalLM`` / ``*ForSequenceClassification`` / the bare ``*Model``."""
    mt, h, inter, vocab = cfg["model_type"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    labels, lin = len(cfg["id2label"]) if cfg.get("id2label") else cfg.get("num_labels", 2), "linear"
    if mt in DECODERS:
        _, q, kv = _attention_dims(cfg)
        qkv_b = mt == "qwen2" or (mt == "llama" and bool(cfg.get("attention_bias")))
        o_b = mt == "llama" and bool(cfg.get("attention_bias"))
        mlp_b = mt == "llama" and bool(cfg.get("mlp_bias"))
        p = "" if head == "none" else "model."
        mods = [_Module(f"{p}embed_tokens", "embedding", vocab, h)]
        for i in range(cfg["num_hidden_layers"]):
            a, m, n = f"{p}layers.{i}.self_attn.", f"{p}layers.{i}.mlp.", f"{p}layers.{i}."
            mods += [_Module(a + "q_proj", lin, q, h, qkv_b), _Module(a + "k_proj", lin, kv, h, qkv_b),
                     _Module(a + "v_proj", lin, kv, h, qkv_b), _Module(a + "o_proj", lin, h, q, o_b),
                     _Module(m + "gate_proj", lin, inter, h, mlp_b), _Module(m + "up_proj", lin, inter, h, mlp_b),
                     _Module(m + "down_proj", lin, h, inter, mlp_b),
                     _Module(n + "input_layernorm", "norm", h), _Module(n + "post_attention_layernorm", "norm", h)]
        mods.append(_Module(f"{p}norm", "norm", h))  # RMSNorm: weight only
        if head == "causal-lm":
            mods.append(_Module("lm_head", lin, vocab, h, tied=bool(cfg.get("tie_word_embeddings"))))
        elif head == "seq-cls":
            mods.append(_Module("score", lin, labels, h))
        return mods
    p, e = ("" if head == "none" else f"{mt}."), ("" if head == "none" else f"{mt}.") + "embeddings."
    mods = [_Module(e + "word_embeddings", "embedding", vocab, h),
            _Module(e + "position_embeddings", "embedding", cfg.get("max_position_embeddings", 512), h),
            _Module(e + "token_type_embeddings", "embedding", cfg.get("type_vocab_size", 2), h),
            _Module(e + "LayerNorm", "norm", h, bias=True)]
    for i in range(cfg["num_hidden_layers"]):
        b = f"{p}encoder.layer.{i}."
        mods += [_Module(b + f"attention.self.{n}", lin, h, h, True) for n in ("query", "key", "value")]
        mods += [_Module(b + "attention.output.dense", lin, h, h, True),
                 _Module(b + "attention.output.LayerNorm", "norm", h, bias=True),
                 _Module(b + "intermediate.dense", lin, inter, h, True),
                 _Module(b + "output.dense", lin, h, inter, True),
                 _Module(b + "output.LayerNorm", "norm", h, bias=True)]
    if head == "none" or mt == "bert":  # RobertaForSequenceClassification builds RobertaModel(add_pooling_layer=False)
        mods.append(_Module(f"{p}pooler.dense", lin, h, h, True))
    if head == "seq-cls":
        mods += ([_Module("classifier", lin, labels, h, True)] if mt == "bert" else
                 [_Module("classifier.dense", lin, h, h, True), _Module("classifier.out_proj", lin, labels, h, True)])
    return mods


def published_config(name: str):
    """The transformers config of a model in :data:`PUBLISHED_CONFIGS` (no download)."""
    from transformers import AutoConfig

    if name not in PUBLISHED_CONFIGS:
        raise ValueError(f"unknown model {name!r}; published configs: {sorted(PUBLISHED_CONFIGS)}")
    return AutoConfig.for_model(**PUBLISHED_CONFIGS[name])
