"""Chapter 7 exercises: the notebook's solutions pass, classic mistakes fail, references are right."""

import random
import warnings

import pytest

from companion.exercises import ch07
from exercise_helpers import assert_passes, assert_rejected, solutions

SOL = solutions(7)


# --- 7.1 fits_on_card ----------------------------------------------------------------------------------------

def fits_gib(total_bytes, gpu_memory_gb):  # the card's GB read as GiB
    return total_bytes <= 0.9 * gpu_memory_gb * 2**30


def fits_whole_card(total_bytes, gpu_memory_gb):  # no allowance for the CUDA context and fragmentation
    return total_bytes <= gpu_memory_gb * 1e9


def fits_strictly_below(total_bytes, gpu_memory_gb):  # a footprint exactly at the limit refused
    return total_bytes < 0.9 * gpu_memory_gb * 1e9


def fits_rounded_gb(total_bytes, gpu_memory_gb):  # the footprint rounded to 0.1 GB first
    return round(total_bytes / 1e9, 1) <= 0.9 * gpu_memory_gb


# --- 7.2 choose_method (companion.memory is allowed here; only companion.select is graded against) ----------

def _choose(gpu_memory_gb, model, priority, *, usable=0.9, checkpointing=True, adalora_r=12, four_bit_adalora=True):
    from companion.memory import PUBLISHED_CONFIGS, footprint

    encoder = PUBLISHED_CONFIGS[model]["model_type"] in ("bert", "roberta")

    def fits(method):
        quantized, svd = method.startswith("qlora"), method.endswith("adalora")
        total = footprint(model, method, r=adalora_r if svd else 8, target_modules="all-linear",
                          double_quant=quantized, optimizer="paged_adamw_32bit" if quantized else "adamw",
                          skip_modules=["classifier"] if quantized and encoder else None,
                          gradient_checkpointing=checkpointing).total_bytes
        return total <= usable * gpu_memory_gb * 1e9

    if fits("lora"):
        return {"speed": "lora", "memory": "qlora"}.get(priority) or ("adalora" if fits("adalora") else "lora")
    if not fits("qlora"):
        return "none"
    return "qlora-adalora" if priority == "accuracy" and four_bit_adalora and fits("qlora-adalora") else "qlora"


def choose_without_checkpointing(gpu_memory_gb, model, priority):
    return _choose(gpu_memory_gb, model, priority, checkpointing=False)


def choose_whole_card(gpu_memory_gb, model, priority):
    return _choose(gpu_memory_gb, model, priority, usable=1.0)


def choose_adalora_at_target_r(gpu_memory_gb, model, priority):  # masking does not shrink the tensors
    return _choose(gpu_memory_gb, model, priority, adalora_r=8)


def choose_no_adalora_on_4bit(gpu_memory_gb, model, priority):  # the 4-bit branch always answers QLoRA
    return _choose(gpu_memory_gb, model, priority, four_bit_adalora=False)


def choose_ignores_priority(gpu_memory_gb, model, priority):  # always the most accurate method that fits
    return _choose(gpu_memory_gb, model, "accuracy")


# --- 7.3 adapter_memory_bytes --------------------------------------------------------------------------------

def _adapter(config, method, r, *, gqa=True, importance=12, ranknum=4, lm_head=False, weight_bytes=4):
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    q = heads * head_dim
    kv = (config.get("num_key_value_heads") or heads) * head_dim if gqa else q
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    svd = method.endswith("adalora")
    params = layers * sum(r * (a + b) + (r if svd else 0) for a, b in shapes)
    if lm_head:
        params += r * (h + config["vocab_size"]) + (r if svd else 0)
    per_param = 2 * weight_bytes + 8 + (importance if svd else 0)
    return params * per_param + (ranknum * len(shapes) * layers if svd else 0)


def adapter_ignores_gqa(config, method, r):  # k and v taken as hidden_size x hidden_size
    return _adapter(config, method, r, gqa=False)


def adapter_without_importance(config, method, r):  # AdaLoRA's ipt, exp_avg_ipt, exp_avg_unc forgotten
    return _adapter(config, method, r, importance=0)


def adapter_without_ranknum(config, method, r):
    return _adapter(config, method, r, ranknum=0)


def adapter_on_lm_head(config, method, r):  # "all-linear" does not adapt the output layer
    return _adapter(config, method, r, lm_head=True)


def adapter_in_bf16(config, method, r):  # PEFT keeps the adapter in fp32 (autocast_adapter_dtype=True)
    return _adapter(config, method, r, weight_bytes=2)


WRONG = {
    "ch07.fits_on_card": [fits_gib, fits_whole_card, fits_strictly_below, fits_rounded_gb],
    "ch07.choose_method": [choose_without_checkpointing, choose_whole_card, choose_adalora_at_target_r,
                           choose_no_adalora_on_4bit, choose_ignores_priority],
    "ch07.adapter_memory_bytes": [adapter_ignores_gqa, adapter_without_importance, adapter_without_ranknum,
                                  adapter_on_lm_head, adapter_in_bf16],
}


@pytest.mark.parametrize("name", ["fits_on_card", "choose_method", "adapter_memory_bytes"])
def test_the_notebook_solution_passes(name):
    assert_passes(f"ch07.{name}", SOL[name])


@pytest.mark.parametrize("exercise_id,fn", [(k, f) for k, fns in WRONG.items() for f in fns],
                         ids=lambda v: getattr(v, "__name__", v))
def test_a_classic_mistake_fails_with_a_helpful_message(exercise_id, fn):
    assert_rejected(exercise_id, fn)


def test_calling_companion_select_is_reported():
    def choose_via_recommend(gpu_memory_gb, model, priority):
        from companion.select import recommend

        return recommend(gpu_memory_gb, model, priority=priority).method

    def fits_via_memory_module(total_bytes, gpu_memory_gb):  # fits_on_card forbids all of the companion
        from companion.memory import gb

        gb(total_bytes)
        return total_bytes <= 0.9 * gpu_memory_gb * 1e9

    def adapter_via_footprint(config, method, r):
        return ch07.reference_adapter_memory_bytes(config, method, r)

    assert_rejected("ch07.choose_method", choose_via_recommend, status="uses_reference")
    assert_rejected("ch07.fits_on_card", fits_via_memory_module, status="uses_reference")
    assert_rejected("ch07.adapter_memory_bytes", adapter_via_footprint, status="uses_reference")


def test_fits_on_card_is_the_rule_recommend_applies():
    from companion.select import recommend

    for card, model in ch07.SCENARIOS + ((16, "llama-2-7b"),):
        rec = recommend(card, model)
        for method, fact in (("lora", "lora_fits"), ("qlora", "qlora_fits")):
            assert ch07.reference_fits_on_card(ch07._total(model, method), card) == rec.facts[fact], (card, model)


def test_the_recipe_helper_is_what_recommend_computes():
    for model in ("llama-2-7b", "qwen2.5-0.5b", "roberta-base"):
        for method, r in (("lora", 8), ("adalora", 12), ("qlora", 8), ("qlora-adalora", 12)):
            assert ch07._recipe_bytes(model, method, r) == ch07._total(model, method), (model, method)


def test_the_chapter_scenarios_give_the_chapter_answers():
    answers = {(24, "llama-2-7b"): "adalora", (16, "qwen2.5-1.5b"): "adalora", (80, "llama-2-13b"): "adalora",
               (48, "llama-65b"): "qlora-adalora", (24, "llama-2-70b"): "none"}
    for (card, model), method in answers.items():
        assert ch07.reference_choose_method(card, model, "accuracy") == method
    assert ch07.reference_choose_method(16, "llama-2-7b", "accuracy") == "lora"  # the erratum's 16 GB card


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_adapter_bytes_match_the_parameters_peft_trains(method):
    """PEFT's trainable parameters on a real (tiny, GQA) Llama, times 4 + 4 + 8 (+ 12) bytes, plus ranknum."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, vocab_size=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    r = 3
    config = (LoraConfig(r=r, target_modules="all-linear") if method == "lora" else
              AdaLoraConfig(init_r=r, target_r=2, target_modules="all-linear", total_step=10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
    params = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and "ranknum" not in n)
    matrices = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    expected = params * (16 if method == "lora" else 28) + (4 * matrices if method == "adalora" else 0)
    assert ch07.reference_adapter_memory_bytes(cfg, method, r) == expected
    assert matrices == 7 * cfg["num_hidden_layers"]  # lm_head is not adapted by "all-linear"


def test_fits_cases_on_the_limit_are_unambiguous():
    for seed in range(5):
        for case in ch07._fits_cases(random.Random(seed)):
            assert ch07._unambiguous(*case.args), case.note
