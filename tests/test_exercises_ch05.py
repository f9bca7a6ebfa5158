"""Chapter 5 exercises: the notebook's solutions pass, classic mistakes fail, references are right."""

import math
import random

import pytest
import torch
from peft import LoraConfig
from transformers import BitsAndBytesConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from companion.exercises import ch05
from exercise_helpers import assert_passes, assert_rejected, solutions

SOL = solutions(5)
LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


# ----------------------------------------------------------------------------------------- lora_target_names

def _names(model, *, kinds=(torch.nn.Linear, Conv1D), leave_out=lambda model, module, name: False):
    """Last name parts of the layers of ``kinds`` that ``leave_out`` keeps, sorted (for the mistakes below)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, kinds) and not leave_out(model, module, name)})


def targets_nn_linear_only(model):  # GPT-2's Conv1D layers are missed
    output = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    return _names(model, kinds=(torch.nn.Linear,), leave_out=lambda m, module, n: module is output)


def targets_drop_lm_head_by_name(model):  # a plain module's lm_head is adapted; GPT-NeoX's head is embed_out
    return _names(model, leave_out=lambda m, module, name: name.rsplit(".", 1)[-1] == "lm_head")


def targets_keep_the_output_layer(model):
    return _names(model)


def targets_query_value_only(model):
    return ["q_proj", "v_proj"]


def targets_full_names(model):
    output = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output)


# ----------------------------------------------------------------------------------------- base_4bit_bytes

def _bytes(numel, blocksize, double_quant, *, packed=None, groups=math.ceil, offset=4, tables=0):
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2) if packed is None else packed
    if not double_quant:
        return packed + 4 * blocks + tables
    return packed + blocks + 4 * groups(blocks / 256) + offset + tables


def bytes_floor_packed(numel, blocksize=64, double_quant=True):  # an odd numel's last code is dropped
    return _bytes(numel, blocksize, double_quant, packed=numel // 2)


def bytes_ignore_double_quant(numel, blocksize=64, double_quant=True):  # float32 absmax always
    return _bytes(numel, blocksize, False)


def bytes_without_offset(numel, blocksize=64, double_quant=True):
    return _bytes(numel, blocksize, double_quant, offset=0)


def bytes_floor_groups(numel, blocksize=64, double_quant=True):  # the last, partial group of 256 blocks dropped
    return _bytes(numel, blocksize, double_quant, groups=math.floor)


def bytes_with_code_tables(numel, blocksize=64, double_quant=True):  # 16 NF4 + 256 dynamic-map float32 values
    return _bytes(numel, blocksize, double_quant, tables=4 * 16 + (4 * 256 if double_quant else 0))


def bytes_from_bits_per_parameter(numel, blocksize=64, double_quant=True):  # the 4.127-bit average
    bits = 4 + (8 / blocksize + 32 / (blocksize * 256) if double_quant else 32 / blocksize)
    return round(numel * bits / 8)


# ----------------------------------------------------------------------------------------- qlora_configs

def _configs(compute_dtype, n_params_billion, *, bnb=None, lora=None):
    bnb_kwargs = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                      bnb_4bit_compute_dtype=compute_dtype)
    lora_kwargs = dict(r=64, lora_alpha=16, lora_dropout=0.1 if n_params_billion <= 13 else 0.05,
                       target_modules="all-linear", task_type="CAUSAL_LM")
    bnb_kwargs.update(bnb or {})
    lora_kwargs.update(lora or {})
    return BitsAndBytesConfig(**bnb_kwargs), LoraConfig(**lora_kwargs)


def configs_fp4(compute_dtype, n_params_billion):
    return _configs(compute_dtype, n_params_billion, bnb=dict(bnb_4bit_quant_type="fp4"))


def configs_no_double_quant(compute_dtype, n_params_billion):
    return _configs(compute_dtype, n_params_billion, bnb=dict(bnb_4bit_use_double_quant=False))


def configs_float32_compute(compute_dtype, n_params_billion):
    return _configs(compute_dtype, n_params_billion, bnb=dict(bnb_4bit_compute_dtype=torch.float32))


def configs_8bit(compute_dtype, n_params_billion):
    return _configs(compute_dtype, n_params_billion, bnb=dict(load_in_4bit=False, load_in_8bit=True))


def configs_r8_alpha32(compute_dtype, n_params_billion):
    return _configs(compute_dtype, n_params_billion, lora=dict(r=8, lora_alpha=32))


def configs_alpha_equals_r(compute_dtype, n_params_billion):
    return _configs(compute_dtype, n_params_billion, lora=dict(lora_alpha=64))


def configs_query_value_only(compute_dtype, n_params_billion):
    return _configs(compute_dtype, n_params_billion, lora=dict(target_modules=["q_proj", "v_proj"]))


def configs_lm_head_too(compute_dtype, n_params_billion):
    return _configs(compute_dtype, n_params_billion, lora=dict(target_modules=LLAMA_LINEARS + ["lm_head"]))


def configs_dropout_swapped(compute_dtype, n_params_billion):
    return _configs(compute_dtype, n_params_billion, lora=dict(lora_dropout=0.05 if n_params_billion <= 13 else 0.1))


def configs_no_task_type(compute_dtype, n_params_billion):
    return _configs(compute_dtype, n_params_billion, lora=dict(task_type=None))


def configs_keep_q_proj_in_16bit(compute_dtype, n_params_billion):  # caught only by loading the model
    return _configs(compute_dtype, n_params_billion, bnb=dict(llm_int8_skip_modules=["lm_head", "q_proj"]))


def configs_explicit_llama_names(compute_dtype, n_params_billion):  # right: the list covers a Llama block
    return _configs(compute_dtype, n_params_billion, lora=dict(target_modules=list(LLAMA_LINEARS)))


WRONG = {
    "ch05.lora_target_names": [targets_nn_linear_only, targets_drop_lm_head_by_name, targets_keep_the_output_layer,
                               targets_query_value_only, targets_full_names],
    "ch05.base_4bit_bytes": [bytes_floor_packed, bytes_ignore_double_quant, bytes_without_offset, bytes_floor_groups,
                             bytes_with_code_tables, bytes_from_bits_per_parameter],
    "ch05.qlora_configs": [configs_fp4, configs_no_double_quant, configs_float32_compute, configs_8bit,
                           configs_r8_alpha32, configs_alpha_equals_r, configs_query_value_only, configs_lm_head_too,
                           configs_dropout_swapped, configs_no_task_type, configs_keep_q_proj_in_16bit],
}


@pytest.mark.parametrize("name", ["lora_target_names", "base_4bit_bytes", "qlora_configs"])
def test_the_notebook_solution_passes(name):
    assert_passes(f"ch05.{name}", SOL[name])


def test_an_explicit_list_of_every_llama_linear_layer_passes_too():
    assert_passes("ch05.qlora_configs", configs_explicit_llama_names)


@pytest.mark.parametrize("exercise_id,fn", [(k, f) for k, fns in WRONG.items() for f in fns],
                         ids=lambda v: getattr(v, "__name__", v))
def test_a_classic_mistake_fails_with_a_helpful_message(exercise_id, fn):
    assert_rejected(exercise_id, fn)


def test_a_layer_left_in_16_bit_is_found_by_loading_the_tiny_llama():
    from companion.exercises import check

    result = check("ch05.qlora_configs", configs_keep_q_proj_in_16bit, seed=0)
    assert "q_proj" in result.message and "Linear4bit" in result.message, result.message


def test_calling_the_graded_against_library_is_reported():
    def targets_via_peft(model):
        return ch05.reference_lora_target_names(model)

    def bytes_via_bitsandbytes(numel, blocksize=64, double_quant=True):
        import bitsandbytes.functional as F

        packed, state = F.quantize_4bit(torch.randn(numel), blocksize=blocksize, compress_statistics=double_quant)
        return packed.nbytes

    def bytes_via_companion(numel, blocksize=64, double_quant=True):
        from companion.memory import bytes_4bit

        return bytes_4bit(numel, blocksize=blocksize, double_quant=double_quant)

    def configs_via_companion(compute_dtype, n_params_billion):
        from companion.qlora import bnb_4bit_config

        return bnb_4bit_config(compute_dtype), LoraConfig(r=64, lora_alpha=16, target_modules="all-linear")

    assert_rejected("ch05.lora_target_names", targets_via_peft, status="uses_reference")
    assert_rejected("ch05.base_4bit_bytes", bytes_via_bitsandbytes, status="uses_reference")
    assert_rejected("ch05.base_4bit_bytes", bytes_via_companion, status="uses_reference")
    assert_rejected("ch05.qlora_configs", configs_via_companion, status="uses_reference")


def test_the_target_cases_cover_conv1d_a_plain_lm_head_and_tied_embeddings():
    cases = list(ch05._target_cases(random.Random(3)))
    notes = " ".join(c.note for c in cases)
    assert "Conv1D" in notes and "plain torch module" in notes and "tied embeddings" in notes
    by_type = {type(c.args[0]).__name__: c.expected for c in cases}
    assert by_type["LlamaForCausalLM"] == LLAMA_LINEARS and by_type["Qwen2ForCausalLM"] == LLAMA_LINEARS
    assert by_type["GPT2LMHeadModel"] == ["c_attn", "c_fc", "c_proj"]  # PEFT adapts Conv1D
    assert by_type["_PlainLM"] == ["body", "lm_head"]  # no PreTrainedModel: nothing left out
    assert "embed_out" not in by_type["GPTNeoXForCausalLM"]
    tied = next(c.args[0] for c in cases if "tied" in c.note)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_the_target_reference_agrees_with_the_companion_on_every_case():
    from companion.qlora import lora_target_names

    for seed in (0, 1):  # the BERT case alternates between its masked-LM and classifier heads
        for case in ch05._target_cases(random.Random(seed)):
            assert lora_target_names(case.args[0]) == case.expected, case.note


@pytest.mark.parametrize("double_quant", [False, True])
def test_the_bytes_reference_is_the_companion_footprint_formula(double_quant):
    from companion.memory import bytes_4bit

    rng = random.Random(1)
    for _ in range(40):
        numel, blocksize = rng.randint(1, 70000), rng.choice(ch05.BLOCKSIZES)
        assert ch05.reference_base_4bit_bytes(numel, blocksize, double_quant) == \
            bytes_4bit(numel, blocksize=blocksize, double_quant=double_quant), (numel, blocksize)


def test_the_bytes_cases_hit_partial_groups_of_256_blocks():
    cases = list(ch05._bytes_cases(random.Random(2)))
    numels = [(c.args[0], c.kwargs.get("blocksize", 64), c.kwargs.get("double_quant", True)) for c in cases]
    assert any(dq and math.ceil(n / b) > 256 and math.ceil(n / b) % 256 for n, b, dq in numels)
    assert any(n % 2 == 1 for n, _, _ in numels) and any(not dq for _, _, dq in numels)


def test_the_config_reference_is_the_companion_config_and_the_papers_dropout_rule():
    from companion.qlora import bnb_4bit_config

    for dtype in (torch.bfloat16, torch.float16):
        bnb, lora = ch05.reference_qlora_configs(dtype, 7)
        theirs = bnb_4bit_config(dtype)
        for field in ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"):
            assert getattr(bnb, field) == getattr(theirs, field), field
        assert (lora.r, lora.lora_alpha, lora.target_modules, lora.task_type) == (64, 16, "all-linear", "CAUSAL_LM")
    # QLoRA's Guanaco hyperparameters: "LoRA dropout of 0.1 for models up to 13B and 0.05 for 33B and 65B models"
    assert [ch05.reference_qlora_configs(torch.bfloat16, s)[1].lora_dropout for s in (7, 13, 33, 65)] == \
        [0.1, 0.1, 0.05, 0.05]


def test_the_reference_configs_load_every_llama_linear_in_4_bit_under_lora():
    import bitsandbytes as bnb
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    bnb_config, lora_config = ch05.reference_qlora_configs(torch.bfloat16, 7)
    assert ch05._end_to_end_problem(bnb_config, lora_config, torch.bfloat16) is None
    model = get_peft_model(ch05._load_tiny_llama_4bit(bnb_config, torch.bfloat16), lora_config)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) == 2 * len(LLAMA_LINEARS)  # two layers of the tiny Llama
    assert all(isinstance(model.get_submodule(n).get_base_layer(), bnb.nn.Linear4bit) for n in wrapped)
    assert type(model.base_model.model.lm_head) is torch.nn.Linear
