"""LoRA/QLoRA -> AdaLoRA: the tutorial's strict=False load moves nothing; lora_to_adalora moves the update exactly."""

import copy

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from tiny_models import tiny_bert
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from companion.migrate import (adalora_delta_weight, default_tolerance, lora_delta_weight, lora_to_adalora,
                               seed_transfer)

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
    # the result, not a key count: every adapted layer still computes W x, LoRA's computes W x + s B A x
    assert report.max_layer_output_diff > 0.01 and f"{report.max_layer_output_diff:.3g}" in str(report)
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
    # the report's own output check: every layer and the head on probes, within 1e-4 of max |output| in fp32
    assert table["max abs output diff"].notna().all() and (table["max abs output diff"] <= table["allowed output diff"]).all()
    for name in layers["name"]:  # the layers really agree on inputs the report did not choose
        module, twin = (m.base_model.model.get_submodule(name) for m in (lora, adalora))
        x = torch.randn(5, module.in_features, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            assert torch.allclose(twin(x), module(x), rtol=0, atol=1e-6 * float(module(x).abs().max())), name
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


class TwoLinear(nn.Module):
    """The case programs' model (robustness-2/migrate_*.py), with an embedding and a conv to target too."""

    def __init__(self):
        super().__init__()
        self.emb, self.conv = nn.Embedding(10, 16), nn.Conv2d(2, 4, 3)
        self.lin0, self.lin1 = nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def two_linear(seed=0):
    torch.manual_seed(seed)
    return TwoLinear()


def as_trained(model, std=0.3):
    """Every adapter tensor random (lora_B's bias too, with lora_bias=True), as after training."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)
    return model


def small_lora(targets=("lin0", "lin1"), base=None, adapter_name="default", **config):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **config)
    return as_trained(get_peft_model(base if base is not None else two_linear(), config, adapter_name=adapter_name))


def small_adalora(targets=("lin0", "lin1"), base=None, adapter_name="default", **config):
    config = AdaLoraConfig(init_r=6, lora_alpha=8, target_modules=list(targets), total_step=10, **config)
    return get_peft_model(base if base is not None else two_linear(), config, adapter_name=adapter_name)


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


X = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))


def test_lora_bias_is_refused_because_adalora_has_no_bias_and_the_outputs_would_differ():
    # robustness-2/migrate_lora_bias.py: the updates agreed to 1e-7, the outputs differed by 1.53
    lora, adalora = small_lora(lora_bias=True), small_adalora()
    lin0 = lora.base_model.model.lin0
    assert lin0.lora_B["default"].bias.abs().max() > 0.1  # the trained bias that AdaLoRA cannot hold
    before = adapter_state(adalora)
    with pytest.raises(ValueError, match=r"layer 'lin0': lora_bias=True .* no bias.*lora_bias=False"):
        lora_to_adalora(lora, adalora)
    assert all(torch.equal(p, before[n]) for n, p in adapter_state(adalora).items())


def test_a_base_rewritten_by_pissa_is_refused_and_the_lora_models_own_base_migrates_exactly():
    # robustness-2/migrate_changed_base.py: PiSSA keeps W - s B A as the LoRA model's base weight
    lora = small_lora(init_lora_weights="pissa")
    with pytest.raises(ValueError, match=r"base weights differ in 2 tensor\(s\) \(lin0.weight by .*"
                                         r"init_lora_weights='pissa' rewrote.*unload\(\)"):
        lora_to_adalora(lora, small_adalora())
    adalora = small_adalora(base=copy.deepcopy(lora).unload())  # the fix the message gives
    table = lora_to_adalora(lora, adalora, inputs=X)
    assert table["kind"].tolist() == ["lora", "lora", "model"]
    out = outputs(lora, X)
    assert torch.allclose(outputs(adalora, X), out, rtol=0, atol=1e-6 * float(out.abs().max()))


def test_base_biases_trained_with_bias_all_are_refused_by_name():
    lora = small_lora(bias="all")
    with torch.no_grad():
        lora.base_model.model.lin1.base_layer.bias.add_(0.5)  # a trained base bias
    with pytest.raises(ValueError, match=r"lin1.bias by 0.5.*bias='all' trained the LoRA model's base biases"):
        lora_to_adalora(lora, small_adalora())


def other_adapter_active():
    lora = small_lora()
    lora.add_adapter("other", LoraConfig(r=4, target_modules=["lin0", "lin1"]))
    lora.set_adapter("other")
    return lora


def merged():
    lora = small_lora()
    lora.merge_adapter()
    return lora


UNCARRIABLE = {  # what a LoRA model can hold that an AdaLoRA adapter cannot: (LoRA model, AdaLoRA targets, message)
    "DoRA": (lambda: small_lora(use_dora=True), ("lin0", "lin1"), r"DoraLinearVariant, e.g. use_dora=True"),
    "Embedding": (lambda: small_lora(("emb", "lin0")), ("lin0",), r"layer 'emb': LoRA layer type lora.Embedding"),
    "Conv2d": (lambda: small_lora(("conv", "lin0")), ("conv", "lin0"), r"layer 'conv': LoRA layer type lora.Conv2d"),
    "trainable tokens": (lambda: small_lora(("lin0",), trainable_token_indices={"emb": [1, 2]}), ("lin0",),
                         r"embedding rows of \['emb'\] \(trainable_token_indices\)"),
    "other adapter active": (other_adapter_active, ("lin0", "lin1"), r"\['default', 'other'\] with \['other'\] active"),
    "adapter name": (lambda: small_lora(adapter_name="stage1"), ("lin0", "lin1"), r"\['stage1'\] .* adapter_name="),
    "merged": (merged, ("lin0", "lin1"), r"merged into its base weights; unmerge it"),
}


@pytest.mark.parametrize("case", list(UNCARRIABLE))
def test_features_the_adalora_model_cannot_carry_are_refused_by_name_and_change_nothing(case):
    build, targets, message = UNCARRIABLE[case]
    lora, adalora = build(), small_adalora(targets)
    before = {n: p.detach().clone() for n, p in adalora.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        lora_to_adalora(lora, adalora)
    assert all(torch.equal(p, before[n]) for n, p in adalora.state_dict().items())


def test_adapters_with_another_name_migrate_when_both_models_use_it():
    lora, adalora = small_lora(adapter_name="stage1"), small_adalora(adapter_name="stage1")
    table = lora_to_adalora(lora, adalora, adapter_name="stage1", inputs=X)
    assert (table["max abs output diff"] <= table["allowed output diff"]).all()
    assert torch.allclose(outputs(adalora, X), outputs(lora, X), rtol=0, atol=1e-5)


def test_outputs_that_still_differ_after_migration_restore_the_adalora_model_and_raise():
    lora = small_lora()
    lora.base_model.disable_adapter_layers()  # the LoRA model computes W x: nothing a config check sees
    adalora = small_adalora()
    before = {n: p.detach().clone() for n, p in adalora.state_dict().items()}
    with pytest.raises(ValueError, match=r"outputs differ: lin0 by [\d.]+ \(allowed .*adalora_model was restored"):
        lora_to_adalora(lora, adalora)
    assert all(torch.equal(p, before[n]) for n, p in adalora.state_dict().items())


def test_the_stated_tolerance_is_enforced_relative_to_the_output_size():
    with pytest.raises(ValueError, match="outputs differ"):  # below float32 rounding of the two sums
        lora_to_adalora(small_lora(), small_adalora(), tolerance=1e-12)
    default = lora_to_adalora(small_lora(), small_adalora())
    loose = lora_to_adalora(small_lora(), small_adalora(), tolerance=1e-3)
    assert default_tolerance(torch.float32) == 1e-4
    assert loose["allowed output diff"].tolist() == pytest.approx((10 * default["allowed output diff"]).tolist())


def test_lora_dropout_only_warns_because_it_acts_in_training_only():
    with pytest.warns(UserWarning, match=r"lora_dropout is 0.1 in the LoRA model and 0.0 .* only changes the second"):
        table = lora_to_adalora(small_lora(lora_dropout=0.1), small_adalora())
    assert (table["max abs output diff"] <= table["allowed output diff"]).all()


def test_gpt2_conv1d_layers_with_fan_in_fan_out_migrate_and_the_whole_models_agree():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))
    targets = ["c_attn", "c_fc"]
    lora = as_trained(get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                      fan_in_fan_out=True)))
    adalora = get_peft_model(copy.deepcopy(base), AdaLoraConfig(init_r=6, lora_alpha=8, target_modules=targets,
                                                                total_step=10, fan_in_fan_out=True))
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    table = lora_to_adalora(lora, adalora, inputs={"input_ids": ids})
    assert table["kind"].tolist() == ["lora"] * 4 + ["model"]
    out = logits(lora, ids)
    assert not torch.allclose(out, logits(base, ids), atol=1e-3)  # the adapter matters
    assert torch.allclose(logits(adalora, ids), out, rtol=0, atol=1e-6 * float(out.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_bases_migrate_within_the_default_tolerance_of_their_dtype(dtype):
    base = tiny_bert().to(dtype)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=TARGETS))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    adalora = fresh_adalora(base=copy.deepcopy(base))
    ids, _ = batch()
    table = lora_to_adalora(lora, adalora, inputs={"input_ids": ids})
    assert default_tolerance(dtype) == 4 * torch.finfo(dtype).eps  # 4 units in the last place
    assert table["kind"].iloc[-1] == "model" and (table["max abs output diff"] <= table["allowed output diff"]).all()
    explicit = lora_to_adalora(lora, fresh_adalora(base=copy.deepcopy(base)), inputs={"input_ids": ids},
                               tolerance=default_tolerance(dtype))
    assert explicit["allowed output diff"].tolist() == table["allowed output diff"].tolist()


def test_probes_leave_4_bit_weights_and_the_cpu_repacking_switch_as_they_were():
    from companion.measure import load_in_4bit
    from companion.models import build_tiny_llama

    def base_4bit():  # bitsandbytes' repacking switched on, as on a CPU with AVX512-BF16
        model = load_in_4bit(build_tiny_llama(seed=0), compute_dtype=torch.float32)
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = True
        return model

    targets = ["q_proj", "v_proj"]
    qlora = as_trained(get_peft_model(base_4bit(), LoraConfig(r=4, lora_alpha=8, target_modules=targets)), 0.05)
    adalora = get_peft_model(base_4bit(), AdaLoraConfig(init_r=6, lora_alpha=8, target_modules=targets, total_step=10))
    qlora.train(), adalora.train()
    packed = {n: p.detach().clone() for n, p in qlora.named_parameters() if p.dtype == torch.uint8}
    lora_to_adalora(qlora, adalora)
    assert packed and all(torch.equal(p, packed[n]) for n, p in qlora.named_parameters() if n in packed)
    switches = [m.support_avx512bf16_for_cpu for m in qlora.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert switches and all(switches) and qlora.training and adalora.training


def test_a_4_bit_bias_that_a_forward_cast_to_the_compute_dtype_counts_as_the_same_base():
    from companion.measure import load_in_4bit
    from companion.qlora import keep_dequantize_kernel_on_cpu

    def base_4bit():
        return keep_dequantize_kernel_on_cpu(load_in_4bit(tiny_bert(), compute_dtype=torch.bfloat16,
                                                          skip_modules=["classifier"]))

    lora = get_peft_model(base_4bit(), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query"]))
    as_trained(lora)
    adalora = get_peft_model(base_4bit(), AdaLoraConfig(task_type="SEQ_CLS", init_r=6, lora_alpha=8,
                                                        target_modules=["query"], total_step=10))
    query = adalora.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer
    query.bias.data = query.bias.data.float()  # as loaded in float32; bitsandbytes casts it on the first forward
    ids, _ = batch()
    table = lora_to_adalora(lora, adalora, inputs={"input_ids": ids})
    assert (table["max abs output diff"] <= table["allowed output diff"]).all()
    query.bias.data[0] += 1.0  # a real difference is still one
    with pytest.raises(ValueError, match=r"base weights differ in 1 tensor\(s\) \(bert.encoder.layer.0.attention.self"
                                         r".query.bias by 1"):
        lora_to_adalora(lora, adalora)


def test_inputs_the_models_cannot_take_raise_and_restore_the_adalora_model():
    lora, adalora = small_lora(), small_adalora()
    before = {n: p.detach().clone() for n, p in adalora.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot run on inputs \(RuntimeError: .*pass inputs as its forward"):
        lora_to_adalora(lora, adalora, inputs=torch.randn(5, 3))
    assert all(torch.equal(p, before[n]) for n, p in adalora.state_dict().items())
