import pytest
import torch

from companion import models


@pytest.fixture(scope="module")
def encoder():
    return models.load_minilm_encoder()


def test_minilm_is_the_pretrained_all_minilm_l6_v2(encoder):
    model, tokenizer = encoder
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (384, 6, 12)
    assert tokenizer.vocab_size == 30522
    assert sum(p.numel() for p in model.parameters()) == 22_713_216


def test_sentence_embeddings_match_sentence_transformers(encoder):
    from sentence_transformers import SentenceTransformer

    sentences = ["The soup was not bad at all.", "Great screen but the battery dies fast.", "ok"]
    ours = models.encode_sentences(*encoder, sentences)
    reference = SentenceTransformer(str(models.minilm_path()), device="cpu").encode(
        sentences, convert_to_tensor=True)
    assert ours.shape == (3, 384)
    torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=1e-5)


def test_pretrained_encoder_places_paraphrases_closer_than_unrelated_sentences(encoder):
    e = models.encode_sentences(*encoder, ["A man is playing a guitar.",
                                           "Someone plays the guitar.", "The stock market fell today."])
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


def test_classifier_head_is_new_and_seeded_encoder_is_pretrained(encoder):
    a, _ = models.load_minilm_classifier(num_labels=3, seed=1)
    b, _ = models.load_minilm_classifier(num_labels=3, seed=1)
    c, _ = models.load_minilm_classifier(num_labels=3, seed=2)
    assert a.classifier.out_features == 3
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    torch.testing.assert_close(a.bert.embeddings.word_embeddings.weight,
                               encoder[0].embeddings.word_embeddings.weight, atol=0, rtol=0)


def test_classifier_needs_two_labels():
    with pytest.raises(ValueError, match="num_labels must be >= 2"):
        models.load_minilm_classifier(num_labels=1)


def test_char_tokenizer_round_trips_text_with_newlines():
    tok = models.char_tokenizer()
    text = "### Instruction:\nAdd 12 and 30.\n\n### Response:\n42"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.pad_token_id == 0 and len(tok) == 100


def test_tiny_llama_uses_grouped_query_attention_and_is_seeded():
    cfg = models.tiny_llama_config()
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    m1, m2 = models.build_tiny_llama(seed=5), models.build_tiny_llama(seed=5)
    attn = m1.model.layers[0].self_attn
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert attn.k_proj.out_features == cfg.num_key_value_heads * head_dim
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    ids = torch.tensor([[1, 10, 20, 30]])
    out = m1(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, 4, cfg.vocab_size) and torch.isfinite(out.loss)


def test_tiny_llama_config_accepts_overrides():
    assert models.tiny_llama_config(num_hidden_layers=3).num_hidden_layers == 3


def test_hub_names_resolve_and_bad_task_is_refused():
    assert models.resolve_hub_name("qwen2.5-0.5b") == "Qwen/Qwen2.5-0.5B"
    assert models.resolve_hub_name("org/custom") == "org/custom"
    with pytest.raises(ValueError, match="task must be one of"):
        models.load_hub_model("qwen2.5-0.5b", task="translation")


def test_hub_model_offline_says_why_it_cannot_load(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1 is set"):
        models.load_hub_model("companion-tests/model-that-is-not-cached")
