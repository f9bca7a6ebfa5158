"""Every companion function that loads, returns or runs a bitsandbytes 4-bit model keeps the training-time
dequantize-then-matmul kernel on a CPU, so no reader has to call ``keep_dequantize_kernel_on_cpu`` first.

bitsandbytes 0.50's ``Linear4bit.forward`` repacks the stored weight for an AVX512-BF16 kernel when
``support_avx512bf16_for_cpu`` is set (from ``has_avx512bf16()`` in ``Linear4bit.__init__``), the input is on a
CPU, the module is in eval mode and the input needs no gradient; the repacking asserts ``out_features % 32 == 0``.
The ``avx512_bf16_cpu`` fixture makes ``has_avx512bf16()`` answer True, so every Linear4bit built in a test is
exactly what that CPU builds, and the crash of /work/shared/cases/robustness/generate_4bit_tiny_llama_cpu.py
(intermediate_size 176 = 5.5 x 32) happens on any machine.
"""

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import LlamaForCausalLM

from companion.bench import instruction_task, sentiment_task
from companion.data import make_instruction_splits
from companion.measure import load_in_4bit
from companion.models import build_tiny_llama, char_tokenizer, load_hub_model, tiny_llama_config
from companion.profiles import setup_profile
from companion.qlora import bnb_4bit_config, generate, keep_dequantize_kernel_on_cpu, load_adapter, save_adapter


@pytest.fixture
def avx512_bf16_cpu(monkeypatch):
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    assert bnb.nn.Linear4bit(64, 48).support_avx512bf16_for_cpu  # the fixture really builds the repacking layer


def linear4bit(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def stored(model):
    """Every 4-bit weight as stored: packed bytes, shape, and whether absmax is still double-quantized."""
    return {name: (m.weight.data.clone(), m.weight.quant_state.nested) for name, m in linear4bit(model).items()}


def assert_unchanged(model, before):
    after = stored(model)
    assert after.keys() == before.keys() and len(after) == 14
    for name, (data, nested) in before.items():
        assert torch.equal(after[name][0], data) and after[name][1] == nested, name


def examples():
    return make_instruction_splits(seed=0, n_train=4, n_test=2, families=["add"])["test"]


def plain_4bit_load(tmp_path):
    """A reader's own transformers load, without the companion."""
    build_tiny_llama(seed=0).save_pretrained(tmp_path)
    return LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_4bit_config(torch.float32),
                                            dtype=torch.float32, device_map="cpu")


def test_generate_on_the_tiny_llama_in_4bit_runs_on_an_avx512_bf16_cpu_and_keeps_the_stored_weights(avx512_bf16_cpu):
    model = load_in_4bit(build_tiny_llama(seed=0), compute_dtype=torch.float32)  # gate/up_proj: 176 outputs
    before = stored(model)
    completions = generate(model, char_tokenizer(), examples(), max_new_tokens=4)
    assert len(completions) == 2 and all(len(c) <= 4 for c in completions)
    assert_unchanged(model, before)  # still double-quantized: nothing was repacked


def test_generate_protects_a_4bit_model_the_reader_loaded_without_the_companion(avx512_bf16_cpu, tmp_path):
    model = plain_4bit_load(tmp_path)
    assert all(m.support_avx512bf16_for_cpu for m in linear4bit(model).values())
    before = stored(model)
    generate(model, char_tokenizer(), examples(), max_new_tokens=4)
    assert_unchanged(model, before)


def load_with_load_in_4bit(tmp_path):
    return load_in_4bit(build_tiny_llama(seed=0), compute_dtype=torch.float32)


def load_with_load_hub_model(tmp_path):
    build_tiny_llama(seed=0).save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    return load_hub_model(str(tmp_path), quantization_config=bnb_4bit_config(torch.float32), dtype=torch.float32,
                          device_map="cpu")[0]


def load_with_load_adapter(tmp_path):
    adapted = get_peft_model(build_tiny_llama(seed=0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    save_adapter(adapted, tmp_path / "adapter")
    return load_adapter(plain_4bit_load(tmp_path / "base"), tmp_path / "adapter")


def load_with_instruction_task(tmp_path):
    return instruction_task(setup_profile("ci"), n_train=8, n_test=2).load_model(0, True)


def load_with_sentiment_task(tmp_path):
    return sentiment_task(setup_profile("ci"), n_train=10, n_validation=5, n_test=5).load_model(0, True)


@pytest.mark.parametrize("load", [load_with_load_in_4bit, load_with_load_hub_model, load_with_load_adapter,
                                  load_with_instruction_task, load_with_sentiment_task], ids=lambda f: f.__name__[10:])
def test_every_companion_4bit_loader_returns_layers_that_never_repack_on_a_cpu(avx512_bf16_cpu, tmp_path, load):
    layers = linear4bit(load(tmp_path))
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers.values())


def test_the_protection_survives_peft_wrapping_eval_no_grad_inference_mode_and_moving_to_the_cpu(avx512_bf16_cpu):
    model = prepare_model_for_kbit_training(load_in_4bit(build_tiny_llama(seed=0), compute_dtype=torch.float32),
                                            use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).to("cpu").eval()
    before = stored(model)
    x = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        no_grad = model(input_ids=x).logits
    with torch.inference_mode():
        inference = model(input_ids=x).logits
    model.train()
    trained_path = model(input_ids=x).logits.detach()  # the path training uses: dequantize, then matmul
    assert torch.equal(no_grad, inference) and torch.equal(no_grad, trained_path)
    assert_unchanged(model, before)


def test_weights_repacked_before_the_companion_saw_them_get_the_standard_layout_back_with_a_warning():
    model = load_in_4bit(build_tiny_llama(seed=0), compute_dtype=torch.float32)
    q_proj = model.model.layers[0].self_attn.q_proj
    original = dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state)  # (64, 64)
    shape = q_proj.weight.shape
    # what Linear4bit.forward does on an AVX512-BF16 CPU when the reader evaluates the model first
    q_proj.weight.data, q_proj.weight.quant_state = _convert_weight_packed_for_cpu(q_proj.weight.data,
                                                                                   q_proj.weight.quant_state)
    with pytest.warns(UserWarning, match="1 4-bit layers .* had already been repacked"):
        generate(model, char_tokenizer(), examples(), max_new_tokens=4)
    state = q_proj.weight.quant_state
    assert not state.packing_format_for_cpu and state.nested and q_proj.weight.shape == shape
    # absmax went through bfloat16 (8 significant bits): the weights agree to that precision
    torch.testing.assert_close(dequantize_4bit(q_proj.weight.data, state), original, rtol=2**-8, atol=2**-8 * 0.1)


def test_keep_dequantize_kernel_on_cpu_stays_public_and_idempotent(avx512_bf16_cpu, recwarn):
    model = build_tiny_llama(tiny_llama_config(num_hidden_layers=1), seed=0)
    plain = {n: p.clone() for n, p in model.state_dict().items()}
    assert keep_dequantize_kernel_on_cpu(model) is model  # a model without 4-bit layers is left alone
    assert all(torch.equal(p, plain[n]) for n, p in model.state_dict().items())
    quantized = load_in_4bit(build_tiny_llama(seed=0), compute_dtype=torch.float32)
    before = stored(quantized)
    assert keep_dequantize_kernel_on_cpu(keep_dequantize_kernel_on_cpu(quantized)) is quantized
    assert_unchanged(quantized, before)
    assert not any("repacked" in str(w.message) for w in recwarn)
