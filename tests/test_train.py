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


def test_evaluation_runs_every_eval_every_steps_and_at_the_end():
    model = Classifier()
    log = train(model, separable_batches(2, 4), torch.optim.SGD(model.parameters(), lr=0.1),
                TrainConfig(max_steps=7, eval_every=3, progress=False), evaluate=lambda m: {"x": 1.0})
    assert log.eval_frame()["step"].tolist() == [3, 6, 7]


def test_bad_loop_settings_are_refused():
    with pytest.raises(ValueError, match="max_steps must be positive"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="grad_accum must be positive"):
        TrainConfig(grad_accum=0)
