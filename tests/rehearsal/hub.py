"""Stand-in hub checkpoints for the gpu-profile rehearsal: tiny, random, offline.

Each model of ``companion.models.HUB_MODELS`` is replaced by a checkpoint with the real repo id, the real
architecture class and the real tokenizer class *and file format*, written into a Hugging Face hub cache
(``models--ORG--NAME/snapshots/COMMIT/...`` with ``refs/main``), so that ``from_pretrained("Qwen/Qwen2.5-0.5B")``
with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing here takes the same code path as after a real download:

=================================  ========================  ==========================================
repo id                            model class (config)      tokenizer files, as the hub repo ships them
=================================  ========================  ==========================================
Qwen/Qwen2.5-0.5B                  Qwen2ForCausalLM, tied    tokenizer.json + vocab.json + merges.txt
TinyLlama/TinyLlama-1.1B-...-3T    LlamaForCausalLM          tokenizer.model (sentencepiece) + .json
meta-llama/Llama-2-7b-hf           LlamaForCausalLM          tokenizer.model (sentencepiece) + .json
FacebookAI/roberta-base            RobertaForMaskedLM        vocab.json + merges.txt (byte-level BPE)
microsoft/deberta-v3-base          DebertaV2ForMaskedLM      spm.model only: loading converts it, which
                                                             needs sentencepiece and protobuf
=================================  ========================  ==========================================

Weights are random (seeded); vocabularies are a few hundred tokens learned from :func:`corpus`. Nothing is
downloaded. The folder is rebuilt only when this file changes (a hash of it names the build).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
COMMIT = "0" * 40  # the snapshot name; any 40-hex string works offline

SPECIALS_BPE = {"qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]}


def corpus() -> list[str]:
    """English-like lines covering the words of the generated tasks and the stand-in GLUE/Alpaca tables."""
    from companion.data import instructions, sentiment

    lines = ["### Instruction:", "### Input:", "### Response:"]
    lines += [e.text for e in sentiment.make_sentiment_splits(seed=0, n_train=400, n_validation=10, n_test=10)["train"]]
    lines += [instructions.format_prompt(e) for e in instructions.make_instruction_dataset(n=400, seed=0)]
    lines += [" ".join(map(str, range(100))), "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()-"]
    return lines


def _byte_level_bpe(vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tok


def _sentencepiece(path: Path, vocab_size: int, model_type: str, ids: dict, symbols=()) -> Path:
    import sentencepiece as spm

    text = path.with_suffix(".txt")
    text.write_text("\n".join(corpus()))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, byte_fallback=model_type == "bpe", minloglevel=2, user_defined_symbols=list(symbols),
        **ids)
    text.unlink()
    return path.with_suffix(".model")


def _save_tokenizer(tokenizer, folder: Path, tokenizer_class: str, keep=None) -> None:
    tokenizer.save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = tokenizer_class
    cfg_path.write_text(json.dumps(cfg, indent=1))
    if keep is not None:
        for extra in folder.iterdir():
            if extra.name not in keep:
                extra.unlink()


def _qwen(folder: Path) -> int:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(600, SPECIALS_BPE["qwen"]),
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    _save_tokenizer(tok, folder, "Qwen2Tokenizer")
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(
        m if isinstance(m, str) else " ".join(m) for m in model["merges"]) + "\n")
    return len(tok)


def _roberta(folder: Path) -> int:
    from transformers import AutoTokenizer

    bpe = _byte_level_bpe(600, SPECIALS_BPE["roberta"])
    model = json.loads(bpe.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(
        m if isinstance(m, str) else " ".join(m) for m in model["merges"]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "RobertaTokenizer"}))
    return len(AutoTokenizer.from_pretrained(folder))


def _llama(folder: Path) -> int:
    from transformers import AutoTokenizer

    _sentencepiece(folder / "tokenizer.model", 400, "bpe", dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    tok = AutoTokenizer.from_pretrained(folder)  # converts tokenizer.model; the hub repo ships both files
    _save_tokenizer(tok, folder, "LlamaTokenizer")
    return len(tok)


def _deberta_v3(folder: Path) -> int:
    spm_file = _sentencepiece(folder / "spm.model", 400, "unigram",
                              dict(pad_id=0, pad_piece="[PAD]", bos_id=1, bos_piece="[CLS]", eos_id=2,
                                   eos_piece="[SEP]", unk_id=3, unk_piece="[UNK]"), symbols=["[MASK]"])
    spm_file.with_suffix(".vocab").unlink()
    # As microsoft/deberta-v3-base: no tokenizer.json, so transformers converts spm.model when loading.
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "DebertaV2Tokenizer", "do_lower_case": False, "vocab_type": "spm"}))
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(folder))


def _configs(vocab: int) -> dict:
    from transformers import DebertaV2Config, LlamaConfig, Qwen2Config, RobertaConfig

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    return {
        "qwen": Qwen2Config(vocab_size=vocab, num_key_value_heads=2, tie_word_embeddings=True,
                            max_position_embeddings=2048, bos_token_id=None, eos_token_id=0, **small),
        "llama": LlamaConfig(vocab_size=vocab, num_key_value_heads=4, max_position_embeddings=2048,
                             bos_token_id=1, eos_token_id=2, pad_token_id=None, **small),
        "roberta": RobertaConfig(vocab_size=vocab, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                                 bos_token_id=0, eos_token_id=2, **small),
        "deberta": DebertaV2Config(vocab_size=vocab, max_position_embeddings=512, relative_attention=True,
                                   position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
                                   pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
                                   position_biased_input=False, type_vocab_size=0, pad_token_id=0, **small),
    }


STANDINS = {  # repo id -> (tokenizer builder, config key, architecture class name)
    "Qwen/Qwen2.5-0.5B": (_qwen, "qwen", "Qwen2ForCausalLM"),
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": (_llama, "llama", "LlamaForCausalLM"),
    "meta-llama/Llama-2-7b-hf": (_llama, "llama", "LlamaForCausalLM"),
    "FacebookAI/roberta-base": (_roberta, "roberta", "RobertaForMaskedLM"),
    "microsoft/deberta-v3-base": (_deberta_v3, "deberta", "DebertaV2ForMaskedLM"),
}


def _build_one(repo_id: str, snapshot: Path) -> None:
    import transformers

    builder, key, arch = STANDINS[repo_id]
    snapshot.mkdir(parents=True)
    vocab = builder(snapshot)
    config = _configs(vocab)[key]
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config)
    model.save_pretrained(snapshot)  # config.json (architectures=[arch]) + model.safetensors


def build_hub_cache(root: Path) -> Path:
    """Write every stand-in into ``root/<hash>/hub`` (once) and return that hub cache folder."""
    stamp = hashlib.sha256(HERE.read_bytes()).hexdigest()[:12]
    hub = Path(root) / stamp / "hub"
    if (hub / ".complete").exists():
        return hub
    shutil.rmtree(hub, ignore_errors=True)
    for repo_id in STANDINS:
        repo = hub / ("models--" + repo_id.replace("/", "--"))
        _build_one(repo_id, repo / "snapshots" / COMMIT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
    (hub / ".complete").write_text("ok")
    return hub
