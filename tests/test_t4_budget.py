"""The T4 budget (companion.budget, companion.budget_plans): every notebook's gpu defaults fit a Colab T4,
and its header states the estimate of those defaults.

The estimates are arithmetic on configs; these tests check that arithmetic, the models it stands on (the
DeBERTa and MiniLM configs against transformers' own parameter counts), and that the notebooks' headers,
parameters and gpu branches agree with their plans.
"""

import ast
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from companion.budget import (EXTRA_CONFIGS, LAYER_PASS_S, MFU, T4, Estimate, Run, estimate, matmul_params,
                              model_config)
from companion.budget_plans import PLANS, estimate_line, notebook_estimate, notebook_parameters, plan
from companion.memory import footprint

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("ch*.ipynb"))
SCRIPT = ROOT / "scripts" / "t4_budget.py"


def cells(path):
    return json.loads(path.read_text())["cells"]


@pytest.fixture(scope="module")
def t4_script():
    spec = importlib.util.spec_from_file_location("t4_budget", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_notebook_has_a_plan_and_every_plan_a_notebook():
    assert {p.stem for p in NOTEBOOKS} == set(PLANS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_gpu_defaults_fit_a_t4(path):
    params = notebook_parameters(path)
    est = notebook_estimate(path.stem, **params)
    runs = "\n".join(f"  {r.label}: {r.peak_bytes() / 1e9:.2f} GB, {r.seconds() / 60:.1f} min x{r.repeats}"
                     for r in plan(path.stem, **params))
    assert est.peak_gb <= T4.usable_gb, f"{path.stem}: peak {est.peak_gb:.1f} GB > {T4.usable_gb} GB\n{runs}"
    assert est.minutes <= 30, f"{path.stem}: {est.minutes:.0f} min > 30 min on a T4; lower its gpu defaults\n{runs}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_header_states_the_estimate_of_the_gpu_defaults(path, t4_script):
    header = "".join(cells(path)[0]["source"])
    expected = t4_script.header_paragraph(path.stem)
    assert expected in header, (f"{path.name}: the header's T4 estimate is missing or stale; run "
                                f"`python scripts/t4_budget.py --write {path.relative_to(ROOT)}`. "
                                f"Expected:\n{expected}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_gpu_branch_prints_the_estimate_of_its_parameters(path):
    code = "".join("".join(c["source"]) for c in cells(path) if c["cell_type"] == "code")
    assert f'estimate_line("{path.stem}", "these parameters"' in code, \
        f"{path.name}: its gpu branch should print estimate_line(\"{path.stem}\", \"these parameters\", ...)"


def test_the_old_ch05_batch_of_32_rows_of_512_tokens_does_not_fit_a_t4():
    # what ch05_qlora_finetune's run B and memory table did before: one batch, no accumulation, float16
    old = Run("run B before the fix", "qwen2.5-0.5b", "qlora", "float16", batch_size=32, seq_len=512, steps=200, r=16,
              target_modules="all-linear", gradient_checkpointing=True)
    est = estimate([old])
    assert est.peak_gb > T4.usable_gb and not est.fits
    assert "over the T4 budget" in est.line()
    assert round(est.peak_gb, 1) == 17.2  # the gpu rehearsal's figure (shared/cases/gpu-rehearsal.md, finding 2)


def test_ch05_trains_four_micro_batches_of_a_quarter_batch_on_the_gpu():
    runs = plan("ch05_qlora_finetune", MODEL="qwen2.5-0.5b", QLORA_STEPS=None, BATCH_SIZE=32, R=16)
    trained = [r for r in runs if r.steps]
    assert all(r.batch_size == 8 for r in trained) and {r.grad_accum for r in trained} == {1, 4}
    source = "".join("".join(c["source"]) for c in cells(ROOT / "notebooks" / "ch05_qlora_finetune.ipynb"))
    assert "GRAD_ACCUM = 1 if profile.is_ci else 4" in source and "MICRO_BATCH = BATCH_SIZE // GRAD_ACCUM" in source
    assert source.count("batch_size=MICRO_BATCH") >= 3 and "grad_accum=GRAD_ACCUM" in source


def test_larger_models_stay_available_and_say_they_are_over_budget():
    line = estimate_line("ch05_qlora_finetune", "these parameters", MODEL="llama-2-7b", QLORA_STEPS=None,
                         BATCH_SIZE=32, R=16)
    assert line.startswith("T4 estimate (these parameters): peak ") and "over the T4 budget" in line


def test_ch05_setup_shows_load_in_4bit_on_the_local_checkpoint_not_the_hub_model():
    source = "".join("".join(c["source"]) for c in cells(ROOT / "notebooks" / "ch05_qlora_setup.ipynb"))
    assert "from_pretrained(TINY_PATH, load_in_4bit=True)" in source
    assert "from_pretrained(MODEL_PATH, load_in_4bit=True)" not in source


def test_ch04_paged_gpu_config_is_the_plans_and_its_text_gives_its_parameter_count():
    path = ROOT / "notebooks" / "ch04_paged_optimizers.ipynb"
    code = [c for c in cells(path) if c["cell_type"] == "code"]
    calls = [n for n in ast.walk(ast.parse("".join(code[2]["source"])))
             if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "tiny_llama_config"]
    gpu = {k.arg: ast.literal_eval(k.value) for k in calls[-1].keywords if k.arg != "max_position_embeddings"}
    planned = {k: v for k, v in model_config("ch04-paged-llama").items()
               if k not in ("model_type", "tie_word_embeddings")}
    assert gpu == planned
    n = footprint(model_config("ch04-paged-llama"), "full").total_params
    text = f"a {round(n / 1e6)}M-parameter Llama"
    assert text in "".join(cells(path)[0]["source"]) and text in "".join(code[1]["source"])


def test_deberta_stand_in_counts_deberta_v3_base_parameters_to_within_its_rel_embedding_norm():
    config = AutoConfig.for_model("deberta-v2", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072, vocab_size=128100, max_position_embeddings=512,
                                  relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
                                  share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                                  type_vocab_size=0, num_labels=2)  # microsoft/deberta-v3-base config.json
    with torch.device("meta"):
        real = sum(p.numel() for p in AutoModelForSequenceClassification.from_config(config).parameters())
    assert real - footprint(EXTRA_CONFIGS["deberta-v3-base"], "full").total_params == 1536


def test_minilm_config_counts_the_shipped_minilm_parameters():
    from companion.models import load_minilm_classifier

    model = load_minilm_classifier(num_labels=2)[0]
    planned = footprint(EXTRA_CONFIGS["all-minilm-l6-v2"], "full").total_params
    assert sum(p.numel() for p in model.parameters()) == planned


def test_training_costs_three_forward_passes_full_two_with_adapters_one_more_with_checkpointing():
    big = dict(model="llama-2-7b", compute_dtype="float16", batch_size=8, seq_len=512, steps=10)  # compute-bound
    full, lora = Run("", method="full", **big).seconds(), Run("", method="lora", **big).seconds()
    checkpointed = Run("", method="lora", gradient_checkpointing=True, **big).seconds()
    assert full / lora == pytest.approx(3 / 2) and checkpointed / lora == pytest.approx(3 / 2)
    body, head = matmul_params("llama-2-7b")
    forward = 2 * (body + head) + 2 * 32 * 512 * 4096  # Kaplan et al. 2020, Table 1
    assert lora == pytest.approx(10 * 8 * 512 * 2 * forward / (MFU * 65e12))


def test_a_tiny_model_is_bounded_by_the_launch_floor_and_float32_by_its_own_peak():
    tiny = Run("", "all-minilm-l6-v2", "lora", "float32", batch_size=1, seq_len=8, steps=100)
    assert tiny.seconds() == pytest.approx(100 * 3 * 6 * LAYER_PASS_S)
    half = Run("", "llama-2-7b", "lora", "float16", batch_size=8, seq_len=512, steps=1)
    single = Run("", "llama-2-7b", "lora", "float16", batch_size=8, seq_len=512, steps=1, matmul_dtype="float32")
    assert single.seconds() / half.seconds() == pytest.approx(65 / 8.1)


def test_estimate_adds_times_takes_the_largest_peak_and_refuses_an_empty_plan():
    a = Run("a", "roberta-base", "lora", "float32", batch_size=32, seq_len=64, steps=100)
    b = Run("b", "roberta-base", "lora", "float32", batch_size=8, seq_len=64, steps=100)
    est = estimate([a, b])
    assert est.peak_gb == a.peak_bytes() / 1e9 and est.minutes == pytest.approx((a.seconds() + b.seconds()) / 60)
    with pytest.raises(ValueError, match="at least one Run"):
        estimate([])
    assert Estimate(0.46, 0.2).line() == "T4 estimate (gpu defaults): peak 0.5 GB, under 1 min"
    assert Estimate(9.84, 24.4).line("these parameters") == "T4 estimate (these parameters): peak 9.8 GB, 24 min"


def test_unknown_notebook_and_model_say_what_exists():
    with pytest.raises(ValueError, match="plans exist for"):
        plan("ch99_nothing")
    with pytest.raises(ValueError, match="add it to EXTRA_CONFIGS"):
        model_config("gpt-5")


def test_notebook_parameters_evaluates_arithmetic_on_literals(tmp_path):
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]},
                     "source": ['PROFILE = "ci"  # a: b\n', "PAGE = 64 * 1024\n", "SHARE = 1 / 8\n",
                                "SEEDS = (0, 1)\n"]}]}
    path = tmp_path / "x.ipynb"
    path.write_text(json.dumps(nb))
    assert notebook_parameters(path) == {"PROFILE": "ci", "PAGE": 65536, "SHARE": 0.125, "SEEDS": (0, 1)}
    assert math.isclose(notebook_parameters(ROOT / "notebooks" / "ch04_paged_optimizers.ipynb")["BUDGET_SHARE"], 1 / 8)
