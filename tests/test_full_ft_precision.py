"""Full fine-tuning of a model loaded in 16 bit (companion.bench.precision): plain AdamW on float16
weights turns them NaN and on bfloat16 weights rounds its updates away; mixed precision (float32 master
weights, autocast, dynamic loss scaling for float16) stays finite, learns, and equals the canonical
torch.amp loop bit for bit. Everything runs on a CPU, whose autocast supports both 16-bit dtypes."""

import pytest
import torch
from tiny_models import separable, tiny_bert
from torch.utils.data import DataLoader

from companion.bench import BenchConfig, Task, build_arm, run_one
from companion.bench.precision import compute_dtype_of, mixed_precision_full_finetuning
from companion.train import TrainConfig, classification_accuracy, train

NOTEBOOK_LR = 2e-5  # the full fine-tuning rate of the gpu instruction task in notebooks/ch06_comparison.ipynb


pytestmark = pytest.mark.usefixtures("one_thread")


def loader(n=64, seed=0, batch_size=8):
    return DataLoader(separable(n, seed), batch_size=batch_size)


def weights(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def quiet(steps):
    return TrainConfig(max_steps=steps, eval_every=0, progress=False)


def test_plain_adamw_on_a_float16_model_gives_a_nan_loss_from_the_second_step():
    model = tiny_bert().half()  # the old recipe: weights, gradients and Adam states all in float16
    optimizer = torch.optim.AdamW(model.parameters(), lr=NOTEBOOK_LR)
    losses = train(model, loader(), optimizer, quiet(3)).frame()["loss"]
    assert losses.iloc[0] == pytest.approx(0.69, abs=0.05)  # step 1 starts from the untrained model
    assert losses.iloc[1:].isna().all(), losses.tolist()
    # eps = 1e-8 rounds to 0 in float16: an unused embedding row updates by 0 / 0
    assert torch.isnan(model.bert.embeddings.word_embeddings.weight).any()


def test_plain_adamw_on_a_bfloat16_model_rounds_most_updates_away():
    model = tiny_bert().to(torch.bfloat16)
    before = weights(model)
    train(model, loader(), torch.optim.AdamW(model.parameters(), lr=NOTEBOOK_LR), quiet(3))
    query = "bert.encoder.layer.0.attention.self.query.weight"
    moved = (model.get_parameter(query).float() != before[query]).float().mean().item()
    assert moved < 0.5, f"{moved:.0%} of W_q moved"  # Adam's first steps move every entry by about lr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_precision_moves_every_weight_and_keeps_float32_master_weights(dtype):
    model = tiny_bert().to(dtype)
    before = weights(model)
    run, state = mixed_precision_full_finetuning(model, NOTEBOOK_LR, dtype)
    log = train(run.model, loader(), run.optimizer, quiet(3), after_backward=run.after_backward,
                after_step=run.after_step)
    assert log.frame()["loss"].notna().all() and state.skipped_steps == []
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    query = "bert.encoder.layer.0.attention.self.query.weight"
    change = (model.get_parameter(query) - before[query]).abs()
    assert (change > 0).all() and change.max() <= 3 * NOTEBOOK_LR * 1.01  # Adam moves each entry by <= lr a step


def tiny_task(dtype):
    """The harness's Task interface around the tiny BERT, loaded in ``dtype`` as the gpu causal LMs are."""
    loaders = {"train": DataLoader(separable(64, 0), batch_size=8, shuffle=True, generator=torch.Generator()),
               "validation": loader(32, 1, 32), "test": loader(32, 2, 32)}
    return Task("tiny", "2-layer BERT on separable tokens", lambda seed, quantized: tiny_bert(seed).to(dtype),
                loaders, lambda model, split: classification_accuracy(model, loaders[split]), ("query", "value"),
                ("classifier",), torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_harness_full_fine_tuning_arm_of_a_16_bit_model_is_finite_and_learns(dtype):
    config = BenchConfig(methods=("full",), seeds=(0,), max_steps=32, eval_every=8, target_accuracy=0.9,
                         lr={"full": 3e-3})
    row, curve, losses, _ = run_one("full", 0, tiny_task(dtype), config)
    losses = [r["loss"] for r in losses]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses
    assert row["val_accuracy"] >= 0.9 and row["test_accuracy"] >= 0.9, row


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_harness_trains_a_16_bit_model_on_float32_master_weights_with_a_16_bit_forward(dtype):
    task = tiny_task(dtype)
    run = build_arm("full", task, BenchConfig(methods=("full",), seeds=(0,)), 0)[0]
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}
    assert {p.dtype for group in run.optimizer.param_groups for p in group["params"]} == {torch.float32}
    batch = next(iter(task.loaders["validation"]))
    assert run.model(**batch).logits.dtype == dtype  # autocast: the matrix products run in the 16-bit dtype


def test_a_float32_model_keeps_plain_adamw_in_the_harness():
    run = build_arm("full", tiny_task(torch.float32), BenchConfig(methods=("full",), seeds=(0,)), 0)[0]
    assert run.after_backward is None and run.after_step is None
    assert "forward" not in vars(run.model)  # no autocast wrapper: the ci profile trains as before


def amp_reference(model, batches, lr, dtype, max_grad_norm=1.0, init_scale=2.0**16):
    """The canonical torch.amp loop (PyTorch's AMP recipe, and accelerate's under Trainer(fp16=True))."""
    model.float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, enabled=dtype == torch.float16)
    for batch in batches:
        with torch.autocast("cpu", dtype=dtype):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_precision_equals_the_torch_amp_loop_bit_for_bit(dtype):
    run = mixed_precision_full_finetuning(tiny_bert().to(dtype), 1e-3, dtype)[0]
    train(run.model, loader(), run.optimizer, quiet(8), after_backward=run.after_backward, after_step=run.after_step)
    reference = amp_reference(tiny_bert().to(dtype), list(loader()), 1e-3, dtype)
    ours = dict(run.model.named_parameters())
    for name, p in reference.named_parameters():
        assert torch.equal(ours[name], p), name


def test_an_overflowing_float16_step_is_skipped_and_the_scale_backs_off():
    model = tiny_bert().half()
    run, state = mixed_precision_full_finetuning(model, 1e-3, torch.float16, init_scale=2.0**40)
    before = weights(model)
    train(run.model, loader(), run.optimizer, quiet(1), after_backward=run.after_backward, after_step=run.after_step)
    assert state.skipped_steps == [1]  # 2^40 times a gradient is past float16's 65504
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "a skipped step changed weights"
    assert state.scaler.get_scale() == 2.0**39
    reference = amp_reference(tiny_bert().half(), list(loader())[:1], 1e-3, torch.float16, init_scale=2.0**40)
    assert all(torch.equal(p, before[n]) for n, p in reference.named_parameters())  # GradScaler.step skips it too


def test_compute_dtype_is_read_off_the_loaded_weights():
    assert compute_dtype_of(tiny_bert()) is None
    assert compute_dtype_of(tiny_bert().half()) is torch.float16
    mixed = tiny_bert().half()
    mixed.classifier.to(torch.bfloat16)
    with pytest.raises(ValueError, match="mixes float16 and bfloat16"):
        compute_dtype_of(mixed)
    with pytest.raises(ValueError, match="float16 or torch.bfloat16"):
        mixed_precision_full_finetuning(tiny_bert(), 1e-3, torch.float32)
