"""AdaLoraCallback in a real transformers Trainer: ranks change with it and not without it."""

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from tiny_models import tiny_bert
from companion.adalora import AdaLoraCallback, RankAllocator, inject_adalora, ranks_from_peft
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


def test_a_mismatched_total_step_warns_and_a_wrong_object_is_refused(tmp_path):
    model = get_peft_model(tiny_bert(), AdaLoraConfig(task_type="SEQ_CLS", init_r=4, target_modules=TARGETS,
                                                      **(SCHEDULE | dict(total_step=50))))
    with pytest.warns(UserWarning, match="total_step is 50 but the Trainer will run 12"):
        train(model, [AdaLoraCallback(model)], tmp_path)
    with pytest.raises(TypeError, match="AdaLoraCallback needs a PEFT AdaLoRA model"):
        AdaLoraCallback(tiny_bert())
