"""AdaLoraCallback in a real transformers Trainer: ranks change with it and not without it, a schedule that
is not the run's is refused at train begin, and a checkpoint resumes the allocation exactly."""

import shutil

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from tiny_models import tiny_bert
from companion.adalora import AdaLoraCallback, RankAllocator, SeedMatrixScorer, inject_adalora, ranks_from_peft
from companion.adalora.callback import STATE_NAME
from companion.data import TensorDictDataset

TARGETS = ["query", "value", "intermediate.dense"]
STEPS = 12
SCHEDULE = dict(target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=STEPS)


def dataset(n=96):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (n, 8), generator=g)
    return TensorDictDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                              "labels": (ids[:, 0] > 30).long()})


def train(model, callbacks, tmp_path, grad_accum=1):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
                             gradient_accumulation_steps=grad_accum, learning_rate=2e-2, report_to="none",
                             save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks).train()


def peft_model():
    return get_peft_model(tiny_bert(), AdaLoraConfig(task_type="SEQ_CLS", init_r=4, target_modules=TARGETS,
                                                     **SCHEDULE))


def nonzero_lambdas(model):
    return {n: int(torch.count_nonzero(p)) for n, p in model.named_parameters() if "lora_E" in n}


def test_without_the_callback_peft_silently_trains_at_init_r(tmp_path):
    model = peft_model()
    train(model, [], tmp_path)
    assert model.peft_config["default"].rank_pattern is None
    assert set(nonzero_lambdas(model).values()) == {4}  # every matrix still has rank init_r = 4
    with pytest.raises(ValueError, match="update_and_allocate"):
        ranks_from_peft(model.peft_config["default"].rank_pattern)


def test_with_the_callback_ranks_move_to_the_target_budget(tmp_path):
    model = peft_model()
    callback = AdaLoraCallback(model)
    train(model, [callback], tmp_path, grad_accum=2)
    assert callback.calls == STEPS  # once per optimizer step, not per micro-batch
    ranks = ranks_from_peft(model.peft_config["default"].rank_pattern)
    assert sum(ranks.values()) == 2 * len(ranks)  # b(T) = target_r x 6 matrices
    assert sorted(nonzero_lambdas(model).values()) == sorted(ranks.values())
    assert set(ranks.values()) != {2}  # ranks were re-distributed, not cut evenly


def test_the_same_callback_drives_the_companion_allocator(tmp_path):
    model = inject_adalora(tiny_bert(), TARGETS, init_r=4, trainable_modules=("classifier",))
    allocator = RankAllocator(model, **SCHEDULE)
    train(model, [AdaLoraCallback(allocator)], tmp_path)
    assert sum(allocator.ranks().values()) == 2 * 6
    assert allocator.history[-1]["step"] == STEPS - SCHEDULE["tfinal"]


@pytest.mark.parametrize("peft", [True, False])
@pytest.mark.parametrize("total_step, message", [
    (50, "total_step=50 does not match the training loop's max_steps=12 .*never frozen"),
    (STEPS * 2, "total_step=24 .*grad_accum=2 .*counts micro-batches.*set total_step=12"),
])
def test_a_total_step_other_than_max_steps_is_refused_before_the_first_step(peft, total_step, message, tmp_path):
    schedule = SCHEDULE | dict(total_step=total_step)
    if peft:
        model = get_peft_model(tiny_bert(), AdaLoraConfig(task_type="SEQ_CLS", init_r=4, target_modules=TARGETS,
                                                          **schedule))
        callback = AdaLoraCallback(model)
    else:
        model = inject_adalora(tiny_bert(), TARGETS, init_r=4, trainable_modules=("classifier",))
        callback = AdaLoraCallback(RankAllocator(model, **schedule))
    with pytest.raises(ValueError, match=message):
        train(model, [callback], tmp_path, grad_accum=2)
    assert callback.calls == 0


def test_a_wrong_object_is_refused():
    with pytest.raises(TypeError, match="AdaLoraCallback needs a PEFT AdaLoRA model"):
        AdaLoraCallback(tiny_bert())


# ------------------------------------------------------------------ checkpoints and resume
def trainer(model, callbacks, out, save_steps=None):
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=2e-2,
                             report_to="none", save_strategy="steps" if save_steps else "no",
                             save_steps=save_steps or 500, logging_strategy="no", use_cpu=True, disable_tqdm=True,
                             seed=0)
    return Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)


def companion_run():
    model = inject_adalora(tiny_bert(), TARGETS, init_r=4, trainable_modules=("classifier",))
    return model, RankAllocator(model, **SCHEDULE)


def lambdas(model):
    return [p.detach() for n, p in model.named_parameters() if "lora_E" in n]


@pytest.fixture(scope="module")
def companion_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("companion")
    model, allocator = companion_run()
    trainer(model, [AdaLoraCallback(allocator)], out, save_steps=1).train()
    return out, model, allocator


@pytest.mark.parametrize("k", [2, 5, 10])  # warm-up, budgeting, final phase
def test_trainer_resumed_from_a_checkpoint_restores_the_companion_allocator_bit_for_bit(k, companion_checkpoints):
    out, straight, straight_allocator = companion_checkpoints
    model, allocator = companion_run()
    callback = AdaLoraCallback(allocator)
    trainer(model, [callback], out).train(resume_from_checkpoint=str(out / f"checkpoint-{k}"))
    assert callback.calls == STEPS - k and allocator.step == STEPS
    assert all(torch.equal(a, b) for a, b in zip(lambdas(model), lambdas(straight)))
    assert allocator.history == straight_allocator.history and allocator.ranks() == straight_allocator.ranks()


def test_a_resume_without_the_allocator_state_is_refused(companion_checkpoints, tmp_path):
    out, _, _ = companion_checkpoints
    checkpoint = tmp_path / "checkpoint-5"
    shutil.copytree(out / "checkpoint-5", checkpoint)
    (checkpoint / STATE_NAME).unlink()  # as written by a Trainer without AdaLoraCallback
    model, allocator = companion_run()
    callback = AdaLoraCallback(allocator)
    with pytest.raises(ValueError, match="resumes at global_step=5, but there is no AdaLoRA allocator state at "
                                         ".*checkpoint-5/adalora_allocator.pt"):
        trainer(model, [callback], tmp_path).train(resume_from_checkpoint=str(checkpoint))
    assert callback.calls == 0


def test_a_second_run_from_step_0_with_an_allocator_or_peft_model_that_already_ran_is_refused(tmp_path):
    model, allocator = companion_run()
    trainer(model, [AdaLoraCallback(allocator)], tmp_path).train()
    with pytest.raises(ValueError, match="RankAllocator has already done 12 steps .*resume_from_checkpoint"):
        trainer(model, [AdaLoraCallback(allocator)], tmp_path).train()
    peft = peft_model()
    trainer(peft, [AdaLoraCallback(peft)], tmp_path).train()
    with pytest.raises(ValueError, match="PEFT AdaLoRA model already has a rank pattern"):
        trainer(peft, [AdaLoraCallback(peft)], tmp_path).train()


def test_a_scorer_that_cannot_be_saved_is_refused_when_the_trainer_saves_checkpoints(tmp_path):
    model = inject_adalora(tiny_bert(), TARGETS, init_r=4, trainable_modules=("classifier",))
    callback = AdaLoraCallback(RankAllocator(model, scorer=SeedMatrixScorer(), **SCHEDULE))
    with pytest.raises(TypeError, match="SeedMatrixScorer has no state_dict"):
        trainer(model, [callback], tmp_path, save_steps=4).train()
    assert callback.calls == 0


class EmaProbe(TrainerCallback):
    """PEFT's importance EMAs after each allocation step (runs after AdaLoraCallback)."""

    def __init__(self, model):
        self.allocator, self.sums = model.base_model.rankallocator, {}

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sums[state.global_step] = sum(t.double().sum().item() for t in self.allocator.exp_avg_ipt.values())


def test_a_peft_model_resumed_in_warm_up_gets_its_importance_emas_back(tmp_path):
    """PEFT saves the adapter, not its RankAllocator's EMAs: the callback saves and restores them."""
    straight = peft_model()
    straight_probe = EmaProbe(straight)
    trainer(straight, [AdaLoraCallback(straight), straight_probe], tmp_path, save_steps=2).train()
    resumed = peft_model()
    probe = EmaProbe(resumed)
    trainer(resumed, [AdaLoraCallback(resumed), probe], tmp_path).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert probe.sums == {s: v for s, v in straight_probe.sums.items() if s >= 2} and probe.sums[2] > 0
    assert all(torch.equal(a, b) for a, b in zip(lambdas(resumed), lambdas(straight)))
    after_first_allocation = peft_model()  # step 3 masked; PEFT saved checkpoint-4 cut to its rank pattern
    with pytest.raises(RuntimeError, match="size mismatch for .*lora_A.default"):
        trainer(after_first_allocation, [AdaLoraCallback(after_first_allocation)], tmp_path).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    (tmp_path / "checkpoint-2" / STATE_NAME).unlink()
    unsaved = peft_model()
    with pytest.raises(ValueError, match="no AdaLoRA allocator state .*importance EMAs and the rank pattern would "
                                         "restart from zero"):
        trainer(unsaved, [AdaLoraCallback(unsaved)], tmp_path).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
