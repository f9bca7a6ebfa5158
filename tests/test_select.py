"""companion.select: the decision tree it draws, the decisions it makes, and footprint, all agree."""

import itertools
import math
import pathlib
import re

import pandas as pd
import pytest

from companion.memory import PUBLISHED_CONFIGS, footprint, published_config
from companion.select import LEAF_LABELS, USABLE_FRACTION, Tradeoffs, mermaid, recommend

FIGURE = pathlib.Path(__file__).resolve().parents[1] / "book" / "figures" / "selection_tree.mmd"
# the fact each question of the drawn tree reads, by node id
FACT_OF = {"N1": "lora_fits", "N2": "priority", "N3": "adalora_fits_and_gains", "N4": "qlora_fits",
           "N5": "priority", "N6": "qlora_adalora_fits_and_gains"}
GPUS = [4, 8, 12, 16, 24, 40, 48, 80]
MODELS = ["qwen2.5-0.5b", "qwen2.5-1.5b", "llama-2-7b", "llama-2-13b", "llama-65b", "llama-2-70b", "roberta-large"]
PRIORITIES = ["accuracy", "speed", "memory"]
BUDGET = 20_000_000  # at least rank 1 of AdaLoRA on every Linear of llama-2-70b (12.9M per rank)


def parse_mermaid(text: str) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, str]]]:
    """(questions id -> label, leaves id -> label, edges id -> {label: target}), read from the text alone."""
    lines = text.strip().splitlines()
    assert lines[0] == "flowchart TD"
    questions, leaves, edges = {}, {}, {}
    for line in lines[1:]:
        line = line.strip()
        if line.startswith("%%"):
            continue
        if m := re.fullmatch(r'(\w+)\{"([^"]*)"\}', line):
            questions[m[1]] = m[2]
        elif m := re.fullmatch(r'(\w+)\["([^"]*)"\]', line):
            leaves[m[1]] = m[2]
        elif m := re.fullmatch(r"(\w+) -->\|([^|]+)\| (\w+)", line):
            assert m[2] not in edges.setdefault(m[1], {}), f"two edges labelled {m[2]} leave {m[1]}"
            edges[m[1]][m[2]] = m[3]
        else:
            pytest.fail(f"unexpected mermaid line: {line!r}")
    return questions, leaves, edges


def walk_drawn_tree(text: str, facts: dict) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Follow the drawn edges from the root (the node nothing points to); returns (leaf label, path)."""
    questions, leaves, edges = parse_mermaid(text)
    (root,) = set(questions) - {t for out in edges.values() for t in out.values()}
    node, path = root, []
    while node in questions:
        fact = facts[FACT_OF[node]]
        answer = fact if isinstance(fact, str) else ("yes" if fact else "no")
        path.append((node, answer))
        node = edges[node][answer]
    return leaves[node], tuple(path)


def usable(gpu_gb: float) -> float:
    return USABLE_FRACTION * gpu_gb * 1e9


def total(model, method, *, r=None, checkpointing=True, seq_len=512, batch_size=1) -> int:
    """footprint as the brief defines the memory check, computed here independently of companion.select."""
    quantized = method.startswith("qlora")
    encoder = PUBLISHED_CONFIGS[model]["model_type"] == "roberta"
    r = r or (12 if method.endswith("adalora") else 8)
    kw = dict(double_quant=True, optimizer="paged_adamw_32bit",
              skip_modules=["classifier"] if encoder else None) if quantized else dict(optimizer="adamw")
    return footprint(model, method, r=r, target_modules="all-linear", compute_dtype="bfloat16",
                     batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=checkpointing, **kw).total_bytes


def smallest_rank(model) -> int:
    """min(out, in) of the smallest Linear an all-linear adapter wraps, from the published config alone: q, k, v,
    o, gate, up, down of a decoder (k and v are num_key_value_heads * head_dim wide), the four of an encoder."""
    cfg = PUBLISHED_CONFIGS[model] if isinstance(model, str) else model
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * h // cfg["num_attention_heads"]
    return min(h, i, kv)


GRID = list(itertools.product(GPUS, MODELS, PRIORITIES, [None, BUDGET], [512, 2048]))


@pytest.mark.parametrize("tradeoffs", [None, Tradeoffs(adalora_accuracy_gain=-0.5)], ids=["papers", "no-gain"])
def test_the_drawn_tree_and_recommend_reach_the_same_leaf_by_the_same_path_on_a_grid(tradeoffs):
    text = mermaid(tradeoffs)
    reached = set()
    for gpu_gb, model, priority, budget, seq_len in GRID:
        seq_len = min(seq_len, 512) if model == "roberta-large" else seq_len
        rec = recommend(gpu_gb, model, priority=priority, trainable_budget=budget, seq_len=seq_len,
                        tradeoffs=tradeoffs)
        label, path = walk_drawn_tree(text, rec.facts)
        assert label == LEAF_LABELS[rec.method], (gpu_gb, model, priority, budget, seq_len)
        assert path == rec.path
        assert len(rec.reasons) == len(rec.path)
        # the advice stays possible: ranks within every adapted matrix, every adapter below full fine-tuning
        assert rec.notes == () and max(rec.config.get("init_r", 0), rec.config.get("r", 0)) <= smallest_rank(model)
        assert all(gb < rec.footprint_gb["full"] for m, gb in rec.footprint_gb.items() if m != "full")
        reached.add(rec.method)
    papers = {"lora", "adalora", "qlora", "qlora-adalora", "none"}
    assert reached == (papers if tradeoffs is None else papers - {"adalora", "qlora-adalora"})


def test_the_tree_has_the_six_questions_and_five_leaves_with_the_documented_edges():
    questions, leaves, edges = parse_mermaid(mermaid())
    assert sorted(questions) == ["N1", "N2", "N3", "N4", "N5", "N6"]
    assert sorted(leaves.values()) == sorted(LEAF_LABELS.values())
    assert {n: sorted(e) for n, e in edges.items()} == {
        "N1": ["no", "yes"], "N2": ["accuracy", "memory", "speed"], "N3": ["no", "yes"],
        "N4": ["no", "yes"], "N5": ["accuracy", "memory", "speed"], "N6": ["no", "yes"]}
    assert leaves[edges["N4"]["no"]] == "Nothing fits on one card"


def test_a_negative_adalora_gain_is_drawn_in_the_adalora_questions_only():
    papers = mermaid().splitlines()
    measured = mermaid(Tradeoffs(adalora_accuracy_gain=-0.5)).splitlines()
    changed = [(a, b) for a, b in zip(papers, measured) if a != b]
    assert [b.split("{")[0].strip() for _, b in changed] == ["N3", "N6"]
    assert all("+0.97 points" in a and "-0.50 points" in b for a, b in changed)


def test_the_committed_figure_is_what_mermaid_generates():
    assert FIGURE.read_text() == mermaid()


def test_mermaid_labels_are_quoted_and_free_of_characters_that_break_the_parser():
    for line in mermaid().splitlines()[1:]:
        if m := re.search(r'[\[{]"(.*)"[\]}]', line):
            assert not re.search(r'["#{}\[\]|<>]', m[1]), line


@pytest.mark.parametrize("gpu_gb, model", [(24, "llama-2-7b"), (16, "qwen2.5-1.5b"), (48, "llama-65b"),
                                           (12, "llama-2-13b"), (4, "roberta-large")])
def test_fit_facts_are_footprint_against_the_usable_fraction_of_the_card(gpu_gb, model):
    rec = recommend(gpu_gb, model)
    fits = {m: total(model, m) <= usable(gpu_gb) for m in ("lora", "adalora", "qlora", "qlora-adalora")}
    assert rec.facts["lora_fits"] == fits["lora"]
    assert rec.facts["qlora_fits"] == fits["qlora"]
    assert rec.facts["adalora_fits_and_gains"] == fits["adalora"]  # the papers' gain is positive
    assert rec.facts["qlora_adalora_fits_and_gains"] == fits["qlora-adalora"]
    for method in fits:
        assert rec.footprint_gb[method] == total(model, method) / 1e9
    assert rec.footprint_gb["full"] == footprint(model, "full", gradient_checkpointing=True).total_bytes / 1e9


def test_rtx_4090_with_llama_2_7b_trains_16_bit_adalora_without_checkpointing_if_it_fits():
    lora, adalora = total("llama-2-7b", "lora"), total("llama-2-7b", "adalora")
    assert lora <= adalora <= usable(24)  # what the numbers imply
    rec = recommend(24, "llama-2-7b")
    assert rec.method == "adalora" and rec.path == (("N1", "yes"), ("N2", "accuracy"), ("N3", "yes"))
    assert rec.config["gradient_checkpointing"] == (total("llama-2-7b", "adalora", checkpointing=False) > usable(24))
    assert (rec.config["init_r"], rec.config["target_r"], rec.config["quantization"]) == (12, 8, None)
    assert f"{lora / 1e9:.2f} GB" in rec.reasons[0] and "21.60 GB are usable on this 24 GB card" in rec.reasons[0]
    assert f"{adalora / 1e9:.2f} GB" in rec.reasons[2] and "+0.97" in rec.reasons[2]
    assert recommend(24, "llama-2-7b", priority="speed").method == "lora"
    assert recommend(24, "llama-2-7b", priority="memory").method == "qlora"


def test_colab_t4_with_qwen2_5_1_5b_fits_every_adapter_method():
    assert total("qwen2.5-1.5b", "adalora") <= usable(16)
    rec = recommend(16, "qwen2.5-1.5b")
    assert rec.method == "adalora"
    assert {a.split(" also fits")[0] for a in rec.alternatives} == {LEAF_LABELS[m] for m in
                                                                     ("lora", "qlora", "qlora-adalora")}


def test_a100_80gb_with_llama_2_13b_fits_16_bit_adalora_but_not_full_finetuning():
    full = footprint("llama-2-13b", "full", gradient_checkpointing=True).total_bytes
    assert total("llama-2-13b", "adalora") <= usable(80) < full
    rec = recommend(80, "llama-2-13b")
    assert rec.method == "adalora" and f"{full / 1e9:.2f} GB" in rec.reasons[0]


def test_48gb_with_llama_65b_only_the_4_bit_methods_fit():
    assert total("llama-65b", "lora") > usable(48) >= total("llama-65b", "qlora-adalora")
    rec = recommend(48, "llama-65b")
    assert rec.method == "qlora-adalora"
    assert rec.path == (("N1", "no"), ("N4", "yes"), ("N5", "accuracy"), ("N6", "yes"))
    assert rec.config["quantization"] == "nf4+dq" and rec.config["optimizer"] == "paged_adamw_32bit"
    no_ckpt = total("llama-65b", "qlora-adalora", checkpointing=False)
    assert rec.config["gradient_checkpointing"] == (no_ckpt > usable(48))
    for priority in ("speed", "memory"):
        assert recommend(48, "llama-65b", priority=priority).method == "qlora"


def test_24gb_with_llama_2_70b_fits_nothing_and_says_what_would():
    qlora = total("llama-2-70b", "qlora")
    assert qlora > usable(24)
    rec = recommend(24, "llama-2-70b")
    assert rec.method == "none" and rec.config == {}
    card_gb = float(re.search(r"at least ([\d.]+) GB", rec.alternatives[0])[1])
    cards = int(re.search(r"over (\d+) cards", rec.alternatives[1])[1])
    assert card_gb * 1e9 >= qlora / USABLE_FRACTION and card_gb - 0.1 < qlora / USABLE_FRACTION / 1e9
    assert cards == math.ceil(qlora / usable(24)) >= 2
    fitting = [n for n, c in PUBLISHED_CONFIGS.items() if c["model_type"] != "roberta"
               and c["model_type"] != "bert" and total(n, "qlora") <= usable(24)]
    largest = max(fitting, key=lambda n: footprint(n, "full").total_params)
    assert f"is {largest} " in rec.alternatives[2]


def test_trainable_budget_sets_lora_r_and_adalora_init_and_target_r():
    per_rank = footprint("llama-2-7b", "lora", r=1, target_modules="all-linear").adapter_params
    per_rank_svd = footprint("llama-2-7b", "adalora", r=1, target_modules="all-linear").adapter_params
    budget = 5 * per_rank_svd + 123
    lora = recommend(24, "llama-2-7b", trainable_budget=budget, priority="speed").config
    adalora = recommend(24, "llama-2-7b", trainable_budget=budget).config
    assert lora["r"] == budget // per_rank
    assert adalora["target_r"] == budget // per_rank_svd == 5 and adalora["init_r"] == math.ceil(1.5 * 5)
    ranks = [recommend(80, "llama-2-7b", trainable_budget=b).config["target_r"] for b in
             range(per_rank_svd, 40 * per_rank_svd, 3 * per_rank_svd // 2)]
    assert ranks == sorted(ranks) and ranks[-1] > ranks[0]


def test_adalora_memory_is_checked_at_init_r():
    budget = 40 * footprint("llama-2-7b", "adalora", r=1, target_modules="all-linear").adapter_params
    rec = recommend(24, "llama-2-7b", trainable_budget=budget)
    assert rec.footprint_gb["adalora"] == total("llama-2-7b", "adalora", r=60) / 1e9  # ceil(1.5 * 40)


def test_gradient_checkpointing_is_switched_on_only_when_needed():
    flags = set()
    for gpu_gb in (24, 32, 40, 80):
        rec = recommend(gpu_gb, "llama-2-7b", priority="speed", seq_len=2048)
        assert rec.method == "lora"
        needed = total("llama-2-7b", "lora", seq_len=2048, checkpointing=False) > usable(gpu_gb)
        assert rec.config["gradient_checkpointing"] == needed
        flags.add(needed)
    assert flags == {True, False}  # both cases are exercised


def test_models_can_be_given_as_config_dicts_and_transformers_configs():
    expected = recommend(24, "llama-2-7b")
    for model in (dict(PUBLISHED_CONFIGS["llama-2-7b"]), published_config("llama-2-7b")):
        rec = recommend(24, model)
        assert (rec.method, rec.path, rec.footprint_gb) == (expected.method, expected.path, expected.footprint_gb)


def test_encoders_keep_the_classifier_out_of_4_bit():
    rec = recommend(4, "roberta-large", priority="memory")
    assert rec.method == "qlora" and rec.config["skip_modules"] == ["classifier"]


def test_recommendation_prints_the_method_reasons_and_footprints():
    text = str(recommend(48, "llama-65b"))
    assert "QLoRA + AdaLoRA" in text and "N6 -> yes" in text and "full 784" in text


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpu_memory_gb=0), r"gpu_memory_gb must be a positive number.*got 0"),
    (dict(gpu_memory_gb=-1), r"gpu_memory_gb must be a positive number.*got -1"),
    (dict(gpu_memory_gb="24"), r"gpu_memory_gb must be a positive number.*got '24'"),
    (dict(gpu_memory_gb=float("nan")), r"gpu_memory_gb must be a positive number.*got nan"),
    (dict(gpu_memory_gb=float("inf")), r"gpu_memory_gb must be a positive number.*got inf"),
    (dict(gpu_memory_gb=24576), r"gpu_memory_gb=24576 is outside \[1, 1024\] GB.*\(24, not 24576 MB\)"),
    (dict(gpu_memory_gb=0.5), r"gpu_memory_gb=0.5 is outside \[1, 1024\] GB, the memory of one accelerator"),
    (dict(model="llama-3-8b"), r"unknown model 'llama-3-8b'.*llama-2-7b.*qwen2\.5-1\.5b"),
    (dict(model={"model_type": "gpt2"}), r"unsupported architecture model_type='gpt2'"),
    (dict(priority="cost"), r"unknown priority 'cost'.*'accuracy', 'memory', 'speed'"),
    (dict(seq_len=0), r"seq_len must be a positive integer, got 0"),
    (dict(batch_size=1.5), r"batch_size must be a positive integer, got 1.5"),
    (dict(model="roberta-large", seq_len=1024), r"seq_len=1024 exceeds the 512 positions"),
    (dict(trainable_budget=0), r"trainable_budget must be a positive integer.*got 0"),
    (dict(trainable_budget=-5), r"trainable_budget must be a positive integer.*got -5"),
    (dict(trainable_budget=1e9), r"trainable_budget must be a positive integer.*got 1000000000.0"),
    (dict(trainable_budget=True), r"trainable_budget must be a positive integer.*got True"),
    (dict(batch_size=-1), r"batch_size must be a positive integer, got -1"),
    (dict(trainable_budget=1000), r"trainable_budget=1,000 is below one rank.*pass at least [\d,]+"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_raises_value_error_naming_the_problem_and_the_choices(kwargs, message):
    kwargs = {"gpu_memory_gb": 24, "model": "llama-2-7b", **kwargs}
    with pytest.raises(ValueError, match=message):
        recommend(kwargs.pop("gpu_memory_gb"), kwargs.pop("model"), **kwargs)


def test_a_budget_one_parameter_below_rank_1_names_the_minimum():
    minimum = footprint("qwen2.5-1.5b", "adalora", r=1, target_modules="all-linear").adapter_params
    with pytest.raises(ValueError, match=f"at least {minimum:,}"):
        recommend(16, "qwen2.5-1.5b", trainable_budget=minimum - 1)
    assert recommend(16, "qwen2.5-1.5b", trainable_budget=minimum).config["target_r"] == 1


RESULTS = pd.DataFrame({
    "method": ["lora"] * 3 + ["adalora"] * 3 + ["qlora"] * 3 + ["full"] * 3,
    "seed": [0, 1, 2] * 4,
    "accuracy": [0.80, 0.82, 0.81, 0.83, 0.84, 0.82, 0.79, 0.81, 0.80, 0.85, 0.84, 0.86],
    "seconds_per_step": [0.10, 0.11, 0.12, 0.13, 0.12, 0.14, 0.20, 0.21, 0.19, 0.30, 0.31, 0.29],
})


@pytest.mark.parametrize("scale", [1, 100], ids=["fraction", "percent"])
def test_tradeoffs_from_results_are_mean_differences_in_points_and_mean_time_ratios(scale):
    frame = RESULTS.assign(accuracy=RESULTS["accuracy"] * scale)
    mean = RESULTS.groupby("method").mean()
    t = Tradeoffs.from_results(frame)
    assert t.adalora_accuracy_gain == pytest.approx(100 * (mean.accuracy["adalora"] - mean.accuracy["lora"]))
    assert t.qlora_accuracy_gain == pytest.approx(100 * (mean.accuracy["qlora"] - mean.accuracy["lora"]))
    assert t.adalora_time_ratio == pytest.approx(mean.seconds_per_step["adalora"] / mean.seconds_per_step["lora"])
    assert t.qlora_time_ratio == pytest.approx(mean.seconds_per_step["qlora"] / mean.seconds_per_step["lora"])
    assert t.source.startswith("measured:")


def test_tradeoffs_from_results_read_the_named_accuracy_column_of_the_harness_runs_table():
    runs = RESULTS.rename(columns={"accuracy": "test_accuracy"}).assign(val_accuracy=0.99)
    named = Tradeoffs.from_results(runs, accuracy="test_accuracy")
    expected = Tradeoffs.from_results(RESULTS)
    assert (named.adalora_accuracy_gain, named.qlora_accuracy_gain) == pytest.approx(
        (expected.adalora_accuracy_gain, expected.qlora_accuracy_gain))
    with pytest.raises(ValueError, match=r"lack the column\(s\) \['accuracy'\]"):
        Tradeoffs.from_results(runs)


def test_tradeoffs_from_results_refuse_results_without_lora():
    with pytest.raises(ValueError, match=r"lack the method\(s\) \['lora'\].*'adalora', 'full', 'qlora'"):
        Tradeoffs.from_results(RESULTS[RESULTS.method != "lora"])


def test_measured_tradeoffs_drive_the_recommendation():
    worse = RESULTS.assign(accuracy=RESULTS.accuracy.where(RESULTS.method != "adalora", 0.5))
    rec = recommend(24, "llama-2-7b", tradeoffs=Tradeoffs.from_results(worse))
    assert rec.method == "lora" and "measured:" in rec.reasons[2]


def test_a_budget_larger_than_the_model_is_clamped_to_the_rank_of_the_smallest_adapted_matrix():
    # robustness-2/recommend_budget_above_model.py: init_r=2726 on k_proj (128 x 896), AdaLoRA above full fine-tuning
    kv = smallest_rank("qwen2.5-0.5b")
    params = footprint("qwen2.5-0.5b", "full").total_params
    assert kv == 128 and params < 10**9
    with pytest.warns(UserWarning, match=r"clamped to min\(out, in\) = 128 of the smallest adapted matrix, k_proj"):
        rec = recommend(80, "qwen2.5-0.5b", trainable_budget=10**9)
    assert rec.method == "adalora"
    assert (rec.config["init_r"], rec.config["target_r"]) == (128, 85)  # ceil(1.5 * 85) = 128 <= 128 < ceil(1.5 * 86)
    assert recommend(80, "qwen2.5-0.5b", trainable_budget=10**9, priority="speed").config["r"] == kv
    assert f"at least the model's own {params:,} parameters" in rec.notes[0] and len(rec.notes) == 3
    assert all("Note: " + n in str(rec) for n in rec.notes)
    assert rec.footprint_gb["adalora"] == total("qwen2.5-0.5b", "adalora", r=128) / 1e9 < rec.footprint_gb["full"]
    assert "more than every adapter method here" in rec.reasons[0]


def largest_rank_below_full(model, methods) -> int:
    """Bisection on footprint itself (no affine shortcut): the largest r at which every method is below full."""
    full = footprint(model, "full", gradient_checkpointing=True).total_bytes
    low, high = 1, smallest_rank(model) + 1
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if all(total(model, m, r=mid) < full for m in methods) else (low, mid)
    return low


def test_ranks_are_cut_where_an_adapter_would_need_as_much_memory_as_full_finetuning():
    with pytest.warns(UserWarning, match="need less memory than full fine-tuning"):
        speed = recommend(80, "llama-2-7b", trainable_budget=6 * 10**9, priority="speed")
        memory = recommend(80, "llama-2-7b", trainable_budget=6 * 10**9, priority="memory")
    full = footprint("llama-2-7b", "full", gradient_checkpointing=True).total_bytes
    r = largest_rank_below_full("llama-2-7b", ("lora", "qlora"))
    assert total("llama-2-7b", "lora", r=r) < full <= total("llama-2-7b", "lora", r=r + 1)
    assert speed.config["r"] == memory.config["r"] == r and speed.method == "qlora"  # LoRA at r no longer fits 72 GB
    limit = largest_rank_below_full("llama-2-7b", ("adalora", "qlora-adalora"))
    assert any(f"init_r is at most {limit}, the largest rank" in n for n in speed.notes)
    assert all(v < speed.footprint_gb["full"] for m, v in speed.footprint_gb.items() if m != "full")


def test_default_ranks_wider_than_a_narrow_models_matrices_are_clamped():
    narrow = dict(model_type="llama", hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=32, vocab_size=1000, tie_word_embeddings=False)
    assert smallest_rank(narrow) == 8  # k_proj, v_proj: 1 kv head of 8
    with pytest.warns(UserWarning, match=r"init_r=12, target_r=8 clamped to init_r=8, target_r=5.*k_proj \(8 x 16\)"):
        rec = recommend(24, narrow)
    assert (rec.config["init_r"], rec.config["target_r"]) == (8, 5)
    assert recommend(24, narrow, priority="speed").config["r"] == 8  # r=8 is within the matrices: unchanged


def test_a_model_too_small_for_any_adapter_to_save_memory_is_refused():
    tiny = dict(model_type="llama", hidden_size=4, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                intermediate_size=4, vocab_size=4, tie_word_embeddings=False)
    full = footprint(tiny, "full", gradient_checkpointing=True).total_bytes
    assert footprint(tiny, "adalora", r=1, target_modules="all-linear", gradient_checkpointing=True).total_bytes >= full
    with pytest.raises(ValueError, match=rf"rank 1 on every Linear already needs [\d,]+ bytes, not less than full "
                                         rf"fine-tuning's {full:,}.*fine-tune it fully"):
        recommend(24, tiny)


def test_integer_types_other_than_int_are_accepted_as_counts():
    numpy = pytest.importorskip("numpy")
    budget = 5 * footprint("llama-2-7b", "adalora", r=1, target_modules="all-linear").adapter_params
    expected = recommend(24, "llama-2-7b", trainable_budget=budget, seq_len=256)
    got = recommend(24, "llama-2-7b", trainable_budget=numpy.int64(budget), seq_len=numpy.int64(256))
    assert (got.config, got.footprint_gb) == (expected.config, expected.footprint_gb)


def test_a_qlora_larger_than_any_card_is_not_promised_a_single_card():
    rec = recommend(24, "llama-2-70b", seq_len=4096, batch_size=256)
    assert rec.method == "none" and rec.footprint_gb["qlora"] > 1024
    assert "more than any single card holds" in rec.alternatives[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(adalora_accuracy_gain=float("nan")), r"adalora_accuracy_gain must be a finite number.*got nan"),
    (dict(qlora_accuracy_gain="0.1"), r"qlora_accuracy_gain must be a finite number.*got '0.1'"),
    (dict(adalora_time_ratio=0.0), r"adalora_time_ratio must be a positive finite ratio.*got 0.0"),
    (dict(qlora_time_ratio=float("inf")), r"qlora_time_ratio must be a positive finite ratio.*got inf"),
])
def test_tradeoffs_refuse_numbers_no_advice_could_follow(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Tradeoffs(**kwargs)


def test_speed_advice_does_not_call_a_measured_faster_method_slower():
    measured = Tradeoffs(adalora_time_ratio=0.95, qlora_time_ratio=1.3, source="measured")
    speed = recommend(24, "llama-2-7b", priority="speed", tradeoffs=measured).reasons[1]
    assert "0.950x LoRA's training time" in speed and "ratio below 1 is noise" in speed
    papers = recommend(24, "llama-2-7b", priority="speed").reasons[1]
    assert "1.105x" in papers and "noise" not in papers


def test_a_negative_gain_is_reported_as_a_change_not_a_gain():
    rec = recommend(24, "llama-2-7b", tradeoffs=Tradeoffs(adalora_accuracy_gain=-0.5))
    assert rec.method == "lora" and "changes accuracy by -0.50 accuracy points" in rec.reasons[2]
    assert "gains -0.50" not in rec.reasons[2]


# --- several cards ----------------------------------------------------------------------------------------------

def per_card(model, method, n_gpus, sharding="fsdp") -> int:
    """``total`` on ``n_gpus`` cards: FSDP stores the 4-bit weights in bf16 (bnb_4bit_quant_storage), as it must."""
    kw = {}
    if method != "full":
        kw = dict(r=12 if method.endswith("adalora") else 8, target_modules="all-linear", compute_dtype="bfloat16")
    if method.startswith("qlora"):
        kw |= dict(double_quant=True, optimizer="paged_adamw_32bit",
                   quant_storage="bfloat16" if sharding == "fsdp" else "uint8")
    return footprint(model, method, gradient_checkpointing=True, world_size=n_gpus, sharding=sharding,
                     **kw).total_bytes


def test_one_card_advice_is_unchanged_by_naming_n_gpus_1():
    for gpu_gb, model in [(24, "llama-2-7b"), (48, "llama-65b"), (24, "llama-2-70b"), (4, "roberta-large")]:
        assert recommend(gpu_gb, model, n_gpus=1) == recommend(gpu_gb, model)
        rec = recommend(gpu_gb, model)
        assert (rec.n_gpus, rec.sharding) == (1, None) and "n_gpus" not in rec.config and "Layout" not in str(rec)


@pytest.mark.parametrize("sharding", [None, "fsdp", "ddp", "device_map"], ids=str)
def test_several_cards_decide_on_the_per_card_footprint_of_the_sharding(sharding):
    rec = recommend(24, "llama-2-13b", n_gpus=2, sharding=sharding)
    used = sharding or "fsdp"  # several cards: FSDP unless told otherwise
    assert (rec.n_gpus, rec.sharding) == (2, used)
    for method in ("full", "lora", "adalora", "qlora", "qlora-adalora"):
        assert rec.footprint_gb[method] == per_card("llama-2-13b", method, 2, used) / 1e9, method
    assert rec.facts["lora_fits"] == (per_card("llama-2-13b", "lora", 2, used) <= usable(24))
    assert rec.facts["qlora_fits"] == (per_card("llama-2-13b", "qlora", 2, used) <= usable(24))


# Chapter 7's scenarios on two cards; the chapter's prose reports what recommend prints here
MULTI_GPU_SCENARIOS = [(24, "llama-2-70b"), (48, "llama-65b"), (16, "llama-2-13b")]  # RTX 4090s, A6000s, T4s


@pytest.mark.parametrize("gpu_gb, model", MULTI_GPU_SCENARIOS)
def test_chapter_7_two_card_scenarios_report_per_card_memory_and_the_fsdp_recipe(gpu_gb, model):
    rec = recommend(gpu_gb, model, n_gpus=2)
    print(f"\n{rec}")
    assert (rec.n_gpus, rec.sharding) == (2, "fsdp")
    assert rec.layout.startswith(f"2 x {gpu_gb} GB, FSDP: ")
    for method, gb_per_card in rec.footprint_gb.items():
        assert gb_per_card == per_card(model, method, 2) / 1e9 < footprint(model, method).total_bytes / 1e9
    fits = {m: per_card(model, m, 2) <= usable(gpu_gb) for m in ("lora", "qlora")}
    assert (rec.facts["lora_fits"], rec.facts["qlora_fits"]) == (fits["lora"], fits["qlora"])
    assert f"on each card of 2 x {gpu_gb} GB with FSDP" in rec.reasons[0] and " per card" in rec.reasons[0]
    if rec.method == "none":
        assert rec.config == {} and f"Nothing fits on 2 x {gpu_gb} GB, FSDP" in str(rec)
    else:
        assert f"{rec.footprint_gb[rec.method]:.2f} GB per card" in rec.layout
        assert (rec.config["n_gpus"], rec.config["sharding"]) == (2, "fsdp")
        assert rec.config.get("quant_storage") == ("bfloat16" if rec.method.startswith("qlora") else None)
        assert f"Layout: {rec.layout}" in str(rec)


def smallest_count(model, sharding, gpu_gb, counts) -> int | None:
    """The fewest cards among ``counts`` on which QLoRA (r=8) fits, by trying each in turn."""
    return next((n for n in counts if per_card(model, "qlora", n, sharding) <= usable(gpu_gb)), None)


@pytest.mark.parametrize("gpu_gb, n_gpus", [(24, 1), (12, 2)])
def test_nothing_fits_counts_the_cards_of_this_size_that_would_hold_qlora(gpu_gb, n_gpus):
    rec = recommend(gpu_gb, "llama-2-70b", n_gpus=n_gpus)
    assert rec.method == "none"
    split = int(re.search(r"split it over (\d+) cards", rec.alternatives[1])[1])
    shards = int(re.search(r"FSDP .*?, (\d+) cards of this size hold QLoRA", rec.alternatives[3])[1])
    assert split == smallest_count("llama-2-70b", "device_map", gpu_gb, range(2, 81))
    assert shards == smallest_count("llama-2-70b", "fsdp", gpu_gb, range(2, 64)) > n_gpus
    assert f"{per_card('llama-2-70b', 'qlora', shards, 'fsdp') / 1e9:.2f} GB per card" in rec.alternatives[3]


def test_a_model_no_number_of_these_cards_holds_is_told_so():
    rec = recommend(4, "llama-2-70b", n_gpus=2, seq_len=4096, batch_size=64)
    assert rec.method == "none"
    assert "device_map='auto' cannot hold it" in rec.alternatives[1]
    assert "With FSDP no number of these cards holds QLoRA" in rec.alternatives[3]


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_gpus=0), r"n_gpus must be a positive integer number of cards of gpu_memory_gb each, got 0"),
    (dict(n_gpus=-2), r"n_gpus must be a positive integer.*got -2"),
    (dict(n_gpus=1.5), r"n_gpus must be a positive integer.*got 1\.5"),
    (dict(n_gpus=True), r"n_gpus must be a positive integer.*got True"),
    (dict(n_gpus="2"), r"n_gpus must be a positive integer.*got '2'"),
    (dict(n_gpus=2, sharding="zero3"), r"unknown sharding 'zero3'; choose one of \('ddp', 'fsdp', 'device_map'\)"),
    (dict(n_gpus=33, sharding="device_map"), r"cannot split the 32 layers of llama-2-7b over 33 cards.*pass "
                                             r"n_gpus <= 32 or sharding='fsdp'"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_card_counts_and_shardings_raise_naming_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        recommend(24, "llama-2-7b", **kwargs)
