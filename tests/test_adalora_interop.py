"""companion.adalora.interop.freeze_ranknum: when PEFT 0.21.2 makes AdaLoRA's ranknum trainable, and the fix.

The trigger is ``_move_adapter_to_device_of_base_layer`` changing the device or the dtype of the freshly
built float32 CPU ``ranknum``: ``nn.ParameterDict`` re-wraps the moved tensor as a trainable Parameter.
"""

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

from companion.adalora import freeze_ranknum, inject_adalora

TARGETS = ["lin0", "lin1"]


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = torch.nn.Linear(6, 10), torch.nn.Linear(10, 3)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def peft_adalora(base, targets=TARGETS):
    return get_peft_model(base, AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=targets,
                                              total_step=10))


def trainable_ranknums(model):
    return sorted(n for n, p in model.named_parameters() if "ranknum" in n and p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_peft_recreates_ranknum_as_trainable_on_a_non_float32_base_and_freeze_ranknum_freezes_it(dtype):
    model = peft_adalora(Toy().to(dtype))
    assert len(trainable_ranknums(model)) == 2  # the PEFT 0.21.2 behaviour the helper exists for
    assert freeze_ranknum(model) == 2
    assert trainable_ranknums(model) == []
    assert all(p.item() == 4.0 for n, p in model.named_parameters() if "ranknum" in n)  # r0 = init_r, untouched
    assert freeze_ranknum(model) == 0


def test_a_device_move_alone_triggers_it_even_on_a_float32_base():
    # On a GPU machine a CPU -> CUDA move does the same; PyTorch's meta device shows it on any machine.
    with torch.device("meta"):
        base = Toy()
    model = peft_adalora(base)
    assert {p.device.type for n, p in model.named_parameters() if "ranknum" in n} == {"meta"}
    assert len(trainable_ranknums(model)) == 2
    assert freeze_ranknum(model) == 2 and trainable_ranknums(model) == []


def test_a_float32_cpu_base_is_not_moved_and_keeps_ranknum_frozen_even_after_a_later_cast():
    model = peft_adalora(Toy())
    assert trainable_ranknums(model) == []
    model.to(torch.bfloat16)  # Module.to keeps requires_grad: only PEFT's own move re-wraps the tensor
    assert trainable_ranknums(model) == []
    assert freeze_ranknum(model) == 0


@pytest.mark.parametrize("compute_dtype, expected", [(torch.float32, 0), (torch.bfloat16, 1)], ids=str)
def test_a_4bit_base_triggers_it_only_through_a_non_float32_compute_dtype(compute_dtype, expected):
    from companion.measure import load_in_4bit
    from companion.models import build_tiny_llama

    base = load_in_4bit(build_tiny_llama(seed=0), compute_dtype=compute_dtype)
    model = peft_adalora(base, ["q_proj"])
    n_layers = base.config.num_hidden_layers
    assert len(trainable_ranknums(model)) == expected * n_layers  # Chapter 7's setup is the float32 case
    assert freeze_ranknum(model) == expected * n_layers and trainable_ranknums(model) == []


def test_an_optimizer_built_after_freeze_ranknum_leaves_the_scale_alone():
    model = peft_adalora(Toy().to(torch.bfloat16))
    freeze_ranknum(model)
    with torch.no_grad():  # Lambda = 0 at initialisation would give ranknum a zero gradient
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p.fill_(1.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(5, 6, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    optimizer.step()
    assert [p.item() for n, p in model.named_parameters() if "ranknum" in n] == [4.0, 4.0]


def test_freeze_ranknum_refuses_a_model_without_peft_adalora_layers():
    with pytest.raises(ValueError, match="no PEFT AdaLoRA layer.*get_peft_model"):
        freeze_ranknum(inject_adalora(Toy(), TARGETS, init_r=2))
    with pytest.raises(ValueError, match="no PEFT AdaLoRA layer"):
        freeze_ranknum(Toy())
