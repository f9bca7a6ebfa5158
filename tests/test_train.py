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


def tiny_causal_lm(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def uneven_label_batches():
    """Four sequences; the first two keep 3 and 4 label tokens, the last two all 12 (robustness-2 case)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (4, 12), generator=g)
    labels = ids.clone()
    labels[0, 3:] = -100
    labels[1, 4:] = -100
    return ids, labels


def one_sgd_step(model, batches, config):
    import copy

    model = copy.deepcopy(model)
    train(model, batches, torch.optim.SGD(model.parameters(), lr=1.0), config)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_gradient_accumulation_normalises_by_the_label_tokens_of_the_whole_accumulated_batch():
    base = tiny_causal_lm()
    ids, labels = uneven_label_batches()
    split = [{"input_ids": ids[i:i + 2], "labels": labels[i:i + 2]} for i in (0, 2)]
    common = dict(max_steps=1, max_grad_norm=None, eval_every=0, progress=False)
    big = one_sgd_step(base, [{"input_ids": ids, "labels": labels}], TrainConfig(**common))
    accumulated = one_sgd_step(base, split, TrainConfig(grad_accum=2, **common))
    mean_of_means = one_sgd_step(base, split, TrainConfig(grad_accum=2, loss_normalization="micro_batch", **common))
    start = torch.cat([p.detach().flatten() for p in base.parameters()])
    update = (big - start).abs().max()
    torch.testing.assert_close(accumulated, big, atol=1e-6 * float(update), rtol=0)
    # the per-micro-batch mean is a different update here, by a large fraction of the update itself
    assert (mean_of_means - big).abs().max() > 0.1 * update


def test_a_short_last_batch_in_an_accumulated_step_weighs_by_its_examples():
    big = separable_batches(1, 8)
    short = [{k: v[:7] for k, v in big[0].items()}, {k: v[7:] for k, v in big[0].items()}]  # 7 + 1 examples
    torch.manual_seed(0)
    a, b = Classifier(), Classifier()
    b.load_state_dict(a.state_dict())
    train(a, big, torch.optim.SGD(a.parameters(), lr=0.1), TrainConfig(max_steps=1, progress=False))
    train(b, short, torch.optim.SGD(b.parameters(), lr=0.1), TrainConfig(max_steps=1, grad_accum=2, progress=False))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_loss_items_counts_shifted_label_tokens_of_a_causal_lm_also_inside_peft_and_examples_of_a_classifier():
    from peft import LoraConfig, get_peft_model

    from companion.train import loss_items

    _, labels = uneven_label_batches()  # rows keep 3, 4, 12, 12 labels; the shift drops position 0 of each row
    model = tiny_causal_lm()
    assert loss_items(model, labels) == 2 + 3 + 11 + 11
    assert loss_items(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])), labels) == 27
    assert loss_items(Classifier(), torch.tensor([0, 1, -100, 1])) == 3


def test_a_micro_batch_with_no_label_to_predict_adds_nothing_and_an_empty_step_is_refused():
    base = tiny_causal_lm()
    ids, labels = uneven_label_batches()
    masked = labels.clone()
    masked[:2] = -100
    common = dict(max_steps=1, max_grad_norm=None, eval_every=0, progress=False)
    only_second = one_sgd_step(base, [{"input_ids": ids[2:], "labels": labels[2:]}], TrainConfig(**common))
    with_empty = one_sgd_step(base, [{"input_ids": ids[:2], "labels": masked[:2]},
                                     {"input_ids": ids[2:], "labels": labels[2:]}], TrainConfig(grad_accum=2, **common))
    assert torch.isfinite(with_empty).all()
    torch.testing.assert_close(with_empty, only_second)
    with pytest.raises(ValueError, match="none of its 1 micro-batch.*has a label to predict"):
        one_sgd_step(base, [{"input_ids": ids[:2], "labels": masked[:2]}], TrainConfig(**common))
    with pytest.raises(ValueError, match="has no 'labels'"):
        one_sgd_step(base, [{"input_ids": ids}], TrainConfig(**common))
    with pytest.raises(ValueError, match="loss_normalization must be one of"):
        TrainConfig(loss_normalization="tokens")


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


def test_trainer_with_gradient_accumulation_normalises_like_the_loop(tmp_path):
    """Both sides divide by the label tokens of the whole accumulated batch (Trainer: num_items_in_batch)."""
    import copy

    from transformers import Trainer

    from companion.models import build_tiny_llama
    from companion.train import qlora_training_arguments

    data = instruction_dataset()  # answers of different lengths: micro-batches hold different label counts
    ours = build_tiny_llama(seed=0)
    theirs = copy.deepcopy(ours)
    train(ours, torch.utils.data.DataLoader(data, batch_size=4, shuffle=False), torch.optim.SGD(ours.parameters(), lr=1.0),
          TrainConfig(max_steps=2, grad_accum=4, max_grad_norm=None, progress=False))
    args = qlora_training_arguments(tmp_path, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=4,
                                    learning_rate=1.0, optim="sgd", warmup_steps=0, lr_scheduler_type="constant",
                                    max_grad_norm=0.0, shuffle=False)
    Trainer(model=theirs, args=args, train_dataset=data).train()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


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
