import pytest
import torch

from companion.train import TrainConfig, classification_accuracy, train


class Classifier(torch.nn.Module):
    """A tiny model with the transformers calling convention: model(**batch).loss / .logits."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x, labels=None):
        logits = self.linear(x)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return type("Out", (), {"logits": logits, "loss": loss})()


def separable_batches(n_batches, batch_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch_size, 4, generator=g)
        out.append({"x": x, "labels": (x[:, 0] > 0).long()})
    return out


def test_training_reduces_the_loss_and_logs_every_step():
    torch.manual_seed(0)
    model = Classifier()
    data = separable_batches(8, 16)
    log = train(model, data, torch.optim.SGD(model.parameters(), lr=0.5),
                TrainConfig(max_steps=40, progress=False),
                evaluate=lambda m: {"accuracy": classification_accuracy(m, data)})
    df = log.frame()
    assert list(df["step"]) == list(range(1, 41))
    assert df["loss"].iloc[-5:].mean() < 0.5 * df["loss"].iloc[:5].mean()
    assert log.eval_frame()["step"].tolist() == [40] and log.evals[-1]["accuracy"] > 0.9
    assert (df["peak_memory_bytes"] > 0).all() and (df["seconds"] > 0).all()


def test_gradient_accumulation_equals_one_big_batch():
    big = separable_batches(1, 8)
    small = [{k: v[:4] for k, v in big[0].items()}, {k: v[4:] for k, v in big[0].items()}]
    torch.manual_seed(0)
    a = Classifier()
    b = Classifier()
    b.load_state_dict(a.state_dict())
    train(a, big, torch.optim.SGD(a.parameters(), lr=0.1), TrainConfig(max_steps=1, progress=False))
    train(b, small, torch.optim.SGD(b.parameters(), lr=0.1),
          TrainConfig(max_steps=1, grad_accum=2, progress=False))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_hooks_see_gradients_after_backward_and_after_the_optimizer_step():
    torch.manual_seed(0)
    model = Classifier()
    seen = []

    def after_backward(step, m):
        seen.append(("backward", step, m.linear.weight.grad is not None))

    def after_step(step, m):  # AdaLoRA's update_and_allocate runs here and reads p.grad
        seen.append(("step", step, m.linear.weight.grad is not None))

    train(model, separable_batches(2, 4), torch.optim.SGD(model.parameters(), lr=0.1),
          TrainConfig(max_steps=2, eval_every=1, progress=False),
          after_backward=after_backward, after_step=after_step)
    assert seen == [("backward", 1, True), ("step", 1, True), ("backward", 2, True), ("step", 2, True)]


def test_step_context_wraps_only_its_step_including_the_hooks():
    events = []

    class Probe:
        def __init__(self, step):
            self.step = step

        def __enter__(self):
            events.append(("enter", self.step))

        def __exit__(self, *exc):
            events.append(("exit", self.step))

    model = Classifier()
    train(model, separable_batches(3, 4), torch.optim.SGD(model.parameters(), lr=0.1),
          TrainConfig(max_steps=3, progress=False), after_step=lambda step, m: events.append(("hook", step)),
          step_context=lambda step: Probe(step) if step == 2 else None)
    assert events == [("hook", 1), ("enter", 2), ("hook", 2), ("exit", 2), ("hook", 3)]


def test_evaluation_runs_every_eval_every_steps_and_at_the_end():
    model = Classifier()
    log = train(model, separable_batches(2, 4), torch.optim.SGD(model.parameters(), lr=0.1),
                TrainConfig(max_steps=7, eval_every=3, progress=False), evaluate=lambda m: {"x": 1.0})
    assert log.eval_frame()["step"].tolist() == [3, 6, 7]


def test_a_run_split_over_two_calls_equals_the_straight_run_and_keeps_its_step_numbers():
    data = separable_batches(10, 4)
    torch.manual_seed(0)
    a, b = Classifier(), Classifier()
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = torch.optim.Adam(a.parameters(), lr=0.1), torch.optim.Adam(b.parameters(), lr=0.1)
    train(a, data, opt_a, TrainConfig(max_steps=5, grad_accum=2, eval_every=2, progress=False))
    first = train(b, data, opt_b, TrainConfig(max_steps=5, grad_accum=2, stop_after_step=2, progress=False),
                  evaluate=lambda m: {"x": 1.0})
    second = train(b, data[4:], opt_b, TrainConfig(max_steps=5, grad_accum=2, resume_from_step=2, eval_every=2,
                                                    progress=False), evaluate=lambda m: {"x": 1.0})
    assert first.frame()["step"].tolist() == [1, 2] and first.eval_frame()["step"].tolist() == [2]
    assert second.frame()["step"].tolist() == [3, 4, 5] and second.eval_frame()["step"].tolist() == [4, 5]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_train_asks_a_hooks_object_whether_the_loop_fits_before_the_first_step():
    class Schedule:
        def __init__(self):
            self.seen, self.steps = [], []

        def check_run(self, **loop):
            self.seen.append(loop)
            if loop["max_steps"] != 3:
                raise ValueError("total_step=3 does not match max_steps")

        def after_step(self, step, model):
            self.steps.append(step)

    hook = Schedule()
    model = Classifier()
    before = model.linear.weight.detach().clone()
    with pytest.raises(ValueError, match="total_step=3 does not match max_steps"):
        train(model, separable_batches(2, 4), torch.optim.SGD(model.parameters(), lr=0.1),
              TrainConfig(max_steps=4, grad_accum=2, progress=False), after_step=hook.after_step)
    assert hook.seen == [dict(max_steps=4, grad_accum=2, resume_from_step=0)] and hook.steps == []
    assert torch.equal(model.linear.weight, before)
    train(model, separable_batches(2, 4), torch.optim.SGD(model.parameters(), lr=0.1),
          TrainConfig(max_steps=3, resume_from_step=1, progress=False), after_step=hook.after_step)
    assert hook.seen[-1] == dict(max_steps=3, grad_accum=1, resume_from_step=1) and hook.steps == [2, 3]


def test_bad_loop_settings_are_refused():
    with pytest.raises(ValueError, match="max_steps must be positive"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="grad_accum must be positive"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match=r"resume_from_step must lie in \[0, max_steps = 5\), got 5"):
        TrainConfig(max_steps=5, resume_from_step=5)
    with pytest.raises(ValueError, match=r"stop_after_step must lie in \(resume_from_step, max_steps\] = \(2, 5\]"):
        TrainConfig(max_steps=5, resume_from_step=2, stop_after_step=2)


# ------------------------------------------------------------------ the transformers.Trainer recipe
def instruction_dataset(n=32):
    from companion.data import TensorDictDataset, encode_instructions, make_instruction_splits
    from companion.models import char_tokenizer

    split = make_instruction_splits(seed=0, n_train=n, n_test=12, families=["add", "count_letters"])
    return TensorDictDataset(encode_instructions(split["train"], char_tokenizer()))


def test_trainer_recipe_reproduces_the_loop_step_for_step(tmp_path):
    import copy

    from transformers import Trainer

    from companion.models import build_tiny_llama
    from companion.train import TrainerLog, qlora_training_arguments

    data = instruction_dataset()
    ours = build_tiny_llama(seed=0)
    theirs = copy.deepcopy(ours)
    log = train(ours, torch.utils.data.DataLoader(data, batch_size=16, shuffle=False),
                torch.optim.AdamW(ours.parameters(), lr=1e-3, weight_decay=0.0),
                TrainConfig(max_steps=4, max_grad_norm=0.3, progress=False))
    recorder = TrainerLog()
    args = qlora_training_arguments(tmp_path, max_steps=4, per_device_train_batch_size=16, learning_rate=1e-3,
                                    optim="adamw_torch", warmup_steps=0, logging_steps=1, shuffle=False)
    Trainer(model=theirs, args=args, train_dataset=data, callbacks=[recorder]).train()
    trainer_log = recorder.log.frame()
    assert trainer_log["step"].tolist() == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(trainer_log["loss"].tolist()), torch.tensor(log.frame()["loss"].tolist()),
                               atol=1e-5, rtol=0)  # the Trainer logs rounded float32 losses
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)


def test_paged_adamw_8bit_recipe_builds_bitsandbytes_paged_8bit_adamw_and_falls_back_on_cpu(tmp_path):
    import bitsandbytes as bnb
    from transformers import Trainer

    from companion.models import build_tiny_llama
    from companion.train import TrainerLog, qlora_training_arguments

    args = qlora_training_arguments(tmp_path, max_steps=2, per_device_train_batch_size=8)
    assert (args.optim, args.lr_scheduler_type, args.max_grad_norm, args.warmup_steps) == \
        ("paged_adamw_8bit", "constant_with_warmup", 0.3, 0.03)
    recorder = TrainerLog()
    trainer = Trainer(model=build_tiny_llama(seed=0), args=args, train_dataset=instruction_dataset(16),
                      callbacks=[recorder])
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
        trainer.train()
    optimizer = trainer.optimizer.optimizer  # accelerate wraps it
    assert isinstance(optimizer, bnb.optim.AdamW) and optimizer.is_paged and optimizer.args.optim_bits == 8
    assert len(recorder.log.steps) == 2


def test_bad_trainer_recipe_settings_are_refused(tmp_path):
    from companion.train import qlora_training_arguments

    with pytest.raises(ValueError, match="max_steps must be positive"):
        qlora_training_arguments(tmp_path, max_steps=0)
