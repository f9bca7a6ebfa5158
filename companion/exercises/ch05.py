"""Chapter 5 exercises: which layers ``target_modules="all-linear"`` adapts, the bytes bitsandbytes stores
for one 4-bit weight, and the QLoRA paper's ``BitsAndBytesConfig`` + ``LoraConfig``. Expected values come
from PEFT (``get_peft_model`` on a copy of the model), bitsandbytes (a real ``quantize_4bit``) and
transformers/PEFT (the configs, and a tiny Llama loaded in 4 bit with the student's configs)."""

from __future__ import annotations

import copy
import functools
import random
import warnings

import torch

from .core import Case, Exercise, compare_equal, compare_number, describe, register

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes quantize_4bit
LLAMA_LINEARS = ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")


class _quiet:
    """Silence warnings and transformers' progress bars ("Loading weights") while a reference runs."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        self._verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self._bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(self._verbosity)
        self._warnings.__exit__(*exc)
        return False


# ---------------------------------------------------------------------------------------------------------
# 5.1 lora_target_names

class _PlainLM(torch.nn.Module):
    """A plain torch module (not a transformers ``PreTrainedModel``) whose last layer is named ``lm_head``."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.body = torch.nn.Linear(width, width)
        self.lm_head = torch.nn.Linear(width, vocab, bias=False)


@functools.lru_cache(maxsize=1)
def _tiny_llama_checkpoint():
    """A tiny Llama saved once per process (``companion.models.build_tiny_llama``, float32) in a temporary
    folder that lives as long as the process; returns (folder object, path)."""
    import tempfile

    from ..models import build_tiny_llama

    folder = tempfile.TemporaryDirectory(prefix="ch05_tiny_llama_")
    with _quiet():
        build_tiny_llama(seed=0).save_pretrained(folder.name)
    return folder, folder.name


def _load_tiny_llama_4bit(bnb_config, dtype: torch.dtype):
    """The cached tiny Llama checkpoint loaded with ``quantization_config=bnb_config`` on the CPU."""
    from transformers import LlamaForCausalLM

    _, path = _tiny_llama_checkpoint()
    with _quiet():
        return LlamaForCausalLM.from_pretrained(path, quantization_config=bnb_config, dtype=dtype, device_map="cpu")


def _target_models(rng: random.Random):
    """(model, note) pairs built offline from configs: Llama, Qwen2, GPT-2 (Conv1D), tied embeddings, ..."""
    import transformers as T

    from ..models import build_tiny_llama, tiny_llama_config

    layers = lambda: rng.randint(1, 2)  # noqa: E731
    width = lambda: rng.choice((16, 32))  # noqa: E731
    vocab = rng.randint(40, 120)
    yield build_tiny_llama(tiny_llama_config(num_hidden_layers=layers())), "tiny Llama: lm_head left out"
    yield (build_tiny_llama(tiny_llama_config(num_hidden_layers=layers(), tie_word_embeddings=True)),
           "tied embeddings: lm_head shares the input embedding's weight and is still left out")
    h = width()
    qwen2 = T.Qwen2Config(vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=layers(),
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=rng.random() < 0.5)
    yield T.Qwen2ForCausalLM(qwen2), "tiny Qwen2 (grouped-query attention, q/k/v with bias)"
    gpt2 = T.GPT2Config(vocab_size=vocab, n_embd=width(), n_layer=layers(), n_head=2, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    yield T.GPT2LMHeadModel(gpt2), "tiny GPT-2: c_attn, c_proj and c_fc are transformers Conv1D, not nn.Linear"
    yield T.GPT2Model(gpt2), "GPT-2 without a head: Conv1D layers, no output embedding to leave out"
    h = width()
    yield (T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=vocab, hidden_size=h, intermediate_size=2 * h,
                                                num_hidden_layers=1, num_attention_heads=4)),
           "GPT-NeoX: the output embedding is called embed_out, not lm_head")
    bert = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=64)
    if rng.random() < 0.5:
        yield (T.BertForMaskedLM(T.BertConfig(**bert)),
               "BERT masked LM: the output embedding is cls.predictions.decoder; the transform's dense stays")
    else:
        yield (T.BertForSequenceClassification(T.BertConfig(**bert)),
               "BERT classifier: a classification head is not an output embedding, so 'all-linear' adapts it "
               "(PEFT leaves it out only with task_type='SEQ_CLS')")
    yield _PlainLM(vocab, width()), "a plain torch module, not a PreTrainedModel: PEFT leaves nothing out, lm_head too"
    yield (T.LlamaModel(tiny_llama_config(num_hidden_layers=1)),
           "LlamaModel without a head: get_output_embeddings() is None")


def reference_lora_target_names(model: torch.nn.Module) -> list[str]:
    """The last name parts of the modules PEFT adapts with ``LoraConfig(target_modules="all-linear")``:
    ``peft.get_peft_model`` on a deep copy of ``model`` (``_maybe_include_all_linear_layers`` resolves the
    shorthand), then every ``LoraLayer``'s name, sorted and without repeats."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    with _quiet():
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules="all-linear"))
    return sorted({name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules()
                   if isinstance(module, LoraLayer)})


def _target_cases(rng: random.Random):
    compare = lambda g, e: compare_equal(g, e, what="the list of target names")  # noqa: E731
    for model, note in _target_models(rng):
        yield Case((model,), reference_lora_target_names(model), compare, note=note)


register(Exercise(
    id="ch05.lora_target_names", chapter=5, title="What target_modules='all-linear' adapts", level="warm-up",
    signature="fn(model: torch.nn.Module) -> list[str]  # sorted, unique last parts of module names, "
              "e.g. ['down_proj', 'gate_proj', ...]",
    task="Before choosing LoRA's target_modules, list the layers that PEFT's LoraConfig(target_modules='all-linear') "
         "would adapt: every torch.nn.Linear and every transformers Conv1D (GPT-2's linear layers), except the "
         "output embedding (model.get_output_embeddings()) when model is a transformers PreTrainedModel. Return the "
         "last part of each such module's name (\"model.layers.0.mlp.down_proj\" -> \"down_proj\"), sorted, each once.",
    hint="walk model.named_modules() and test each module's class (Conv1D is in transformers.pytorch_utils); leave "
         "out only the module that is model.get_output_embeddings() of a PreTrainedModel, compared by identity, not "
         "by name: a plain module's lm_head is adapted, and so is a BERT classifier.",
    cases=_target_cases))


# ---------------------------------------------------------------------------------------------------------
# 5.2 base_4bit_bytes

def _bnb():
    import bitsandbytes.functional as F  # imported on first use: it is slow to import

    return F


def reference_base_4bit_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of a real ``bitsandbytes.functional.quantize_4bit(A, blocksize, compress_statistics=double_quant,
    quant_type="nf4")`` of ``numel`` values: the packed uint8 codes plus the ``QuantState``'s ``absmax`` and, with
    double quantization (QLoRA §3, Eq. 6), ``state2.absmax`` and the float32 ``offset``. The shared code tables
    (16 and 256 float32 values) are not counted, as in ``companion.measure.stored_bytes``."""
    A = torch.randn(numel)
    packed, state = _bnb().quantize_4bit(A, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    total = packed.nbytes + state.absmax.nbytes
    if state.nested:
        total += state.state2.absmax.nbytes + state.offset.nbytes
    return int(total)


def _bytes_cases(rng: random.Random):
    compare = lambda g, e: compare_equal(g, e, what="the number of bytes")  # noqa: E731
    specs = [  # (numel, blocksize or None for the default, double_quant or None for the default, note)
        (4096, None, None, "the defaults: blocksize 64, double quantization"),
        (2 * rng.randint(40, 400) + 1, 64, True, "odd numel: the last uint8 holds one code"),
        (64 * rng.randint(3, 50) + rng.randint(1, 63), 64, True, "partial last block"),
        (64 * 256 * rng.randint(1, 3), 64, True, "a whole number of 256-block groups"),
        (64 * (256 * rng.randint(1, 2) + rng.randint(1, 200)), 64, True,
         "blocks not a multiple of 256: a partial group of second-level constants"),
        (rng.randint(1, 31), 64, True, "fewer values than one block"),
        (rng.randint(500, 5000), 32, rng.random() < 0.5, "blocksize 32"),
        (rng.randint(4097, 30000), 4096, True, "blocksize 4096, partial last block"),
        (rng.randint(1000, 60000), rng.choice(BLOCKSIZES), False, "no double quantization: float32 absmax"),
        (rng.randint(1000, 60000), rng.choice(BLOCKSIZES), True, "double quantization, random blocksize"),
        (1, rng.choice(BLOCKSIZES), rng.random() < 0.5, "one value"),
    ]
    for numel, blocksize, double_quant, note in specs:
        args, kwargs = (numel,), {}
        if blocksize is not None:
            kwargs["blocksize"] = blocksize
        if double_quant is not None:
            kwargs["double_quant"] = double_quant
        expected = reference_base_4bit_bytes(numel, blocksize or 64, True if double_quant is None else double_quant)
        yield Case(args, expected, compare, kwargs=kwargs, note=note)


register(Exercise(
    id="ch05.base_4bit_bytes", chapter=5, title="The bytes of one 4-bit weight", level="core",
    signature="fn(numel: int, blocksize: int = 64, double_quant: bool = True) -> int  # bytes; numel >= 1 values, "
              "blocksize a power of two in 32..4096",
    task="How many bytes does bitsandbytes store for one weight of numel values quantized to NF4? Count the packed "
         "4-bit codes and the QuantState tensors: one float32 absmax per block of blocksize values, or, with double "
         "quantization, one uint8 absmax per block, one float32 state2.absmax per 256 blocks and one float32 offset. "
         "Leave out the shared code tables.",
    hint="two codes share a byte and the last block may be partial: round both up (math.ceil); the 256-block "
         "groups of the second level round up too, and the offset is one float32 per tensor (4 bytes).",
    cases=_bytes_cases))


# ---------------------------------------------------------------------------------------------------------
# 5.3 qlora_configs

def reference_qlora_configs(compute_dtype: torch.dtype, n_params_billion: float):
    """The QLoRA paper's recipe (Dettmers et al. 2023, §3-§4 and the Guanaco hyperparameters) as
    ``transformers.BitsAndBytesConfig`` (NF4, double quantization, 16-bit compute) and ``peft.LoraConfig``
    (r=64, lora_alpha=16, all linear layers, lora_dropout 0.1 up to 13B and 0.05 above, causal LM)."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute_dtype)
    lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1 if n_params_billion <= 13 else 0.05,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    return bnb, lora


def _same(what: str, got, expected) -> str | None:
    return None if got == expected else f"{what} is {describe(got)}, expected {describe(expected)}"


def _targets_problem(targets) -> str | None:
    """``"all-linear"``, or names that include every linear layer of a Llama block and not lm_head."""
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return None
        return (f"target_modules is {targets!r}: as a string it is a regular expression; QLoRA puts LoRA on all "
                f"linear layers ('all-linear')")
    if targets is None:
        return "target_modules is None: PEFT then adapts only its per-architecture default (q_proj, v_proj for Llama)"
    names = set(targets)
    missing = sorted(set(LLAMA_LINEARS) - names)
    if missing:
        return f"target_modules {describe(sorted(names))} misses linear layers of a Llama block: {missing}"
    if "lm_head" in names:
        return "target_modules includes lm_head: QLoRA leaves the output layer out ('all-linear' does)"
    return None


def _end_to_end_problem(bnb_config, lora_config, compute_dtype: torch.dtype) -> str | None:
    """Load the cached tiny Llama with ``bnb_config``, apply ``lora_config``: every linear except lm_head must be a
    bitsandbytes ``Linear4bit`` inside a LoRA layer, and lm_head neither."""
    import bitsandbytes as bnb
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    model = _load_tiny_llama_4bit(copy.deepcopy(bnb_config), compute_dtype)
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    with _quiet():
        peft_model = get_peft_model(model, copy.deepcopy(lora_config))
    modules = dict(peft_model.base_model.model.named_modules())
    for name in linears:
        module = modules[name]
        base = module.get_base_layer() if isinstance(module, LoraLayer) else module
        if name.rsplit(".", 1)[-1] == "lm_head":
            if isinstance(module, LoraLayer):
                return "loading a tiny Llama with your configs put LoRA on lm_head, which QLoRA leaves out"
            continue
        if not isinstance(base, bnb.nn.Linear4bit):
            return (f"loading a tiny Llama with your BitsAndBytesConfig left {name} as {type(base).__name__}, "
                    f"not a bitsandbytes Linear4bit")
        if not isinstance(module, LoraLayer):
            return f"loading a tiny Llama with your LoraConfig put no LoRA adapter on {name}"
    return None


def _compare_configs(got, expected, compute_dtype: torch.dtype) -> str | None:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return f"the result must be a tuple (BitsAndBytesConfig, LoraConfig), got {describe(got)}"
    bnb_config, lora_config = got
    if not isinstance(bnb_config, BitsAndBytesConfig):
        return f"the first element must be a transformers BitsAndBytesConfig, got {type(bnb_config).__name__}"
    if not isinstance(lora_config, LoraConfig):
        return f"the second element must be a peft LoraConfig, got {type(lora_config).__name__}"
    e_bnb, e_lora = expected
    for field in ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                  "bnb_4bit_compute_dtype"):
        wrong = _same(f"BitsAndBytesConfig.{field}", getattr(bnb_config, field), getattr(e_bnb, field))
        if wrong:
            return wrong
    for field in ("r", "lora_alpha"):
        wrong = _same(f"LoraConfig.{field}", getattr(lora_config, field), getattr(e_lora, field))
        if wrong:
            return wrong
    wrong = compare_number(lora_config.lora_dropout, e_lora.lora_dropout, rel=0, abs_=1e-12,
                           what="LoraConfig.lora_dropout")
    if wrong:
        return wrong
    wrong = _targets_problem(lora_config.target_modules)
    if wrong:
        return wrong
    if lora_config.task_type != e_lora.task_type:
        return f"LoraConfig.task_type is {lora_config.task_type!r}, expected 'CAUSAL_LM'"
    return _end_to_end_problem(bnb_config, lora_config, compute_dtype)


def _config_cases(rng: random.Random):
    sizes = [(0.5, "Qwen2.5-0.5B"), (7, "7B"), (13, "13B: the last size with dropout 0.1"),
             (33, "33B: dropout 0.05"), (65, "65B: dropout 0.05"), (round(rng.uniform(1, 12.9), 1), "under 13B"),
             (70, "70B")]
    dtypes = [torch.bfloat16, torch.float16]
    rng.shuffle(dtypes)  # both dtypes appear; which size gets which is drawn
    for i, (size, note) in enumerate(sizes):
        dtype = dtypes[i % 2] if i < 2 else rng.choice(dtypes)
        expected = reference_qlora_configs(dtype, size)
        yield Case((dtype, size), expected, functools.partial(_compare_configs, compute_dtype=dtype),
                   note=f"{note}, compute in {str(dtype).removeprefix('torch.')}; your configs also load a tiny "
                        f"Llama in 4 bit")


register(Exercise(
    id="ch05.qlora_configs", chapter=5, title="The QLoRA recipe as two configs", level="core",
    signature="fn(compute_dtype: torch.dtype, n_params_billion: float) -> (BitsAndBytesConfig, LoraConfig)  "
              "# compute_dtype torch.bfloat16 or torch.float16; n_params_billion e.g. 7 for a 7B model",
    task="Write the QLoRA paper's settings for a causal LM of n_params_billion parameters: a transformers "
         "BitsAndBytesConfig that stores the base in 4-bit NF4 with double quantization and computes in "
         "compute_dtype, and a peft LoraConfig with r=64, lora_alpha=16, LoRA on every linear layer except the "
         "output layer, and lora_dropout 0.1 up to 13B parameters and 0.05 above (the paper's 33B and 65B). "
         "The grader also loads a tiny Llama in 4 bit with your configs.",
    hint="transformers' BitsAndBytesConfig defaults are FP4, no double quantization and float32 compute: write "
         "load_in_4bit, bnb_4bit_quant_type, bnb_4bit_use_double_quant and bnb_4bit_compute_dtype out. PEFT's "
         "defaults (r=8, q_proj/v_proj on Llama) are not QLoRA's; target_modules='all-linear' and "
         "task_type='CAUSAL_LM' are.",
    cases=_config_cases, forbidden=("companion",)))
