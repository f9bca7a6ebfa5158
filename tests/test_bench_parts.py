"""companion.bench in parts and on a GPU: a comparison run one method at a time (one notebook cell each)
joins into exactly the comparison run at once; the gpu profile's model follows its task, and a model that
does not fit the task is refused before anything loads; the gpu configuration scales with its length."""

import dataclasses

import pytest
import torch
from pandas.testing import assert_frame_equal
from tiny_models import separable, tiny_bert
from torch.utils.data import DataLoader

from companion.bench import (METHODS, TASK_MODELS, BenchConfig, BenchResults, Task, ci_config, gpu_config,
                             instruction_task, run_benchmark, task_model)
from companion.measure import load_in_4bit
from companion.profiles import Profile
from companion.qlora import keep_dequantize_kernel_on_cpu
from companion.train import classification_accuracy

CONFIG = BenchConfig(max_steps=6, eval_every=3, tinit=2, tfinal=2, deltaT=1, seeds=(0, 1))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_task():
    loaders = {"train": DataLoader(separable(64, 0), batch_size=8, shuffle=True, generator=torch.Generator()),
               "validation": DataLoader(separable(16, 1), batch_size=16),
               "test": DataLoader(separable(16, 2), batch_size=16)}

    def load(seed, quantized):
        if quantized:
            return keep_dequantize_kernel_on_cpu(load_in_4bit(tiny_bert(seed), compute_dtype=torch.float32,
                                                              skip_modules=["classifier"]))
        return tiny_bert(seed)

    return Task("tiny", "2-layer BERT on separable tokens", load, loaders,
                lambda model, split: classification_accuracy(model, loaders[split]), ("query", "value"),
                ("classifier",), torch.device("cpu"))


def without_time(frame):
    return frame.drop(columns=[c for c in ("seconds_per_step",) if c in frame]).reset_index(drop=True)


def test_a_comparison_run_one_method_at_a_time_joins_into_the_whole_run():
    task = tiny_task()
    whole = run_benchmark(task, CONFIG)
    joined = BenchResults.concat([run_benchmark(task, CONFIG, methods=[m]) for m in METHODS])
    assert_frame_equal(without_time(joined.runs), without_time(whole.runs))
    assert_frame_equal(joined.curves, whole.curves)
    assert_frame_equal(joined.losses, whole.losses)
    assert joined.ranks == whole.ranks and set(joined.ranks) == {"adalora", "qlora-adalora"}
    assert joined.meta["config"] == whole.meta["config"]


def test_a_part_still_checks_the_budgets_of_every_method():
    with pytest.raises(ValueError, match="unequal trainable budgets"):
        run_benchmark(tiny_task(), BenchConfig(seeds=(0,), max_steps=8, tinit=2, tfinal=2, deltaT=2,
                                               ranks={"lora": 8}), methods=["full"])
    with pytest.raises(ValueError, match="not in config.methods"):
        run_benchmark(tiny_task(), BenchConfig(methods=("full", "lora"), seeds=(0,)), methods=["adalora"])


def test_concat_refuses_repeated_runs_and_different_configurations():
    part = run_benchmark(tiny_task(), BenchConfig(methods=("lora",), seeds=(0,), max_steps=2, eval_every=2))
    with pytest.raises(ValueError, match="repeated"):
        BenchResults.concat([part, part])
    other = BenchResults(part.runs.assign(method="full"), part.curves, part.losses, {},
                         {**part.meta, "config": {**part.meta["config"], "max_steps": 3}})
    with pytest.raises(ValueError, match="different tasks or configurations"):
        BenchResults.concat([part, other])
    with pytest.raises(ValueError, match="at least one"):
        BenchResults.concat([])


@pytest.mark.parametrize("task, default", [("sst2", "deberta-v3-base"), ("mnli", "deberta-v3-base"),
                                           ("instructions", "qwen2.5-0.5b")])
def test_the_gpu_model_defaults_to_the_task_s_own(task, default):
    assert task_model(task) == task_model(task, None) == default
    assert all(task_model(task, m) == m for m in TASK_MODELS[task])


@pytest.mark.parametrize("task, model", [("instructions", "deberta-v3-base"), ("instructions", "roberta-base"),
                                         ("sst2", "qwen2.5-0.5b"), ("mnli", "tinyllama-1.1b")])
def test_a_model_that_does_not_fit_the_task_is_refused_with_the_ones_that_do(task, model):
    with pytest.raises(ValueError, match=f"does not fit task '{task}'.*{TASK_MODELS[task][0]}"):
        task_model(task, model)


def test_the_instruction_task_refuses_an_encoder_before_loading_anything():
    gpu = Profile("gpu", torch.device("cpu"), torch.float16, 0)  # the check comes before any hub access
    with pytest.raises(ValueError, match="cannot generate"):
        instruction_task(gpu, model="deberta-v3-base")


@pytest.mark.parametrize("task", ["sst2", "mnli", "instructions"])
@pytest.mark.parametrize("max_steps", [300, 1000])
def test_the_gpu_configuration_keeps_its_shape_at_any_length(task, max_steps):
    config = gpu_config(task, max_steps=max_steps)
    assert (config.r, config.init_r, config.seeds) == (8, 12, (0, 1, 2))
    assert (config.tinit, config.tfinal) == (max_steps // 10, 3 * max_steps // 10)
    assert max_steps // config.eval_every == 6
    with pytest.raises(ValueError, match="unknown task"):
        gpu_config("cola")



def test_dynamic_padding_cuts_a_batch_to_its_longest_row_and_changes_no_logit():
    from companion.bench.tasks import trim_padding

    ids = torch.tensor([[1, 7, 8, 0, 0, 0], [2, 9, 0, 0, 0, 0]])  # (2, 6), right-padded to the split's longest
    rows = [{"input_ids": i, "attention_mask": (i > 0).long(), "labels": torch.tensor(k)} for k, i in enumerate(ids)]
    batch = trim_padding(rows)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 3) and batch["labels"].tolist() == [0, 1]
    model = tiny_bert().eval()
    padded = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}
    torch.testing.assert_close(model(**{k: batch[k] for k in padded}).logits, model(**padded).logits)
    left = [{**r, "attention_mask": r["attention_mask"].flip(0)} for r in rows]
    with pytest.raises(ValueError, match="right-padded"):
        trim_padding(left)


def test_the_notebook_s_ci_comparison_is_the_default_one_cut_to_60_steps():
    config = ci_config()
    assert dataclasses.replace(config, max_steps=80, tfinal=20) == BenchConfig()  # nothing else differs
    assert (config.max_steps, config.max_steps - config.tinit - config.tfinal) == (60, 38)  # 38 budgeting steps
