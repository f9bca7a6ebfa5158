import pytest
import torch

from companion.measure import load_in_4bit, stored_bytes, trainable_parameters
from companion.memory import PUBLISHED_CONFIGS, bytes_4bit, published_config
from companion.models import build_tiny_llama


def test_stored_bytes_of_a_plain_model_is_its_parameter_and_buffer_bytes():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    expected = (3 * 4 + 4 + 4 + 4) * 4 + (4 + 4) * 4 + 8  # params fp32; running mean/var fp32; int64 counter
    assert stored_bytes(model) == expected
    assert trainable_parameters(model) == 3 * 4 + 4 + 4 + 4


@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_linear_bytes_include_the_quantization_state(double_quant):
    model = load_in_4bit(build_tiny_llama(), double_quant=double_quant)
    q_proj = model.model.layers[0].self_attn.q_proj
    weight = q_proj.weight
    assert weight.dtype == torch.uint8 and weight.quant_state.nested == double_quant
    numel = 64 * 64
    qs = weight.quant_state
    state = qs.absmax.nbytes + (qs.state2.absmax.nbytes + qs.offset.nbytes if double_quant else 0)
    assert weight.nbytes + state == bytes_4bit(numel, double_quant=double_quant)
    assert model.lm_head.weight.dtype == torch.bfloat16  # the output embedding stays unquantized


def test_double_quantization_makes_the_stored_model_smaller():
    base = build_tiny_llama(seed=0)
    plain = stored_bytes(load_in_4bit(base, double_quant=False))
    nested = stored_bytes(load_in_4bit(build_tiny_llama(seed=0), double_quant=True))
    assert nested < plain


def test_published_config_builds_the_transformers_config_and_refuses_unknown_names():
    cfg = published_config("llama-7b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (4096, 32, 11008)
    assert set(PUBLISHED_CONFIGS) >= {"llama-7b", "llama-65b", "llama-2-70b"}
    with pytest.raises(ValueError, match="unknown model 'gpt-5'; published configs"):
        published_config("gpt-5")


def test_load_in_4bit_names_the_result_after_the_model_it_quantized_not_its_deleted_temporary_folder():
    # PEFT writes this name into adapter_config.json as base_model_name_or_path; load_adapter compares it
    base = build_tiny_llama(seed=0)
    base.name_or_path = base.config._name_or_path = "org/tiny-llama"
    quantized = load_in_4bit(base)
    assert quantized.name_or_path == quantized.config._name_or_path == "org/tiny-llama"
    assert load_in_4bit(build_tiny_llama(seed=0)).name_or_path == ""  # built from a config: no name, as PEFT expects
