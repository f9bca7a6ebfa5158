"""companion.bench, the Chapter 6 harness: trainable budgets counted against PEFT's own adapters,
unequal budgets and bad configurations refused before anything trains, and all five methods run on a
tiny BERT whose results table, files and plots are checked against the runs themselves."""

import matplotlib

matplotlib.use("Agg")

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from pandas.testing import assert_frame_equal
from peft import AdaLoraConfig, LoraConfig, get_peft_model, get_peft_model_state_dict
from tiny_models import separable, tiny_bert
from torch import nn
from torch.utils.data import DataLoader

from companion.adalora.ablation import BERT_MATRICES
from companion.bench import (LABELS, METHODS, BenchConfig, BenchResults, Task, adapted_shapes, check_budgets,
                             instruction_task, plot_accuracy_vs_memory, plot_learning_curves, plot_rank_heatmaps,
                             run_benchmark, run_one, trainable_budget)
from companion.bench.harness import adapted_layers, kept_budget
from companion.bench.results import RUN_COLUMNS
from companion.measure import load_in_4bit
from companion.profiles import setup_profile
from companion.qlora import keep_dequantize_kernel_on_cpu
from companion.train import classification_accuracy

TARGETS = ("query", "value")
CONFIG = BenchConfig(max_steps=12, eval_every=4, tinit=2, tfinal=4, deltaT=2, seeds=(0, 1))
EVAL_STEPS = [4, 8, 12]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_4bit(seed=0):
    """The tiny BERT in NF4 with double quantization; the new head stays in 32 bit, as in sentiment_task."""
    return keep_dequantize_kernel_on_cpu(load_in_4bit(tiny_bert(seed), compute_dtype=torch.float32,
                                                      skip_modules=["classifier"]))


def linear_sizes(model, targets=TARGETS):
    """(d_in, d_out) of the target nn.Linear layers, read off the 16-bit model by name."""
    return [(m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]


def tiny_task(train_loader=None, loads=None):
    """A Task built the way sentiment_task builds one (train shuffled by a seeded generator).

    ``loads`` collects, per load_model call, the input_ids of every training forward pass of that model."""
    loaders = {"train": train_loader or DataLoader(separable(64, 0), batch_size=8, shuffle=True,
                                                   generator=torch.Generator().manual_seed(0)),
               "validation": DataLoader(separable(16, 1), batch_size=16),
               "test": DataLoader(separable(16, 2), batch_size=16)}

    def load(seed, quantized):
        model = tiny_4bit(seed) if quantized else tiny_bert(seed)
        if loads is not None:
            batches = []
            loads.append(batches)
            model.register_forward_pre_hook(
                lambda m, args, kwargs: batches.append(kwargs["input_ids"].clone()) if m.training else None,
                with_kwargs=True)
        return model

    return Task("tiny", "2-layer BERT on separable tokens", load, loaders,
                lambda model, split: classification_accuracy(model, loaders[split]), TARGETS, ("classifier",),
                torch.device("cpu"))


@pytest.fixture(scope="module")
def task_and_loads():
    loads = []
    return tiny_task(loads=loads), loads


@pytest.fixture(scope="module")
def results(task_and_loads):
    return run_benchmark(task_and_loads[0], CONFIG)


# ------------------------------------------------------------------ budgets, against PEFT's own count
@pytest.mark.parametrize("r", [2, 4])
def test_lora_budget_is_the_number_of_adapter_parameters_peft_creates(r):
    model = get_peft_model(tiny_bert(), LoraConfig(r=r, target_modules=list(BERT_MATRICES)))
    peft_count = sum(p.numel() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    assert trainable_budget("lora", adapted_shapes(tiny_bert(), BERT_MATRICES), r) == peft_count
    assert trainable_budget("qlora", adapted_shapes(tiny_bert(), BERT_MATRICES), r) == peft_count


@pytest.mark.parametrize("target_r", [2, 4])
def test_adalora_budget_is_peft_adalora_at_init_r_equal_to_target_r(target_r):
    model = get_peft_model(tiny_bert(), AdaLoraConfig(init_r=target_r, target_r=target_r, total_step=10,
                                                      target_modules=list(BERT_MATRICES)))
    parts = (".lora_A.", ".lora_B.", ".lora_E.")  # Q, P and Lambda; PEFT's ranknum is not an adapter weight
    peft_count = sum(p.numel() for n, p in model.named_parameters() if any(part in n for part in parts))
    shapes = adapted_shapes(tiny_bert(), BERT_MATRICES)
    assert trainable_budget("adalora", shapes, target_r) == peft_count
    assert trainable_budget("qlora-adalora", shapes, target_r) == peft_count
    assert trainable_budget("full", shapes, target_r) == 0


def test_adapted_shapes_follow_peft_name_matching_and_read_4bit_layers_unpacked():
    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=list(BERT_MATRICES)))
    peft_shapes = [(m.in_features, m.out_features) for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert adapted_shapes(tiny_bert(), BERT_MATRICES) == peft_shapes  # 6 matrices per layer, in module order
    quantized = tiny_4bit()
    assert {type(m).__name__ for n, m in quantized.named_modules() if n.endswith(TARGETS)} == {"Linear4bit"}
    assert adapted_shapes(quantized, BERT_MATRICES) == peft_shapes  # not the packed (n/2, 1) weight shapes
    with pytest.raises(ValueError, match=r"no linear layer matches target_modules=\['q_proj'\]"):
        adapted_shapes(tiny_bert(), ("q_proj",))


def test_final_adalora_budget_is_the_size_of_the_adapter_peft_saves_after_a_non_uniform_allocation():
    init_r = 4
    model = get_peft_model(tiny_bert(), AdaLoraConfig(init_r=init_r, target_r=2, total_step=10,
                                                      target_modules=list(BERT_MATRICES)))
    layers = adapted_layers(tiny_bert(), BERT_MATRICES)
    kept = {name: 1 + (3 * i) % init_r for i, name in enumerate(layers)}  # 1..4 triplets, uneven
    model.peft_config["default"].rank_pattern = {f"{name}.lora_E.default": [True] * r + [False] * (init_r - r)
                                                 for name, r in kept.items()}
    saved = get_peft_model_state_dict(model)  # PEFT cuts P, Q and Lambda to the rank pattern
    assert len(set(kept.values())) > 1
    assert kept_budget(layers, kept) == sum(t.numel() for t in saved.values())


def test_moving_ranks_to_wider_matrices_moves_the_final_budget_away_from_the_planned_one():
    # MiniLM: 4 attention matrices of 384 x 384 and two FFN matrices of 384 x 1536 per layer, target_r 4, init_r 6
    layer = {"query": (384, 384), "key": (384, 384), "value": (384, 384), "output": (384, 384),
             "ffn1": (384, 1536), "ffn2": (1536, 384)}
    planned = trainable_budget("adalora", list(layer.values()), 4)
    to_ffn = {"query": 3, "key": 3, "value": 3, "output": 3, "ffn1": 6, "ffn2": 6}  # same 24 triplets in total
    assert sum(to_ffn.values()) == 4 * len(layer)
    assert kept_budget(layer, to_ffn) == 12 * 769 + 12 * 1921 == 32280
    assert (kept_budget(layer, to_ffn) - planned) / planned > BenchConfig().budget_tolerance  # 27,672 planned
    assert kept_budget(layer, dict.fromkeys(layer, 4)) == planned


def test_kept_budget_refuses_ranks_of_other_matrices_and_negative_ranks():
    layers = {"a": (4, 4), "b": (4, 8)}
    with pytest.raises(ValueError, match=r"same matrices; only in ranks: \['c'\], only in layers: \['b'\]"):
        kept_budget(layers, {"a": 1, "c": 2})
    with pytest.raises(ValueError, match=r"cannot be negative, got \{'b': -1\}"):
        kept_budget(layers, {"a": 1, "b": -1})


# ------------------------------------------------------------------ the budget check
def test_equal_budgets_pass_and_adaloras_lambdas_fit_the_default_tolerance():
    check_budgets({"lora": 1000, "qlora": 1000}, 0.0)
    # MiniLM (width 384, 1536 in the MLP) and the tiny BERT, the narrowest case: lambda adds 1 / (d_in + d_out)
    minilm = 6 * ([(384, 384)] * 4 + [(384, 1536), (1536, 384)])
    for shapes in (minilm, adapted_shapes(tiny_bert(), TARGETS)):
        budgets = {m: trainable_budget(m, shapes, BenchConfig().r) for m in ("lora", "adalora")}
        assert budgets["adalora"] > budgets["lora"]
        check_budgets(budgets, BenchConfig().budget_tolerance)


def test_budgets_apart_by_more_than_the_tolerance_are_refused_whichever_is_larger():
    check_budgets({"lora": 100, "adalora": 105}, 0.05)
    for budgets in ({"lora": 100, "adalora": 106}, {"lora": 106, "adalora": 100}):
        with pytest.raises(ValueError, match=r"6\.0% more than"):
            check_budgets(budgets, 0.05)


def test_full_fine_tuning_is_left_out_of_the_budget_check():
    check_budgets({"full": 0, "lora": 1000, "adalora": 1030}, 0.05)  # 0 would be the smallest budget
    check_budgets({"full": 10**9, "lora": 1000}, 0.05)


def test_lora_r8_against_adalora_target_r4_is_refused_before_any_training_with_both_budgets_and_the_gap():
    class NoTraining:
        def __iter__(self):
            raise AssertionError("run_benchmark started training before checking the budgets")

    loads = []
    task = tiny_task(train_loader=NoTraining(), loads=loads)
    sizes = linear_sizes(tiny_bert())
    lora, adalora = 8 * sum(i + o for i, o in sizes), 4 * sum(i + o + 1 for i, o in sizes)
    with pytest.raises(ValueError) as error:
        run_benchmark(task, BenchConfig(methods=("full", "lora", "adalora"), ranks={"lora": 8}, seeds=(0,),
                                        max_steps=12, tinit=2, tfinal=4, deltaT=2))
    message = str(error.value)
    assert f"{lora:,}" in message and f"{adalora:,}" in message
    assert f"{(lora - adalora) / adalora:.1%}" in message
    assert "tolerance 5%" in message and "LoRA r = AdaLoRA target_r" in message
    assert len(loads) <= 1 and not any(loads)  # at most the model that gave the shapes; no arm was built


# ------------------------------------------------------------------ bad configurations
@pytest.mark.parametrize("kwargs, message", [
    (dict(methods=("lora", "dora")), r"unknown methods \['dora'\]; choose from \['full', 'lora', 'adalora', "
                                     r"'qlora', 'qlora-adalora'\]"),
    (dict(methods=()), r"choose from \['full'"),
    (dict(seeds=()), r"seeds must name at least one seed"),
    (dict(lr={"full": 1e-4, "lora": 5e-4}), r"no learning rate for \['adalora', 'qlora', 'qlora-adalora'\]; "
                                            r"add them to lr="),
    (dict(r=8), r"target_r = 8 must lie in \[1, init_r = 6\)"),
    (dict(ranks={"adalora": 7}, init_r=6), r"target_r = 7 must lie in \[1, init_r = 6\)"),
    (dict(budget_tolerance=1.0), r"budget_tolerance is a fraction in \[0, 1\), got 1.0"),
    (dict(budget_tolerance=-0.1), r"budget_tolerance is a fraction in \[0, 1\), got -0.1"),
    (dict(max_steps=0), r"max_steps must be positive, got 0"),
    (dict(ranks={"qlora-adalora": 9}), r"qlora-adalora's target_r = 9 must lie in \[1, init_r = 6\)"),
    (dict(max_steps=20), r"tinit \+ tfinal = 10 \+ 20 >= total_step = 20 leaves no budgeting phase"),
    (dict(measure_step=81), r"measure_step must be a step in \[1, max_steps = 80\], got 81"),
    (dict(measure_step=0), r"measure_step must be a step in \[1, max_steps = 80\], got 0"),
])
def test_bench_config_refuses_bad_input_and_says_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(**kwargs)


def test_lora_only_configurations_do_not_check_adalora_ranks():
    assert BenchConfig(methods=("full", "lora", "qlora"), r=8).rank("lora") == 8


def test_a_task_needs_train_validation_and_test_loaders():
    loader = DataLoader(separable(8, 0), batch_size=8)
    with pytest.raises(ValueError, match=r"missing \['test', 'validation'\]"):
        Task("t", "d", tiny_bert, {"train": loader}, lambda m, s: 0.0, TARGETS, (), torch.device("cpu"))


# ------------------------------------------------------------------ five methods on a tiny task
def test_one_row_per_method_and_seed_with_every_column_and_accuracies_in_0_1(results):
    runs = results.runs
    assert list(zip(runs["method"], runs["seed"])) == [(m, s) for m in METHODS for s in CONFIG.seeds]
    assert set(RUN_COLUMNS) <= set(runs.columns)
    assert runs[["val_accuracy", "test_accuracy"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (runs["seconds_per_step"] > 0).all()
    reached = runs["steps_to_target"].dropna()
    assert reached.isin(EVAL_STEPS).all()


def test_trainable_counts_full_model_lora_budget_and_adalora_from_init_r_to_the_ranks_it_kept(results):
    model = tiny_bert()
    sizes = linear_sizes(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(TARGETS)]
    head = sum(p.numel() for p in model.classifier.parameters())
    runs = results.runs.set_index("method")
    assert (runs.loc["full", "trainable_params"] == sum(p.numel() for p in model.parameters())).all()
    for method in ("lora", "qlora"):
        assert (runs.loc[method, "trainable_params"] == CONFIG.r * sum(i + o for i, o in sizes) + head).all()
        assert (runs.loc[method, "planned_budget_params"] == runs.loc[method, "trainable_params"]).all()
        assert (runs.loc[method, "budget_params"] == runs.loc[method, "trainable_params"]).all()
    for method in ("adalora", "qlora-adalora"):
        rows = results.runs[results.runs["method"] == method]
        assert (rows["trainable_params"] == CONFIG.init_r * sum(i + o + 1 for i, o in sizes) + head).all()
        assert (rows["planned_budget_params"] == CONFIG.r * sum(i + o + 1 for i, o in sizes) + head).all()
        for seed, final in zip(rows["seed"], rows["budget_params"]):  # sum_k r_k (d_in + d_out + 1), r_k kept
            kept = results.ranks[method][str(seed)]
            assert final == sum(kept[n] * (i + o + 1) for n, (i, o) in zip(names, sizes)) + head
        assert (rows["trainable_params"] > rows["budget_params"]).all()


def test_4bit_arms_store_a_smaller_base_and_16bit_arms_store_every_weight_and_buffer(results):
    model = tiny_bert()
    full_bytes = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    runs = results.runs.set_index("method")
    sixteen = runs.loc[["full", "lora", "adalora"], "base_storage_bytes"]
    four = runs.loc[["qlora", "qlora-adalora"], "base_storage_bytes"]
    assert (sixteen == full_bytes).all()
    assert four.max() < sixteen.min()


def test_peak_memory_of_full_fine_tuning_holds_weights_grads_and_adam_states_and_exceeds_lora(results):
    model = tiny_bert()
    param_bytes = sum(p.nbytes for p in model.parameters())
    runs = results.runs
    assert (runs["peak_memory_bytes"] > 0).all()
    for seed in CONFIG.seeds:
        peak = runs[runs["seed"] == seed].set_index("method")["peak_memory_bytes"]
        assert peak["full"] >= 4 * param_bytes  # weights + gradients + exp_avg + exp_avg_sq
        assert peak["full"] > peak["lora"]


def test_adalora_final_ranks_sum_to_the_target_budget_on_every_adapted_matrix(results):
    names = [n for n, m in tiny_bert().named_modules() if isinstance(m, nn.Linear) and n.endswith(TARGETS)]
    assert set(results.ranks) == {"adalora", "qlora-adalora"}
    for method, by_seed in results.ranks.items():
        assert set(by_seed) == {str(s) for s in CONFIG.seeds}
        for ranks in by_seed.values():
            assert list(ranks) == names
            assert all(0 <= r <= CONFIG.init_r for r in ranks.values())
            assert sum(ranks.values()) == CONFIG.r * len(names)


def test_final_budget_of_an_adalora_run_on_matrices_of_two_widths_counts_the_ranks_it_kept():
    task = tiny_task()
    task = Task(task.name, task.description, task.load_model, task.loaders, task.evaluate, tuple(BERT_MATRICES),
                task.trainable_modules, task.device)  # FFN matrices are 16 x 24 and 24 x 16, attention 16 x 16
    row, _, _, ranks = run_one("adalora", 0, task, CONFIG)
    model = tiny_bert()
    layers = adapted_layers(model, BERT_MATRICES)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert sum(ranks.values()) == CONFIG.r * len(layers)
    assert row["planned_budget_params"] == CONFIG.r * sum(i + o + 1 for i, o in layers.values()) + head
    assert row["budget_params"] == sum(ranks[n] * (i + o + 1) for n, (i, o) in layers.items()) + head
    assert row["budget_params"] != row["planned_budget_params"]  # this seed moves ranks between widths


def test_curves_have_one_row_per_evaluation_and_losses_one_per_step(results):
    for (method, seed), curve in results.curves.groupby(["method", "seed"], sort=False):
        assert curve["step"].tolist() == EVAL_STEPS
        assert curve["val_accuracy"].between(0, 1).all()
        final = results.runs[(results.runs["method"] == method) & (results.runs["seed"] == seed)]
        assert curve["val_accuracy"].iloc[-1] == final["val_accuracy"].item()
    assert len(results.curves) == len(results.runs) * len(EVAL_STEPS)
    assert results.losses.groupby(["method", "seed"]).size().eq(CONFIG.max_steps).all()
    assert np.isfinite(results.losses["loss"]).all()


def test_every_arm_of_a_seed_trains_on_the_same_batches(results, task_and_loads):
    trained = [batches for batches in task_and_loads[1] if batches]  # the shape probe never trains
    arms = list(zip(results.runs["method"], results.runs["seed"]))
    assert len(trained) == len(arms)
    for seed in CONFIG.seeds:
        seen = [torch.stack(batches) for (method, s), batches in zip(arms, trained) if s == seed]
        assert len(seen) == len(METHODS) and seen[0].shape == (CONFIG.max_steps, 8, 8)
        for other in seen[1:]:
            assert torch.equal(other, seen[0])


def test_running_the_same_config_twice_gives_the_same_tables(results, task_and_loads):
    again = run_benchmark(task_and_loads[0], CONFIG)
    assert_frame_equal(again.runs.drop(columns="seconds_per_step"), results.runs.drop(columns="seconds_per_step"))
    assert_frame_equal(again.curves, results.curves)
    assert_frame_equal(again.losses, results.losses)
    assert again.ranks == results.ranks


# ------------------------------------------------------------------ results: files, summary, plots
def test_save_and_load_round_trip_gives_equal_tables(results, tmp_path):
    directory = results.save(tmp_path / "ch06")
    assert {p.name for p in directory.iterdir()} == {"runs.csv", "curves.csv", "losses.csv", "results.json"}
    loaded = BenchResults.load(directory)
    for name in ("runs", "curves", "losses"):
        assert_frame_equal(getattr(loaded, name), getattr(results, name))
    assert loaded.ranks == results.ranks and loaded.meta == results.meta
    assert loaded.meta["config"]["seeds"] == list(CONFIG.seeds) and loaded.meta["task"] == "tiny"


def test_loading_a_directory_without_results_says_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no results\.json in .*run run_benchmark\(\.\.\.\)\.save"):
        BenchResults.load(tmp_path / "missing")


def test_summary_means_and_sample_stds_over_seeds_equal_pandas_on_the_runs_table(results):
    summary = results.summary()
    assert list(summary.index) == [LABELS[m] for m in METHODS]
    for method in METHODS:
        runs = results.runs[results.runs["method"] == method]
        row = summary.loc[LABELS[method]]
        for column, name in (("val_accuracy", "val acc"), ("test_accuracy", "test acc")):
            values = runs[column].to_numpy()
            assert row[f"{name} mean (%)"] == pytest.approx(100 * values.mean(), rel=1e-12)
            assert row[f"{name} std"] == pytest.approx(100 * values.std(ddof=1), rel=1e-12)
        assert row["peak MB"] == pytest.approx(runs["peak_memory_bytes"].mean() / 1e6, rel=1e-12)
        assert row["ms per step"] == pytest.approx(1e3 * runs["seconds_per_step"].median(), rel=1e-12)
        assert row["trainable params"] == runs["trainable_params"].iloc[0]
        assert row["reached target"] == f"{runs['steps_to_target'].notna().sum()}/{len(CONFIG.seeds)}"


def test_table_writes_accuracy_as_mean_plus_minus_std(results):
    table = results.table()
    for method in METHODS:
        acc = 100 * results.runs.loc[results.runs["method"] == method, "test_accuracy"].to_numpy()
        assert table.loc[LABELS[method], "held-out test acc. (%)"] == f"{acc.mean():.1f} ± {acc.std(ddof=1):.1f}"
    assert table.loc[LABELS["full"], "trainable params"] == f"{results.runs['trainable_params'].iloc[0]:,}"
    for method in METHODS:
        runs = results.runs[results.runs["method"] == method]
        assert table.loc[LABELS[method], "planned budget"] == f"{runs['planned_budget_params'].iloc[0]:,}"
        low, high = runs["budget_params"].min(), runs["budget_params"].max()
        assert table.loc[LABELS[method], "final budget"] == (f"{low:,}" if low == high else f"{low:,}-{high:,}")


def test_a_runs_table_without_a_measured_column_is_refused(results):
    with pytest.raises(ValueError, match=r"lacks columns \['peak_memory_bytes'\]"):
        BenchResults(results.runs.drop(columns="peak_memory_bytes"), results.curves, results.losses, {}, {})


def test_plots_have_titles_labelled_axes_and_one_entry_per_method(results):
    ax = plot_accuracy_vs_memory(results)
    assert ax.get_title() and "MB" in ax.get_xlabel() and "%" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [LABELS[m] for m in METHODS]
    ax = plot_learning_curves(results, target=0.9)
    assert ax.get_title() and ax.get_xlabel() == "optimizer step" and "%" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [LABELS[m] for m in METHODS] + ["target 90%"]
    assert ax.lines[0].get_xdata().tolist() == EVAL_STEPS
    fig = plot_rank_heatmaps(results, init_r=CONFIG.init_r)
    panels = [a for a in fig.axes if a.images]
    assert [a.get_title() for a in panels] == [f"{LABELS['adalora']}, seed 0", f"{LABELS['qlora-adalora']}, seed 0"]
    for ax, method in zip(panels, ("adalora", "qlora-adalora")):
        assert ax.get_xlabel() and ax.get_ylabel()
        assert ax.images[0].get_array().sum() == sum(results.ranks[method]["0"].values())
    assert fig.get_suptitle()
    plt.close("all")


def test_rank_heatmaps_need_adalora_runs(results):
    plain = results.runs["method"].isin(["full", "lora", "qlora"])
    without = BenchResults(results.runs[plain], results.curves, results.losses, {}, results.meta)
    with pytest.raises(ValueError, match="no AdaLoRA runs"):
        plot_rank_heatmaps(without, init_r=CONFIG.init_r)


# ------------------------------------------------------------------ the instruction task in the ci profile
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_instruction_task_trains_a_tiny_llama_and_scores_exact_match(method):
    task = instruction_task(setup_profile("ci"), n_train=64, n_test=8, batch_size=8)
    config = BenchConfig(methods=("lora", "qlora"), seeds=(0,), max_steps=2, eval_every=2, tinit=0, tfinal=0)
    row, curve, losses, ranks = run_one(method, 0, task, config)
    assert 0 <= row["val_accuracy"] <= 1 and 0 <= row["test_accuracy"] <= 1
    assert [c["step"] for c in curve] == [2] and len(losses) == 2 and ranks is None
    assert row["peak_memory_bytes"] > 0 and not math.isnan(losses[-1]["loss"])


def test_an_adalora_arm_whose_target_r_equals_init_r_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"target_r = 6 must lie in \[1, init_r = 6\).*for a fixed rank use LoRA"):
        BenchConfig(init_r=6, r=6)
