"""The 4-bit pipeline helpers, checked against peft and bitsandbytes on a tiny Llama in 4 bit on a CPU."""

import copy
import warnings

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import LlamaModel

from companion.data import make_instruction_splits
from companion.measure import load_in_4bit
from companion.models import build_tiny_llama, char_tokenizer, tiny_llama_config
from companion.qlora import (bnb_4bit_config, exact_match_table, generate, keep_dequantize_kernel_on_cpu,
                             linear_layers, load_adapter, lora_target_names, merge_adapter, save_adapter)

LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def tiny_4bit(seed=0, **config):
    return load_in_4bit(build_tiny_llama(tiny_llama_config(**config), seed=seed), compute_dtype=torch.float32)


def qlora_model(seed=0):
    model = prepare_model_for_kbit_training(tiny_4bit(seed), use_gradient_checkpointing=False)
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))


def trained_adapter(directory, base=None, targets=("q_proj", "v_proj")):
    """A LoRA adapter with non-zero B (B = 0 at initialisation would make any load check vacuous), saved."""
    model = get_peft_model(base if base is not None else build_tiny_llama(seed=0),
                           LoraConfig(r=4, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    save_adapter(model, directory)
    return model


def companion_warnings(record):
    return [str(w.message) for w in record if str(w.message).startswith("The adapter in")]


def batch(seed=0):
    ids = torch.randint(4, 100, (4, 24), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def test_config_is_nf4_with_double_quantization_and_the_given_compute_dtype():
    config = bnb_4bit_config(torch.float16, skip_modules=["classifier"])
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float16 and config.llm_int8_skip_modules == ["classifier"]
    with pytest.raises(ValueError, match="quant_type must be"):
        bnb_4bit_config(quant_type="int4")


def test_linear_layers_shows_which_layers_bitsandbytes_quantized():
    table = linear_layers(tiny_4bit())
    assert sorted(table.index) == sorted(LLAMA_LINEARS + ["lm_head"])
    assert (table.loc[LLAMA_LINEARS, "class"] == "Linear4bit").all() and (table.loc[LLAMA_LINEARS, "count"] == 2).all()
    assert table.loc["lm_head", "class"] == "Linear"  # transformers keeps the output embedding in 16 bit


def test_target_names_are_what_peft_all_linear_resolves_to():
    model = qlora_model()
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert lora_target_names(tiny_4bit()) == sorted(adapted) == LLAMA_LINEARS


def test_training_moves_only_the_adapter_and_never_touches_the_4bit_weights():
    model = qlora_model()
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if isinstance(p, bnb.nn.Params4bit)}
    codes = {n: p.quant_state.absmax.clone() for n, p in model.named_parameters() if isinstance(p, bnb.nn.Params4bit)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for seed in range(3):
        model(**batch(seed)).loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n in packed)  # MatMul4Bit: no grad_B
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in packed:
            assert torch.equal(p, packed[name]) and torch.equal(p.quant_state.absmax, codes[name])
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_adapter_round_trip_through_safetensors_gives_the_same_outputs(tmp_path):
    model = qlora_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # B = 0 at initialisation would make the check vacuous
    files = save_adapter(model, tmp_path)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(files.index)
    reloaded = load_adapter(tiny_4bit(), tmp_path)
    x = batch()["input_ids"]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, reloaded(input_ids=x).logits)


def test_an_adapter_for_another_base_fails_with_the_library_error_and_a_hint(tmp_path):
    trained = qlora_model()
    trained.base_model.model.name_or_path = "org/tiny-llama-64"  # what PEFT writes as base_model_name_or_path
    save_adapter(trained, tmp_path)
    wider = tiny_4bit(hidden_size=128, intermediate_size=352)
    wider.name_or_path = "org/tiny-llama-128"
    with pytest.raises(ValueError, match="only loads onto the base model it was trained on") as err:
        load_adapter(wider, tmp_path)
    assert "size mismatch" in str(err.value) and isinstance(err.value.__cause__, RuntimeError)
    assert "org/tiny-llama-64" in str(err.value) and "org/tiny-llama-128" in str(err.value)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(wider, tmp_path / "missing")


def test_merging_into_a_16bit_base_matches_the_adapter_on_that_base(tmp_path):
    from peft import PeftModel

    model = qlora_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    save_adapter(model, tmp_path)
    merged = merge_adapter(build_tiny_llama(seed=0), tmp_path)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    unmerged = PeftModel.from_pretrained(build_tiny_llama(seed=0), tmp_path)
    x = batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, unmerged(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs the base model in 16 bit"):
        merge_adapter(tiny_4bit(), tmp_path)


def test_generate_returns_one_completion_per_example_and_exact_match_counts_per_family():
    tokenizer = char_tokenizer()
    examples = make_instruction_splits(seed=0, n_train=10, n_test=6, families=["add", "uppercase"])["test"]
    completions = generate(build_tiny_llama(seed=0), tokenizer, examples, max_new_tokens=5, batch_size=4)
    assert len(completions) == 6 and all(isinstance(c, str) and len(c) <= 5 for c in completions)
    table = exact_match_table(examples, [e.output for e in examples[:3]] + ["?"] * 3)
    assert table["all"] == 50.0 and set(table.index) == {"add", "uppercase", "all"}


def test_an_adapter_whose_keys_match_no_layer_is_refused_naming_the_directory_the_classes_and_both_key_forms(tmp_path):
    # /work/shared/cases/robustness/adapter_keys_match_nothing.py: a LlamaForCausalLM adapter on a LlamaModel;
    # PEFT's load_state_dict(strict=False) loads nothing and only warns about missing keys
    trained_adapter(tmp_path)
    bare = LlamaModel(tiny_llama_config())
    with pytest.raises(ValueError, match="loaded 0 of its 8 tensors onto this LlamaModel") as err:
        load_adapter(bare, tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "trained on LlamaForCausalLM" in message
    assert "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'" in message
    assert "'base_model.model.layers.0.self_attn.q_proj.lora_A.weight'" in message
    assert "the adapter has 'model.', the model ''" in message
    assert not any("lora_" in name for name, _ in bare.named_modules())  # the base is left as it was
    with pytest.raises(ValueError, match="loaded 0 of its 8 tensors"):
        merge_adapter(LlamaModel(tiny_llama_config()), tmp_path)


def test_an_adapter_for_a_deeper_model_warns_listing_the_stored_tensors_that_match_nothing(tmp_path):
    # PEFT drops a stored tensor without a parameter silently (unexpected keys are not even warned about)
    trained_adapter(tmp_path, base=build_tiny_llama(tiny_llama_config(num_hidden_layers=3), seed=0))
    with pytest.warns(UserWarning, match="loaded 8 of its 12 adapter tensors") as record:
        load_adapter(build_tiny_llama(seed=0), tmp_path)
    (message,) = companion_warnings(record)
    assert "4 stored tensors match no parameter" in message and "layers.2.self_attn.q_proj.lora_A.weight" in message


def test_an_adapter_for_a_shallower_model_warns_listing_the_adapter_parameters_left_at_initialisation(tmp_path):
    trained_adapter(tmp_path)
    with pytest.warns(UserWarning, match="loaded 8 of its 8 adapter tensors") as record:
        model = load_adapter(build_tiny_llama(tiny_llama_config(num_hidden_layers=3), seed=0), tmp_path)
    (message,) = companion_warnings(record)
    assert "4 adapter parameters got no stored tensor" in message and "layers.2.self_attn" in message
    assert not any("Found missing adapter keys" in str(w.message) for w in record)  # PEFT's warning is replaced
    assert float(model.base_model.model.model.layers[2].self_attn.q_proj.lora_B["default"].weight.abs().sum()) == 0


def test_an_adapter_named_after_another_checkpoint_warns_naming_both_and_the_same_checkpoint_does_not(tmp_path):
    base = build_tiny_llama(seed=0)
    base.name_or_path = "org/tiny-llama-a"
    trained_adapter(tmp_path, base=base)
    other = build_tiny_llama(seed=1)
    other.name_or_path = "org/tiny-llama-b"
    with pytest.warns(UserWarning, match="loaded fully") as record:
        load_adapter(other, tmp_path)
    (message,) = companion_warnings(record)
    assert "LlamaForCausalLM org/tiny-llama-a" in message and "LlamaForCausalLM org/tiny-llama-b" in message
    same = build_tiny_llama(seed=0)
    same.name_or_path = "org/tiny-llama-a"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        load_adapter(same, tmp_path)
    assert companion_warnings(record) == []


def test_the_companion_4bit_round_trip_loads_every_adapter_tensor_without_a_warning(tmp_path):
    model = qlora_model()
    save_adapter(model, tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        load_adapter(tiny_4bit(), tmp_path)
    assert companion_warnings(record) == []  # load_in_4bit keeps the base's name, not its temporary folder


def test_save_adapter_refuses_a_model_without_an_adapter(tmp_path):
    with pytest.raises(TypeError, match="save_adapter needs a peft model"):
        save_adapter(build_tiny_llama(seed=0), tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written, in particular not the whole base model


def test_target_names_include_gpt2_conv1d_layers_as_peft_all_linear_does():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules="all-linear"))
    adapted = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert lora_target_names(model) == sorted(adapted) == ["c_attn", "c_fc", "c_proj"]
    assert linear_layers(model).loc["c_fc", ["in_features", "out_features"]].tolist() == [32, 128]
