"""Chapter 1 exercises: what LoRA trains on a Llama (GQA included), LoRA's forward pass in 32 and 16 bit,
and LoRA's gradients by hand (why ``lora_A`` gets exactly zero gradient at initialisation). Expected values
come from PEFT (``LoraConfig`` on a transformers ``LlamaForCausalLM`` built on the meta device, and PEFT's
``lora.Linear`` forward) and from ``torch.autograd``."""

from __future__ import annotations

import random
import warnings

import torch

from .core import Case, Exercise, compare_equal, compare_tensor, compare_tuple, register

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32)  # meta-llama/Llama-2-7b-hf config.json


# ---------------------------------------------------------------------------------------------------------
# 1.1 Counting LoRA's trainable parameters on a Llama

def reference_lora_trainable_params(config: dict, r: int, target_modules: list[str]) -> int:
    """Trainable parameters of ``get_peft_model(LlamaForCausalLM(LlamaConfig(**config)), LoraConfig(r=r,
    target_modules=target_modules))``, built on the meta device (no memory, no download) with a 32-token
    vocabulary (the embeddings are frozen and not targeted, so the vocabulary does not matter)."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = LlamaForCausalLM(LlamaConfig(vocab_size=32, **config))
            peft_model = get_peft_model(model, LoraConfig(r=r, target_modules=list(target_modules)))
    finally:
        transformers.logging.set_verbosity(verbosity)
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def _llama_config(rng: random.Random, *, gqa: bool) -> dict:
    head_dim = rng.choice((4, 8, 16))
    heads = rng.choice((4, 8, 12))
    kv = rng.choice([d for d in (1, 2, 4) if heads % d == 0 and d < heads]) if gqa else heads
    hidden = head_dim * heads
    return dict(hidden_size=hidden, intermediate_size=rng.randint(2, 4) * hidden + rng.choice((0, 8, 24)),
                num_hidden_layers=rng.randint(1, 4), num_attention_heads=heads, num_key_value_heads=kv)


def _count_cases(rng: random.Random):
    compare = lambda g, e: compare_equal(g, e, what="the number of trainable parameters")  # noqa: E731
    specs = [
        (LLAMA2_7B, 8, ["q_proj", "v_proj"], "Llama-2-7B, r=8 on W_q and W_v: the chapter's 4,194,304"),
        (LLAMA2_7B, rng.choice((16, 64)), list(LLAMA_MODULES), "Llama-2-7B, every linear layer (QLoRA's recipe)"),
        (_llama_config(rng, gqa=True), rng.randint(1, 16), ["q_proj", "k_proj", "v_proj", "o_proj"],
         "grouped-query attention: k_proj and v_proj are narrower than q_proj"),
        (_llama_config(rng, gqa=True), rng.randint(1, 16), list(LLAMA_MODULES),
         "GQA, attention and MLP: intermediate_size != hidden_size"),
        (_llama_config(rng, gqa=False), rng.randint(1, 16), ["gate_proj", "down_proj"], "MLP only"),
        (_llama_config(rng, gqa=True), 1, ["k_proj"], "r = 1 on k_proj alone, GQA"),
    ]
    for _ in range(2):
        modules = rng.sample(LLAMA_MODULES, rng.randint(1, len(LLAMA_MODULES)))
        specs.append((_llama_config(rng, gqa=rng.random() < 0.6), rng.randint(1, 32), modules, "random modules"))
    for config, r, modules, note in specs:
        yield Case((dict(config), r, list(modules)), reference_lora_trainable_params(config, r, modules), compare,
                   note=note)


register(Exercise(
    id="ch01.lora_trainable_params", chapter=1, title="What LoRA trains on a Llama", level="warm-up",
    signature="fn(config: dict, r: int, target_modules: list[str]) -> int  # config: hidden_size, "
              "intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads; target_modules "
              "among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
    task="Count the trainable parameters PEFT's LoraConfig(r=r, target_modules=target_modules) adds to a "
         "Llama with this config: every targeted nn.Linear(d_in, d_out) of every decoder layer gets lora_A "
         "(r, d_in) and lora_B (d_out, r), and nothing else trains.",
    hint="r * (d_in + d_out) per adapted matrix (both factors, not one). head_dim = hidden_size // "
         "num_attention_heads; k_proj and v_proj map hidden_size to head_dim * num_key_value_heads (grouped-query "
         "attention); gate_proj and up_proj map hidden_size to intermediate_size, down_proj back.",
    cases=_count_cases))


# ---------------------------------------------------------------------------------------------------------
# 1.2 LoRA's forward pass

def _peft_linear(weight: torch.Tensor, config):
    """``get_peft_model`` on a one-Linear model whose bias-free weight is ``weight``; returns the adapted layer."""
    from peft import get_peft_model

    d_out, d_in = weight.shape
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(d_in, d_out, bias=False, dtype=weight.dtype)
    with torch.no_grad():
        model.proj.weight.copy_(weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
    return peft_model.base_model.model.proj


def reference_lora_forward(x, weight, lora_A, lora_B, lora_alpha, r):
    """PEFT's ``lora.Linear.forward`` (``lora_dropout=0``): ``W0 x + (lora_alpha / r) * B A x``
    (LoRA paper Eq. 3), with ``lora_A`` and ``lora_B`` copied into the layer PEFT builds; PEFT keeps them in
    float32 on a 16-bit base, casts ``x`` to float32 for the adapter path and casts the sum back."""
    from peft import LoraConfig

    layer = _peft_linear(weight, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=["proj"]))
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
        return layer(x).detach()


FORWARD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _forward_cases(rng: random.Random):
    specs = [  # (leading dims, d_in, d_out, r, lora_alpha, dtype, zero B, note)
        ((rng.randint(2, 9),), rng.randint(5, 40), rng.randint(5, 40), 8, 16, torch.float32, False,
         "float32, scaling = 16 / 8"),
        ((2, rng.randint(2, 7)), rng.randint(5, 40), rng.randint(5, 40), rng.randint(2, 6), 32, torch.float32, False,
         "3-d input (batch, sequence, d_in)"),
        ((), rng.randint(3, 20), rng.randint(3, 20), 4, 8, torch.float32, False, "1-d input, no leading dims"),
        ((rng.randint(2, 6),), rng.randint(8, 33), rng.randint(8, 33), rng.randint(2, 8), 16, torch.bfloat16, False,
         "bfloat16 x and W, float32 lora_A and lora_B"),
        ((3, rng.randint(2, 5)), rng.randint(8, 33), rng.randint(8, 33), rng.randint(2, 8), 8, torch.float16, False,
         "float16 x and W, float32 lora_A and lora_B"),
        ((rng.randint(2, 6),), 17, 3, 1, 2, torch.float32, False, "r = 1, d_out < d_in"),
        ((rng.randint(2, 6),), 3, 29, 6, 6, torch.float32, False, "lora_alpha == r (scaling 1), d_out > d_in"),
        ((rng.randint(2, 6),), 12, 12, 8, 16, rng.choice(DTYPES), True,
         "lora_B = 0 as PEFT initialises it: y is the base layer's output"),
        ((2, 2, 3), rng.randint(5, 20), rng.randint(5, 20), rng.randint(2, 6), rng.choice((4, 12, 64)),
         rng.choice(DTYPES), False, "4-d input"),
    ]
    for lead, d_in, d_out, r, alpha, dtype, zero_b, note in specs:
        x = torch.randn(*lead, d_in).to(dtype)
        weight = (torch.randn(d_out, d_in) / d_in ** 0.5).to(dtype)
        lora_A = torch.randn(r, d_in) / d_in ** 0.5
        lora_B = torch.zeros(d_out, r) if zero_b else torch.randn(d_out, r) / r ** 0.5
        rtol, atol = FORWARD_TOL[dtype]
        expected = reference_lora_forward(x, weight, lora_A, lora_B, alpha, r)
        yield Case((x, weight, lora_A, lora_B, alpha, r), expected,
                   lambda g, e, rtol=rtol, atol=atol: compare_tensor(g, e, rtol=rtol, atol=atol, what="y"), note=note)


register(Exercise(
    id="ch01.lora_forward", chapter=1, title="LoRA's forward pass", level="core",
    signature="fn(x, weight, lora_A, lora_B, lora_alpha, r) -> y  # x (..., d_in) and weight (d_out, d_in) in "
              "float32/bfloat16/float16; lora_A (r, d_in), lora_B (d_out, r) float32; lora_alpha, r numbers; "
              "y (..., d_out) in x's dtype",
    task="Compute the output of a LoRA-adapted linear layer without bias, as PEFT's lora.Linear does with "
         "lora_dropout=0: the frozen layer's output plus the low-rank update, scaled by lora_alpha / r. The "
         "adapters stay float32 when the base is 16-bit; return y in x's dtype.",
    hint="h = x W^T + (lora_alpha / r) * (x A^T) B^T. Compute the base term in x's dtype, the adapter term with "
         "x cast to lora_A's dtype, add them and cast the sum back to x.dtype; @ works for any leading dims.",
    cases=_forward_cases))


# ---------------------------------------------------------------------------------------------------------
# 1.3 LoRA's gradients by hand

def reference_lora_grads(x, weight, lora_A, lora_B, scaling, grad_output):
    """``torch.autograd.grad`` of ``y = x W^T + scaling * (x A^T) B^T`` (LoRA's forward) with respect to
    ``lora_A`` and ``lora_B``, for the upstream gradient ``grad_output = dL/dy``."""
    A = lora_A.detach().clone().requires_grad_(True)
    B = lora_B.detach().clone().requires_grad_(True)
    y = x @ weight.T + (x @ A.T @ B.T) * scaling
    grad_A, grad_B = torch.autograd.grad(y, (A, B), grad_output)
    return grad_A.detach(), grad_B.detach()


def _grads_cases(rng: random.Random):
    def part(got, expected):  # float32 sums in another order (e.g. through dL/dW): 1e-4 of the largest entry
        return compare_tensor(got, expected, rtol=1e-4, atol=1e-4 * max(float(expected.abs().max()), 1e-6))

    exact = lambda g, e: compare_tensor(g, e, rtol=0, atol=0)  # noqa: E731
    loose = compare_tuple(part, part, names=("grad_lora_A", "grad_lora_B"))
    zero_a = compare_tuple(exact, part, names=("grad_lora_A", "grad_lora_B"))
    specs = [  # (n, d_in, d_out, r, scaling, B zero, note)
        (rng.randint(3, 12), 12, 12, 8, 2.0, True, "lora_B = 0 as at initialisation: grad of lora_A is exactly 0"),
        (rng.randint(3, 12), rng.randint(4, 30), rng.randint(4, 30), rng.randint(2, 8), 2.0, False, "scaling 16 / 8"),
        (rng.randint(3, 12), 19, 5, 3, 0.5, False, "d_out < d_in, scaling 0.5"),
        (rng.randint(3, 12), 6, 23, 4, 4.0, False, "d_out > d_in"),
        (1, rng.randint(4, 20), rng.randint(4, 20), 1, 32.0, False, "one token, r = 1"),
        (rng.randint(20, 64), rng.randint(8, 40), rng.randint(8, 40), rng.randint(2, 8), rng.choice((0.25, 2.0, 8.0)),
         False, "many tokens: the gradient is a sum over them, not a mean"),
        (rng.randint(3, 12), 10, 14, 5, rng.choice((0.25, 2.0)), True, "lora_B = 0 again, another shape"),
    ]
    for n, d_in, d_out, r, scaling, zero_b, note in specs:
        x = torch.randn(n, d_in)
        weight = torch.randn(d_out, d_in) / d_in ** 0.5
        lora_A = torch.randn(r, d_in) / d_in ** 0.5
        lora_B = torch.zeros(d_out, r) if zero_b else torch.randn(d_out, r) / r ** 0.5
        grad_output = torch.randn(n, d_out)
        expected = reference_lora_grads(x, weight, lora_A, lora_B, scaling, grad_output)
        yield Case((x, weight, lora_A, lora_B, scaling, grad_output), expected, zero_a if zero_b else loose, note=note)


register(Exercise(
    id="ch01.lora_grads", chapter=1, title="LoRA's gradients by hand", level="stretch",
    signature="fn(x, weight, lora_A, lora_B, scaling, grad_output) -> (grad_lora_A, grad_lora_B)  # x (n, d_in), "
              "weight (d_out, d_in), lora_A (r, d_in), lora_B (d_out, r), grad_output = dL/dy (n, d_out), all "
              "float32; scaling = lora_alpha / r; returns (r, d_in) and (d_out, r) float32",
    task="For y = x W^T + scaling * (x A^T) B^T, write the gradients of the loss with respect to lora_A and lora_B "
         "by hand, from the upstream gradient grad_output, without autograd. Check what your formula gives when "
         "lora_B is all zero, as PEFT initialises it.",
    hint="With u = x A^T (n, r): dL/dB = scaling * grad_output^T u, and dL/dA = scaling * (grad_output B)^T x. "
         "The gradients sum over the n tokens; the frozen W does not enter.",
    cases=_grads_cases,
    forbidden=("bitsandbytes", "peft", "companion", "torch.autograd.__init__")))
