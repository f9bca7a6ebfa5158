"""companion.adalora.layer against PEFT's SVDLinear / SVDLinear4bit on the same weights."""

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

from companion.adalora import SVDLinear, adalora_layers, copy_adapter_weights_from_peft, inject_adalora


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.head = torch.nn.Linear(6, 10), torch.nn.Linear(10, 5), torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def assert_same_bf16_forward_and_gradients(ours, reference):
    """Give both layers PEFT's A, B and one random Lambda; bf16 outputs and adapter gradients must be equal."""
    with torch.no_grad():
        for part in ("lora_A", "lora_B"):
            getattr(ours, part).copy_(getattr(reference, part)["default"])
        ours.lora_E.normal_()
        reference.lora_E["default"].copy_(ours.lora_E)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    y_ref, y = reference(x), ours(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    y_ref.float().sum().backward()
    y.float().sum().backward()
    for part in ("lora_A", "lora_B", "lora_E"):
        assert torch.equal(getattr(ours, part).grad, getattr(reference, part)["default"].grad), part


def twin_toys(init_r=4, lora_alpha=8, seed=0):
    """(PEFT AdaLoRA toy, companion toy) with identical base weights and identical adapters."""
    torch.manual_seed(seed)
    base = Toy()
    ours = Toy()
    ours.load_state_dict(base.state_dict())
    config = AdaLoraConfig(init_r=init_r, lora_alpha=lora_alpha, target_modules=["lin0", "lin1"], total_step=10)
    peft_model = get_peft_model(base, config)
    inject_adalora(ours, ["lin0", "lin1"], init_r=init_r, lora_alpha=lora_alpha)
    copy_adapter_weights_from_peft(ours, peft_model)
    return peft_model, ours


def randomise_lambda(*models, seed=1):
    """Give every lora_E the same non-zero values (at initialisation they are all 0)."""
    g = torch.Generator().manual_seed(seed)
    values = {}
    for model in models:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_E" in n:
                    key = n.replace("base_model.model.", "").replace(".default", "")
                    values.setdefault(key, torch.randn(p.shape, generator=g))
                    p.copy_(values[key])


def test_initialisation_is_lambda_zero_and_gaussian_vectors_so_the_model_is_unchanged():
    torch.manual_seed(0)
    base = torch.nn.Linear(300, 200)
    layer = SVDLinear(base, init_r=64, lora_alpha=8)
    assert torch.equal(layer.lora_E, torch.zeros(64, 1))
    for p in (layer.lora_A, layer.lora_B):
        assert abs(p.std().item() - 0.02) < 0.002 and abs(p.mean().item()) < 0.002
    assert (layer.lora_A.shape, layer.lora_B.shape) == ((64, 300), (200, 64))
    x = torch.randn(7, 300)
    assert torch.equal(layer(x), base(x))
    assert not base.weight.requires_grad and layer.effective_rank == 0


def test_forward_and_delta_weight_equal_peft_bit_for_bit():
    peft_model, ours = twin_toys()
    randomise_lambda(peft_model, ours)
    x = torch.randn(9, 6)
    assert torch.equal(peft_model(x), ours(x))
    peft_layer = peft_model.base_model.model.lin1
    assert torch.equal(ours.lin1.delta_weight(), peft_layer.get_delta_weight("default"))


def test_gradients_equal_peft_bit_for_bit():
    peft_model, ours = twin_toys()
    randomise_lambda(peft_model, ours)
    x = torch.randn(9, 6)
    peft_model(x).square().sum().backward()
    ours(x).square().sum().backward()
    peft_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                  for n, p in peft_model.named_parameters() if "lora_" in n}
    for n, p in ours.named_parameters():
        if "lora_" in n:
            assert torch.equal(p.grad, peft_grads[n]), n


def test_scale_is_alpha_over_init_r_plus_1e5_and_stays_fixed_when_ranks_are_masked():
    layer = SVDLinear(torch.nn.Linear(4, 3), init_r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_E.fill_(1.0)
        layer.lora_E[:2] = 0.0  # mask two of four triplets
    expected = layer.lora_B @ (layer.lora_A * layer.lora_E) * (8 / torch.tensor([4.0 + 1e-5]))
    assert torch.equal(layer.delta_weight(), expected)
    assert layer.effective_rank == 2 and layer.ranknum.item() == 4.0


@pytest.mark.parametrize("base_dtype, adapter_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                        (torch.bfloat16, torch.float32)])
def test_adapter_dtype_is_what_get_peft_model_gives_and_ranknum_is_never_trainable(base_dtype, adapter_dtype):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 3)).to(base_dtype)
    reference = get_peft_model(base, AdaLoraConfig(init_r=2, target_modules=["0"], total_step=10)).base_model.model[0]
    layer = SVDLinear(torch.nn.Linear(4, 3).to(base_dtype), init_r=2, lora_alpha=4)
    assert reference.lora_A["default"].dtype == adapter_dtype
    assert {p.dtype for p in (layer.lora_A, layer.lora_B, layer.lora_E)} == {adapter_dtype}
    assert "ranknum" not in dict(layer.named_parameters()) and layer.ranknum.dtype == adapter_dtype
    x = torch.randn(5, 4, dtype=base_dtype)
    assert layer(x).dtype == base_dtype  # the adapter term is added in place, in the base's dtype


def test_merge_then_unmerge_restores_the_base_and_merged_output_matches():
    torch.manual_seed(0)
    layer = SVDLinear(torch.nn.Linear(5, 4), init_r=3, lora_alpha=6)
    with torch.no_grad():
        layer.lora_E.normal_()
    w0, x = layer.base_layer.weight.clone(), torch.randn(8, 5)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-6, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-7)
    assert torch.equal(layer(x), y)


def test_lora_dropout_applies_to_the_adapter_input_only():
    torch.manual_seed(0)
    layer = SVDLinear(torch.nn.Linear(5, 4), init_r=3, lora_alpha=6, lora_dropout=0.5)
    with torch.no_grad():
        layer.lora_E.normal_()
    x = torch.randn(8, 5)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    assert not torch.equal(layer(x), y_eval)
    layer.eval()
    assert torch.equal(layer(x), y_eval)


def test_a_4bit_base_gives_the_same_output_and_gradients_as_peft_svdlinear4bit():
    import bitsandbytes as bnb
    from peft.tuners.adalora.bnb import SVDLinear4bit

    from companion.measure import load_in_4bit
    from companion.models import build_tiny_llama

    config = AdaLoraConfig(init_r=4, lora_alpha=8, target_modules=["q_proj"], total_step=10)
    peft_model = get_peft_model(load_in_4bit(build_tiny_llama(seed=0)), config)
    reference = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(reference, SVDLinear4bit) and isinstance(reference.base_layer, bnb.nn.Linear4bit)
    ours = SVDLinear(reference.base_layer, init_r=4, lora_alpha=8)
    # get_peft_model upcasts the adapter to float32; ours is created in float32
    assert ours.quantized and ours.lora_A.dtype == reference.lora_A["default"].dtype == torch.float32
    assert_same_bf16_forward_and_gradients(ours, reference)
    assert not any(b.requires_grad for b in ours.buffers())  # ranknum is a buffer: it can never train
    with pytest.raises(TypeError, match="4-bit"):
        ours.merge()


def test_inject_adalora_wraps_the_targets_and_freezes_everything_else():
    torch.manual_seed(0)
    model = inject_adalora(Toy(), ["lin0", "lin1"], init_r=3, lora_alpha=6, trainable_modules=("head",))
    assert list(adalora_layers(model)) == ["lin0", "lin1"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["head.bias", "head.weight", "lin0.lora_A", "lin0.lora_B", "lin0.lora_E",
                         "lin1.lora_A", "lin1.lora_B", "lin1.lora_E"]


def test_bad_layer_arguments_raise_errors_that_name_the_fix():
    with pytest.raises(ValueError, match="no module matches target_modules"):
        inject_adalora(Toy(), ["q_proj"])
    with pytest.raises(ValueError, match="non-empty list"):
        inject_adalora(Toy(), "lin0")
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        SVDLinear(torch.nn.Conv1d(2, 2, 1), init_r=2, lora_alpha=4)
    with pytest.raises(ValueError, match="init_r"):
        SVDLinear(torch.nn.Linear(2, 2), init_r=0, lora_alpha=4)
    with pytest.raises(ValueError, match="lora_dropout"):
        SVDLinear(torch.nn.Linear(2, 2), init_r=2, lora_alpha=4, lora_dropout=1.0)
    with pytest.raises(ValueError, match="inject_adalora"):
        adalora_layers(Toy())


def companion_and_bnb_4bit_bases(seed=0):
    """The companion's Linear4bit and bitsandbytes' holding the same codes of one float layer."""
    import bitsandbytes as bnb

    from companion.quant import Linear4bit

    torch.manual_seed(seed)
    linear = torch.nn.Linear(64, 32)
    theirs = bnb.nn.Linear4bit(64, 32, compress_statistics=True, quant_type="nf4")
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")  # bitsandbytes quantizes here
    ours = Linear4bit.from_linear(linear)
    assert torch.equal(ours.weight, theirs.weight.data)
    return ours, theirs


def test_the_companion_linear4bit_is_a_4bit_base_and_merging_into_it_is_refused():
    """The case program: SVDLinear took the companion's Linear4bit for a float layer (quantized=False) and its
    merge failed with a shape error inside the packed codes."""
    from companion.quant import replace_linear

    model = inject_adalora(replace_linear(torch.nn.Sequential(torch.nn.Linear(64, 32))), ["0"], init_r=4)
    layer = model[0]
    assert layer.quantized and "quantized=True" in repr(layer)
    with torch.no_grad():
        layer.lora_E.normal_()
    codes, x = layer.base_layer.weight.detach().clone(), torch.randn(3, 64)
    y = layer(x)
    with pytest.raises(TypeError, match=r"merging into a 4-bit base \(companion\.quant\.linear4bit\.Linear4bit\)"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, codes) and torch.equal(layer(x), y)


def test_over_the_companion_linear4bit_svdlinear_computes_what_peft_svdlinear4bit_computes_over_bitsandbytes():
    from peft.tuners.adalora.bnb import SVDLinear4bit

    ours_base, theirs_base = companion_and_bnb_4bit_bases()
    theirs_model = torch.nn.Sequential(theirs_base)
    theirs_model.is_loaded_in_4bit = True  # as transformers marks a bitsandbytes model
    config = AdaLoraConfig(init_r=4, lora_alpha=8, target_modules=["0"], total_step=10)
    reference = get_peft_model(theirs_model, config).base_model.model[0]
    assert isinstance(reference, SVDLinear4bit)
    ours = SVDLinear(ours_base, init_r=4, lora_alpha=8)
    assert_same_bf16_forward_and_gradients(ours, reference)  # bf16 in, float32 adapter: PEFT SVDLinear4bit's handling


def test_copying_peft_weights_is_verified_on_layer_outputs_not_on_the_tensors():
    """Equal A, B, E with a different lora_alpha (or base) are different layers: the copy says so."""
    torch.manual_seed(0)
    base, ours = Toy(), Toy()
    ours.load_state_dict(base.state_dict())
    peft_model = get_peft_model(base, AdaLoraConfig(init_r=4, lora_alpha=8, target_modules=["lin0", "lin1"],
                                                    total_step=10))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_E" in name:
                p.normal_()  # PEFT starts Lambda at zero: make the adapters matter
    inject_adalora(ours, ["lin0", "lin1"], init_r=4, lora_alpha=16)
    with pytest.raises(ValueError, match="layer 'lin0' computes outputs .* away from PEFT's.*lora_alpha"):
        copy_adapter_weights_from_peft(ours, peft_model)
    other = Toy()
    inject_adalora(other, ["lin0", "lin1"], init_r=3, lora_alpha=8)
    with pytest.raises(ValueError, match=r"lin0.lora_A: companion shape \(3, 6\), PEFT \(4, 6\); build both with the same"):
        copy_adapter_weights_from_peft(other, peft_model)
