"""LoRA/QLoRA -> AdaLoRA: the tutorial's strict=False load moves nothing; lora_to_adalora moves the update exactly."""

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from tiny_models import tiny_bert
from transformers import BertConfig, BertForSequenceClassification

from companion.migrate import adalora_delta_weight, lora_delta_weight, lora_to_adalora, seed_transfer

TARGETS = ["query", "value", "dense"]


def trained_lora(r=4, lora_alpha=8, targets=TARGETS, use_rslora=False, seed=1):
    """A PEFT LoRA classifier whose update is not zero: B and the trained head are random, as after training."""
    config = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=lora_alpha, target_modules=targets, use_rslora=use_rslora)
    model = get_peft_model(tiny_bert(), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def fresh_adalora(init_r=6, targets=TARGETS, base=None, **config):
    config = dict(task_type="SEQ_CLS", init_r=init_r, lora_alpha=8, target_modules=targets, total_step=10) | config
    return get_peft_model(base if base is not None else tiny_bert(), AdaLoraConfig(**config))


def batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 60, (n, 12), generator=g), torch.randint(0, 2, (n,), generator=g)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def lora_layers(model):
    return [m for _, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_the_tutorials_strict_false_load_transfers_no_adapter_weight():
    lora, adalora = trained_lora(targets=["query", "value"]), fresh_adalora(targets=["query", "value"])
    before = adapter_state(adalora)
    report = seed_transfer(lora, adalora)
    lora_keys = [k for k in lora.state_dict() if ".lora_A." in k or ".lora_B." in k]
    adalora_keys = [k for k in adalora.state_dict() if any(f".{p}." in k for p in ("lora_A", "lora_B", "lora_E",
                                                                                      "ranknum"))]
    assert report.lora_adapter_tensors == len(lora_keys) > 0 and report.adapter_tensors_loaded == 0
    assert set(lora_keys) <= set(report.unexpected_keys) and set(report.missing_adapter_keys) == set(adalora_keys)
    assert all(torch.equal(p, before[n]) for n, p in adapter_state(adalora).items())
    assert "loaded: 0" in str(report)
    # What does load by name: the base weights and the trained head (modules_to_save), nothing else.
    head = lora.base_model.model.classifier.modules_to_save["default"]
    base = tiny_bert().eval()
    base.classifier.load_state_dict(head.state_dict())
    assert report.other_tensors_loaded == len(base.state_dict()) + len(head.state_dict())  # + original_module
    ids, _ = batch()
    assert not torch.allclose(logits(lora, ids), logits(base, ids))  # the LoRA adapter did change the model
    assert torch.equal(logits(adalora, ids), logits(base, ids))  # lora_E = 0: base model + LoRA's head, no adapter


@pytest.mark.parametrize("r, lora_alpha, use_rslora, init_r", [(4, 8, False, 6), (2, 16, True, 2), (3, 4, False, 12)])
def test_migrated_adalora_merges_to_the_lora_weights_and_gives_the_same_outputs(r, lora_alpha, use_rslora, init_r):
    lora, adalora = trained_lora(r, lora_alpha, use_rslora=use_rslora), fresh_adalora(init_r, lora_alpha=32)
    table = lora_to_adalora(lora, adalora)
    layers = table[table["kind"] == "lora"]
    assert len(layers) == sum(1 for n, _ in lora.named_modules() if n.endswith(".lora_A")) > 0
    delta_scale = max(float(lora_delta_weight(m).abs().max()) for m in lora_layers(lora))
    assert (layers["max abs diff"] < 1e-6 * delta_scale).all()  # PEFT's fp32 updates, before and after
    assert (layers["lora r"] == r).all() and (layers["init_r"] == init_r).all() and (layers["rank of delta"] == r).all()
    assert table.loc[table["kind"] == "modules_to_save", "name"].tolist() == ["classifier"]
    for name, module in adalora.base_model.model.named_modules():
        if hasattr(module, "lora_E"):  # the companion's formula is PEFT's SVDLinear.get_delta_weight
            assert torch.equal(adalora_delta_weight(module), module.get_delta_weight("default"))
    ids, _ = batch()
    out_lora, out_adalora = logits(lora, ids), logits(adalora, ids)
    # fp32 adapters: only the summation order differs, so ~1e-6 of the output's size
    assert torch.allclose(out_adalora, out_lora, rtol=0, atol=1e-6 * float(out_lora.abs().max()))
    merged_lora, merged_adalora = lora.merge_and_unload().state_dict(), adalora.merge_and_unload().state_dict()
    assert merged_lora.keys() == merged_adalora.keys()
    for key, weight in merged_lora.items():  # W0 + Delta in fp32: within 1e-6 of the weight's magnitude
        assert torch.allclose(merged_adalora[key], weight, rtol=0, atol=1e-6 * float(weight.abs().max())), key


def test_migration_on_a_4bit_nf4_base_keeps_delta_weights_and_outputs():
    from peft import prepare_model_for_kbit_training

    from companion.measure import load_in_4bit
    from companion.models import build_tiny_llama
    from companion.qlora import keep_dequantize_kernel_on_cpu

    def base_4bit():  # NF4 + double quantization, fp32 compute; the same weights every time
        model = keep_dequantize_kernel_on_cpu(load_in_4bit(build_tiny_llama(seed=0), compute_dtype=torch.float32))
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    targets = ["q_proj", "v_proj", "down_proj"]
    qlora = get_peft_model(base_4bit(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    ids = torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in qlora.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # a little QLoRA training, so that B is not zero
        qlora(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adalora = get_peft_model(base_4bit(), AdaLoraConfig(init_r=6, lora_alpha=8, target_modules=targets,
                                                        total_step=10, task_type="CAUSAL_LM"))
    table = lora_to_adalora(qlora, adalora)
    assert len(table) == 6 and (table["rank of delta"] == 4).all()
    layers = {n: m for n, m in adalora.base_model.model.named_modules() if hasattr(m, "lora_E")}
    for name, module in qlora.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            with torch.no_grad():  # PEFT's bnb.Linear4bit LoRA update, (out, in)
                delta, migrated = module.get_delta_weight("default"), adalora_delta_weight(layers[name])
            assert delta.abs().max() > 0
            assert torch.allclose(migrated, delta, rtol=0, atol=1e-6 * float(delta.abs().max())), name
    out_qlora, out_adalora = logits(qlora, ids), logits(adalora, ids)
    assert not torch.allclose(out_qlora, logits(base_4bit(), ids))
    assert torch.allclose(out_adalora, out_qlora, rtol=0, atol=2e-6 * float(out_qlora.abs().max()))


def test_extra_triplets_have_zero_singular_values_and_orthonormal_vectors():
    r, init_r = 2, 8
    lora, adalora = trained_lora(r), fresh_adalora(init_r)
    lora_to_adalora(lora, adalora)
    eye = torch.eye(init_r)
    for name, m in adalora.base_model.model.named_modules():
        if not hasattr(m, "lora_E"):
            continue
        E, P, Q = m.lora_E["default"].detach().view(-1), m.lora_B["default"].detach(), m.lora_A["default"].detach()
        assert (E[:r] > 0).all() and E[r:].abs().max() < 1e-12 * E[:r].max(), name  # float64 SVD of a rank-r matrix
        assert torch.allclose(P.T @ P, eye, atol=1e-6) and torch.allclose(Q @ Q.T, eye, atol=1e-6), name
    ids, labels = batch()
    lora.eval(), adalora.eval()
    loss_lora, loss_adalora = lora(input_ids=ids, labels=labels).loss, adalora(input_ids=ids, labels=labels).loss
    # AdaLoRA's loss adds 0.5 * PEFT's orthogonality regulariser, which is ~0 here
    assert torch.allclose(loss_adalora, loss_lora, rtol=0, atol=1e-5)


def train_with_allocation(adalora, steps):
    optimizer = torch.optim.AdamW([p for p in adalora.parameters() if p.requires_grad], lr=1e-3)
    adalora.train()
    losses = []
    for step in range(1, steps + 1):
        ids, labels = batch(seed=step, n=8)
        loss = adalora(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        adalora.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


def kept(adalora):
    pattern = adalora.peft_config["default"].rank_pattern
    assert pattern is not None, "update_and_allocate never allocated"
    return {name: [i for i, keep in enumerate(mask) if keep] for name, mask in pattern.items()}


def test_migrated_model_keeps_training_and_without_orth_regularisation_keeps_the_migrated_ranks():
    r = 2
    lora = trained_lora(r, targets=["query", "value"])
    # tinit=1 warm-up step, budget target_r * layers reached at step total_step - tfinal = 3
    schedule = dict(target_r=r, tinit=1, tfinal=1, deltaT=1, total_step=4, targets=["query", "value"])
    adalora = fresh_adalora(6, orth_reg_weight=0.0, **schedule)
    lora_to_adalora(lora, adalora)
    before = adapter_state(adalora)
    losses = train_with_allocation(adalora, 4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(p, before[n]) for n, p in adapter_state(adalora).items())
    # the extra triplets (lambda = 0, no task gradient on P and Q) are pruned first
    assert all(ranks == list(range(r)) for ranks in kept(adalora).values()), kept(adalora)


def test_peft_orth_regulariser_gives_the_extra_triplets_gradient_at_an_orthonormal_start():
    lora = trained_lora(2, targets=["query", "value"])
    grads = {}
    for weight in (0.0, 0.5):
        adalora = fresh_adalora(6, targets=["query", "value"], orth_reg_weight=weight)
        lora_to_adalora(lora, adalora)
        ids, labels = batch()
        adalora(input_ids=ids, labels=labels).loss.backward()
        grads[weight] = max(float(p.grad[2:].abs().max()) for n, p in adalora.named_parameters() if "lora_A" in n)
    # task loss alone: Q rows of lambda ~ 1e-16 triplets get (numerically) no gradient; PEFT's plain
    # Frobenius norm has a kink at Q Q^T = I, so its gradient there is O(orth_reg_weight / (2 n)), not ~0
    assert grads[0.0] < 1e-12 and grads[0.5] > 1e-4, grads


def bad_input_cases():
    other_shape = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=24, num_hidden_layers=2,
                                                           num_attention_heads=2, intermediate_size=24,
                                                           max_position_embeddings=16))
    return {
        "not adalora": (lambda: trained_lora(), "must be a PEFT AdaLoRA model"),
        "missing layer": (lambda: fresh_adalora(targets=["query"]), "only in LoRA .*value"),
        "init_r < r": (lambda: fresh_adalora(init_r=2), "set init_r >= r"),
        "other base": (lambda: fresh_adalora(base=other_shape), "same base model"),
        "init_r > min shape": (lambda: fresh_adalora(init_r=20), "set init_r <= min"),
        "no head": (lambda: fresh_adalora(task_type=None), "modules_to_save"),
    }


@pytest.mark.parametrize("case", list(bad_input_cases()))
def test_bad_inputs_raise_with_the_fix_and_change_nothing(case):
    build, message = bad_input_cases()[case]
    adalora, lora = build(), trained_lora(r=4)
    before = {n: p.detach().clone() for n, p in adalora.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        lora_to_adalora(lora, adalora)
    assert all(torch.equal(p, before[n]) for n, p in adalora.state_dict().items())


def test_an_adalora_model_is_not_accepted_as_the_lora_source():
    with pytest.raises(ValueError, match="must be a PEFT LoRA model"):
        lora_to_adalora(fresh_adalora(), fresh_adalora())


def test_lora_delta_weight_is_peft_get_delta_weight():
    layers = lora_layers(trained_lora())
    assert layers and all(torch.equal(lora_delta_weight(m), m.get_delta_weight("default")) for m in layers)
