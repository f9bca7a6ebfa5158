"""scripts/gpu_check.py: its `ci` twin runs every check on a tiny Llama on the CPU; `gpu` needs CUDA.

The 4-bit build is the gpu profile's code path with a CPU device: peaks here are live tensor bytes
(``companion.memtrack.TensorMemory``), there the CUDA allocator's ``max_memory_allocated``.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from companion.memtrack import PeakMemory
from companion.models import tiny_llama_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_ci_twin_prints_one_verdict_per_check_and_nothing_fails(gpu_check, capsys):
    assert gpu_check.main(["--profile", "ci"]) == 0
    out = capsys.readouterr().out
    summary = out[out.index("ci profile"):].splitlines()[1:]
    verdicts = {line.split("] ")[1].split(":")[0]: line[1:5].strip() for line in summary if line.startswith("[")}
    assert list(verdicts) == ["load-4bit", "build-peak", "qlora-bnb-paged", "qlora-companion-paged",
                              "paged-equals-adamw", "quantizer-bitexact", "fits-16gb"]
    exact = ("load-4bit", "build-peak", "paged-equals-adamw", "quantizer-bitexact", "fits-16gb")
    assert all(verdicts[c] == "PASS" for c in exact) and "FAIL" not in verdicts.values(), out
    assert "fell back to unpaged state on the CPU" in out  # bitsandbytes' paged optimizer on a CPU, honestly


def test_gpu_profile_without_cuda_stops_at_once_with_the_reason(gpu_check, capsys):
    assert not torch.cuda.is_available(), "this test describes a CPU-only machine"
    assert gpu_check.main(["--profile", "gpu"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def build_peak(gpu_check, config):
    with PeakMemory(CPU) as peak:
        model, _ = gpu_check.build_4bit_llama("tiny-llama", CPU, config)
    return model, peak.peak_bytes


def test_4bit_build_never_holds_more_than_the_4bit_model_and_one_16bit_layer_at_any_depth(gpu_check):
    transient = {}
    for layers in (2, 8):
        config = tiny_llama_config(num_hidden_layers=layers, max_position_embeddings=512)
        model, peak = build_peak(gpu_check, config)
        held, layer = gpu_check.held_bytes(model), gpu_check.decoder_layer_bytes(config)
        # The bound's margin: the loader holds one 16-bit parameter (plus its quantization temporaries)
        # at a time, and the bound allows a whole 16-bit decoder layer beyond the finished 4-bit model.
        assert held < peak <= held + layer, (layers, peak, held, layer)
        assert gpu_check.check_build_peak(model, config, peak).status == "PASS"
        transient[layers] = peak - held
    # Four times the layers, the same transient: the 16-bit model is never assembled.
    assert transient[8] <= transient[2], transient


def test_build_peak_check_fails_a_build_that_quantizes_a_whole_16bit_model(gpu_check):
    """The old build: the whole bf16 model drawn first, its state dict alive while transformers quantizes it."""
    from transformers import LlamaForCausalLM

    from companion.qlora import bnb_4bit_config

    config = tiny_llama_config(max_position_embeddings=512)
    with PeakMemory(CPU) as peak:
        state_dict = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).state_dict()
        model = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state_dict, dtype=torch.bfloat16,
                                                 quantization_config=bnb_4bit_config(torch.bfloat16), device_map="cpu")
        whole_16bit = sum(t.nbytes for t in state_dict.values())
        del state_dict
    verdict = gpu_check.check_build_peak(model, config, peak.peak_bytes)
    assert peak.peak_bytes >= whole_16bit + gpu_check.held_bytes(model) - gpu_check.decoder_layer_bytes(config)
    assert verdict.status == "FAIL", verdict


def test_random_checkpoint_is_drawn_with_the_models_own_initialisation(gpu_check):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    config = tiny_llama_config(max_position_embeddings=512)
    torch.manual_seed(0)
    model, _ = gpu_check.build_4bit_llama("tiny-llama", CPU, config)
    linears = [m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 7 * config.num_hidden_layers
    for m in linears:  # _init_weights: normal(0, initializer_range); NF4 keeps the scale to a few percent
        w = F.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        assert abs(w.std().item() / config.initializer_range - 1) < 0.1 and abs(w.mean().item()) < 2e-3
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert len(norms) == 2 * config.num_hidden_layers + 1 and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embed.dtype == head.dtype == torch.bfloat16 and not embed[config.pad_token_id].any()  # padding row zeroed
    for w in (embed, head):  # the 16-bit embeddings, drawn like the linear layers
        assert abs(w.float().std().item() / config.initializer_range - 1) < 0.1


def test_random_checkpoint_entry_is_read_whole_and_refuses_a_slice(gpu_check):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        skeleton = LlamaForCausalLM._from_config(tiny_llama_config(), dtype=torch.bfloat16)
    entry = gpu_check.RandomCheckpointEntry(skeleton, "model.layers.1.mlp.up_proj.weight", CPU)
    w = entry[...]
    assert w.shape == skeleton.model.layers[1].mlp.up_proj.weight.shape and w.dtype == torch.bfloat16
    assert w.device == CPU and not w.requires_grad
    with pytest.raises(TypeError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*read whole"):
        entry[0]


def test_fits_16gb_fails_when_any_measured_peak_exceeds_what_a_16gb_card_holds(gpu_check):
    V = gpu_check.Verdict
    fits = [V("build-peak", "PASS", "", peak_bytes=4.1e9), V("qlora-bnb-paged", "PASS", "", peak_bytes=6.5e9),
            V("paged-equals-adamw", "PASS", "")]
    assert gpu_check.check_fits_16gb(fits).status == "PASS"
    assert "6.50 GB (qlora-bnb-paged)" in gpu_check.check_fits_16gb(fits).detail
    old_build = [V("build-peak", "FAIL", "", peak_bytes=17.4e9)] + fits[1:]
    assert gpu_check.check_fits_16gb(old_build).status == "FAIL"
    assert gpu_check.check_fits_16gb(fits[2:]).status == "FAIL"  # nothing measured is no evidence
