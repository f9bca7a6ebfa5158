"""companion.memory against the bytes transformers/bitsandbytes store and the parameters PEFT trains."""

import dataclasses
import math
import re

import bitsandbytes as bnb
import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig,
                          BertForSequenceClassification, BitsAndBytesConfig, GPT2Config, LlamaConfig, LlamaForCausalLM,
                          LlamaForSequenceClassification, MistralConfig, MistralForSequenceClassification, Qwen2Config,
                          Qwen2ForCausalLM, RobertaConfig, RobertaForSequenceClassification, RobertaModel)

from companion.measure import stored_bytes
from companion.memory import (METHODS, PUBLISHED_CONFIGS, SHARDINGS, bits_per_parameter, bytes_4bit, footprint, gb)

GQA = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
           intermediate_size=688, vocab_size=1000)  # k_proj, v_proj: 256 -> 64
ENC = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, vocab_size=500,
           max_position_embeddings=66)

# name: (config, model class, footprint kwargs); skip_modules is also passed to BitsAndBytesConfig
MODELS = {
    "llama-gqa": (LlamaConfig(**GQA), LlamaForCausalLM, {}),
    "qwen2-tied-qkv-bias": (Qwen2Config(**GQA, tie_word_embeddings=True), Qwen2ForCausalLM, {}),
    "mistral-seq-cls": (MistralConfig(**GQA, num_labels=3), MistralForSequenceClassification, {"head": "seq-cls"}),
    "roberta-bare": (RobertaConfig(**ENC), RobertaModel, {"head": "none"}),
    "roberta-seq-cls": (RobertaConfig(**ENC), RobertaForSequenceClassification, {"skip_modules": ["classifier"]}),
    "bert-seq-cls": (BertConfig(**ENC), BertForSequenceClassification, {"skip_modules": ["classifier"]}),
}


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each MODELS entry, randomly initialised and saved in bf16."""
    torch.manual_seed(0)
    paths = {}
    for name, (cfg, cls, _) in MODELS.items():
        paths[name] = tmp_path_factory.mktemp(name)
        cls(cfg).to(torch.bfloat16).save_pretrained(paths[name])
    return paths


def load_4bit(path, cls, double_quant, skip_modules=None, quant_storage=torch.uint8):
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16,
                                    llm_int8_skip_modules=skip_modules, bnb_4bit_quant_storage=quant_storage)
    return cls.from_pretrained(path, quantization_config=bnb_config, dtype=torch.bfloat16, device_map="cpu")


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4+dq"])
@pytest.mark.parametrize("name", MODELS)
def test_qlora_weight_bytes_equal_what_bitsandbytes_stores_to_the_byte(checkpoints, name, double_quant):
    cfg, cls, kw = MODELS[name]
    model = load_4bit(checkpoints[name], cls, double_quant, kw.get("skip_modules"))
    assert any(isinstance(p, bnb.nn.Params4bit) for p in model.parameters())
    report = footprint(cfg, "qlora", double_quant=double_quant, **kw)
    assert report.weight_bytes == stored_bytes(model)  # spec: within 0.5 %; it is exact


@pytest.mark.parametrize("name", MODELS)
def test_bf16_weight_bytes_and_total_params_equal_the_loaded_model(checkpoints, name):
    cfg, cls, kw = MODELS[name]
    model = cls.from_pretrained(checkpoints[name], dtype=torch.bfloat16, device_map="cpu")
    kw = {k: v for k, v in kw.items() if k != "skip_modules"}
    for method in ("full", "lora"):
        assert footprint(cfg, method, **kw).weight_bytes == stored_bytes(model)
    assert footprint(cfg, "full", **kw).total_params == sum(p.numel() for p in model.parameters())


def test_qlora_adapter_on_a_4bit_model_matches_peft_and_leaves_lm_head_alone(checkpoints):
    cfg, cls, _ = MODELS["llama-gqa"]
    peft_model = get_peft_model(load_4bit(checkpoints["llama-gqa"], cls, True),
                                LoraConfig(r=4, target_modules="all-linear"))
    report = footprint(cfg, "qlora", r=4, target_modules="all-linear", double_quant=True)
    assert report.trainable_params == report.adapter_params == trainable(peft_model)
    assert report.adapter_bytes == sum(p.nbytes for p in peft_model.parameters() if p.requires_grad)
    assert not hasattr(peft_model.base_model.model.lm_head, "lora_A")


LLAMA_TARGETS = [None, ["q_proj", "v_proj"], ["k_proj", "v_proj"], ["q_proj", "down_proj"], "all-linear",
                 r".*layers\.0\.self_attn\.(q|k)_proj"]


@pytest.mark.parametrize("r", [1, 4, 8])
@pytest.mark.parametrize("target_modules", LLAMA_TARGETS, ids=str)
def test_lora_adapter_params_equal_peft_trainable_count(r, target_modules):
    peft_model = get_peft_model(LlamaForCausalLM(LlamaConfig(**GQA)), LoraConfig(r=r, target_modules=target_modules))
    report = footprint(LlamaConfig(**GQA), "lora", r=r, target_modules=target_modules)
    assert report.adapter_params == report.trainable_params == trainable(peft_model)
    assert report.total_params == sum(p.numel() for p in peft_model.parameters())


@pytest.mark.parametrize("init_r", [2, 12])
@pytest.mark.parametrize("target_modules", LLAMA_TARGETS, ids=str)
def test_adalora_adapter_params_equal_peft_trainable_count(init_r, target_modules):
    config = AdaLoraConfig(init_r=init_r, target_r=1, total_step=10, target_modules=target_modules)
    peft_model = get_peft_model(LlamaForCausalLM(LlamaConfig(**GQA)), config)  # fp32 base: ranknum stays frozen
    report = footprint(LlamaConfig(**GQA), "adalora", r=init_r, target_modules=target_modules)
    assert report.adapter_params == trainable(peft_model)
    lora_e = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_E" in n)
    assert lora_e == init_r * len([n for n, _ in peft_model.named_parameters() if "lora_E" in n]) > 0


SEQ_CLS = {  # name: (config, model class, an explicit target list); None takes peft's default for the method
    "roberta": (RobertaConfig(**ENC), RobertaForSequenceClassification, ["dense"]),  # also matches classifier.dense
    "bert": (BertConfig(**ENC), BertForSequenceClassification, ["dense"]),  # also matches pooler.dense
    "llama": (LlamaConfig(**GQA), LlamaForSequenceClassification, ["o_proj", "score"]),
}


@pytest.mark.parametrize("method", ["lora", "adalora"])
@pytest.mark.parametrize("targets", ["default", "all-linear", "explicit"])
@pytest.mark.parametrize("name", SEQ_CLS)
def test_seq_cls_trainable_params_are_adapter_plus_head_as_peft_counts(name, targets, method):
    cfg, cls, explicit = SEQ_CLS[name]
    target_modules = {"default": None, "all-linear": "all-linear", "explicit": explicit}[targets]
    common = dict(target_modules=target_modules, task_type="SEQ_CLS")
    peft_config = (AdaLoraConfig(init_r=4, target_r=2, total_step=10, **common) if method == "adalora"
                   else LoraConfig(r=4, **common))
    peft_model = get_peft_model(cls(cfg), peft_config)
    report = footprint(cfg, method, r=4, target_modules=target_modules, head="seq-cls")
    assert report.trainable_params == trainable(peft_model)  # adapter + the head's modules_to_save copy
    assert report.adapter_params == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("name", PUBLISHED_CONFIGS)
def test_published_configs_match_models_built_on_the_meta_device(name):
    entry = PUBLISHED_CONFIGS[name]
    cfg = AutoConfig.for_model(**entry)
    auto = AutoModelForCausalLM if entry["model_type"] in ("llama", "mistral", "qwen2") else \
        AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(cfg)
    assert footprint(name, "full").total_params == sum(p.numel() for p in model.parameters())
    assert footprint(name, "full") == footprint(cfg, "full")


def test_llama_7b_counts_from_the_qlora_errata():
    assert footprint("llama-7b", "full").total_params == 6_738_415_616
    assert footprint("llama-7b", "lora", r=8).adapter_params == 4_194_304
    assert footprint("llama-2-7b", "lora", r=64).adapter_params == 33_554_432
    assert footprint("llama-2-7b", "qlora", r=64, target_modules="all-linear").adapter_params == 159_907_840


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bytes_4bit_matches_bitsandbytes_quant_state_for_odd_lengths(blocksize, double_quant):
    x = torch.randn(1000 * 37 + 3, dtype=torch.bfloat16)  # partial last block, odd element count
    packed, qs = bnb.functional.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant,
                                              quant_type="nf4")
    expected = packed.nbytes + qs.absmax.nbytes + (qs.state2.absmax.nbytes + qs.offset.nbytes if qs.nested else 0)
    assert bytes_4bit(x.numel(), blocksize=blocksize, double_quant=double_quant) == expected


def test_double_quantization_cuts_constants_from_half_a_bit_to_0_127_bit_per_parameter():
    assert bits_per_parameter(blocksize=64) == 4.5
    assert bits_per_parameter(blocksize=64, double_quant=True) == pytest.approx(4.127, abs=1e-3)
    no_dq, dq = footprint("llama-65b", "qlora"), footprint("llama-65b", "qlora", double_quant=True)
    saved = no_dq.weight_bytes - dq.weight_bytes
    assert 2.9e9 < saved < 3.1e9  # paper §1: "approximately 3 GB for a 65B model"


def test_full_finetuning_of_llama_65b_needs_more_than_780_gb_and_qlora_less_than_48_gb():
    full = footprint("llama-65b", "full")
    assert full.weight_bytes + full.grad_bytes + full.optimizer_bytes > 780e9  # paper abstract
    qlora = footprint("llama-65b", "qlora", double_quant=True, r=64, target_modules="all-linear",
                      optimizer="paged_adamw_32bit", gradient_checkpointing=True, adapter_dtype="bfloat16")
    assert qlora.total_bytes < 48e9  # artidoro/qlora: LoRA layers cast to bf16, fp32 paged optimizer states
    assert footprint("llama-65b", "qlora", double_quant=True, r=64, target_modules="all-linear").adapter_bytes \
        == 2 * qlora.adapter_bytes  # PEFT's default: fp32 adapters
    master = footprint("llama-65b", "full", master_weights=True)
    assert master.optimizer_bytes - full.optimizer_bytes == 4 * full.total_params


@pytest.mark.parametrize("optimizer", ["adamw", "adamw-8bit", "sgd"])
def test_optimizer_bytes_equal_the_state_torch_and_bitsandbytes_allocate(optimizer):
    cfg = LlamaConfig(**{**GQA, "hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 1024})
    peft_model = get_peft_model(LlamaForCausalLM(cfg), AdaLoraConfig(init_r=16, target_r=8, total_step=10,
                                                                     target_modules="all-linear"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt_cls = {"adamw": torch.optim.AdamW, "adamw-8bit": bnb.optim.AdamW8bit, "sgd": torch.optim.SGD}[optimizer]
    opt = opt_cls(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state_keys = ("exp_avg", "exp_avg_sq", "state1", "state2", "absmax1", "absmax2")  # not step, not code tables
    allocated = sum(t.nbytes for s in opt.state.values() for k, t in s.items() if k in state_keys)
    report = footprint(cfg, "adalora", r=16, target_modules="all-linear", optimizer=optimizer)
    assert report.optimizer_bytes == allocated


def test_adalora_importance_bytes_equal_the_rank_allocator_state():
    cfg = LlamaConfig(**GQA)
    peft_model = get_peft_model(LlamaForCausalLM(cfg), AdaLoraConfig(init_r=6, target_r=2, total_step=10))
    ids = torch.randint(0, 1000, (1, 16))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    allocator = peft_model.base_model.rankallocator
    allocator.update_ipt(peft_model)
    held = sum(t.nbytes for d in (allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc) for t in d.values())
    assert footprint(cfg, "adalora", r=6).importance_bytes == held


def saved_for_backward(model, inputs) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward pass, plus returned logits."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
    return sum(seen.values()) + (out.logits.nbytes if "labels" in inputs and out.logits.dim() == 3 else 0)


@pytest.mark.parametrize("cfg, cls", [
    (LlamaConfig(**{**GQA, "num_hidden_layers": 4}, attn_implementation="sdpa"), LlamaForCausalLM),
    (RobertaConfig(**{**ENC, "num_hidden_layers": 4}, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                   attn_implementation="sdpa"), RobertaForSequenceClassification)], ids=["llama", "roberta"])
def test_activation_estimate_is_within_15_percent_of_what_autograd_saves(cfg, cls):
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    labels = ids if cls is LlamaForCausalLM else torch.tensor([0, 1])
    kw = dict(batch_size=2, seq_len=64)
    model = cls(cfg).to(torch.bfloat16).train()
    full = saved_for_backward(model, dict(input_ids=ids, labels=labels))
    assert footprint(cfg, "full", **kw).activation_bytes == pytest.approx(full, rel=0.15)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = saved_for_backward(model, dict(input_ids=ids, labels=labels))
    one_layer = (full - checkpointed) / cfg.num_hidden_layers  # recomputed during backward
    estimate = footprint(cfg, "full", gradient_checkpointing=True, **kw).activation_bytes
    assert estimate == pytest.approx(checkpointed + one_layer, rel=0.15)


def test_report_adds_up_and_prints_decimal_gigabytes():
    report = footprint("llama-7b", "qlora", double_quant=True)
    parts = [v for k, v in report.as_dict().items() if k.endswith("_bytes") and k != "total_bytes"]
    assert report.total_bytes == sum(parts)
    assert gb(3_870_000_000) == "3.87 GB"
    assert gb(report.weight_bytes) == "3.87 GB" in str(report)  # research table: 7B NF4+DQ weights
    assert report.to_gb()["total_bytes"] == report.total_bytes / 1e9


@pytest.mark.parametrize("kwargs, message", [
    (dict(config=GPT2Config(), method="lora"), r"unsupported architecture model_type='gpt2'.*llama"),
    (dict(config="llama-8b", method="lora"), r"unknown published config 'llama-8b'.*llama-7b"),
    (dict(method="prefix"), r"unknown method 'prefix'.*qlora-adalora"),
    (dict(method="lora", r=0), r"r must be a positive integer.*got 0"),
    (dict(method="adalora", r=-4), r"r must be a positive integer.*got -4"),
    (dict(method="lora", target_modules=["query"]), r"'query' does not exist.*q_proj"),
    (dict(method="lora", target_modules=r"encoder\..*"), r"matches no Linear module.*down_proj"),
    (dict(method="qlora", blocksize=100), r"blocksize must be a power of two in \[32, 4096\].*100"),
    (dict(method="qlora", blocksize=8192), r"blocksize must be a power of two"),
    (dict(method="qlora", compute_dtype="float8"), r"unknown compute_dtype 'float8'.*bfloat16"),
    (dict(method="lora", optimizer="adam"), r"unknown optimizer 'adam'.*paged_adamw_8bit"),
    (dict(method="lora", head="token-cls"), r"unknown head 'token-cls'"),
    (dict(config="roberta-base", method="lora", head="causal-lm"), r"'causal-lm' for decoders only"),
    (dict(config="roberta-base", method="qlora"), r"classifier.*quantised to 4 bit.*skip_modules=\['classifier'\]"),
    (dict(config="mistral-7b", method="adalora"), r"no default target_modules for adalora on mistral"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_raises_value_error_naming_the_problem_and_the_choices(kwargs, message):
    kwargs = {"config": "llama-7b", **kwargs}
    with pytest.raises(ValueError, match=message):
        footprint(kwargs.pop("config"), **kwargs)


def test_compute_dtype_accepts_torch_dtypes_and_fp32_needs_no_master_copy():
    assert footprint("llama-7b", "qlora", compute_dtype=torch.bfloat16) == footprint("llama-7b", "qlora")
    fp32 = footprint("llama-7b", "full", compute_dtype="float32", master_weights=True)
    assert fp32.optimizer_bytes == 8 * fp32.total_params


# --- several cards: per-card bytes ------------------------------------------------------------------------------

def on_one_card(report):
    """The report with the multi-card labels of a single-card run, to compare the bytes alone."""
    return dataclasses.replace(report, world_size=1, sharding=None)


@pytest.mark.parametrize("sharding", [None, *SHARDINGS], ids=str)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["llama-2-7b", "roberta-base"])
def test_one_card_is_the_single_card_footprint_whatever_the_sharding_and_storage(name, method, sharding):
    kw = dict(r=4, target_modules="all-linear", double_quant=True, gradient_checkpointing=True, optimizer="adamw-8bit")
    if method.startswith("qlora") and name == "roberta-base":
        kw["skip_modules"] = ["classifier"]
    single = footprint(name, method, **kw)
    for storage in ("bfloat16", "float16", "float32") + (() if sharding == "fsdp" else ("uint8",)):
        report = footprint(name, method, world_size=1, sharding=sharding, quant_storage=storage, **kw)
        assert (report.world_size, report.sharding) == (1, sharding)
        assert on_one_card(report) == single


def per_rank(shape, world_size: int) -> int:
    """Elements of one FSDP rank: dim 0 cut into world_size chunks, each padded to the first's ceil(dim0 / ws) rows."""
    return math.ceil(shape[0] / world_size) * (math.prod(shape) // shape[0])


def fsdp_bytes(model, world_size: int, single_card_activations: int) -> dict:
    """Per-rank bytes of a (PEFT) model, from its own parameters: each sharded on dim 0 with padding; buffers and
    the 4-bit QuantState whole on every rank; gradients in the parameter's dtype, AdamW 8 B per trained element,
    AdaLoRA's three fp32 scores per lora_A/B/E element. ranknum is frozen (module docstring). Activations: the
    single-card ones plus the unsharded root group (parameters + gradients) and the largest layer's parameters
    twice and gradients once."""
    out = dict.fromkeys(["weight_bytes", "adapter_bytes", "grad_bytes", "optimizer_bytes", "importance_bytes"], 0)
    out["weight_bytes"] = sum(b.nbytes for b in model.buffers())
    whole: dict = {}  # layer (None: root) -> [unsharded parameter bytes, unsharded gradient bytes]
    for name, p in model.named_parameters():
        rank_bytes = per_rank(p.shape, world_size) * p.element_size()
        peft_added = any(key in name for key in ("lora_", "ranknum", "modules_to_save"))
        out["adapter_bytes" if peft_added else "weight_bytes"] += rank_bytes
        trained = p.requires_grad and "ranknum" not in name
        if trained:
            out["grad_bytes"] += rank_bytes
            out["optimizer_bytes"] += 8 * per_rank(p.shape, world_size)
        if re.search(r"lora_[ABE]\.", name) and "ranknum" not in name and hasattr(model, "peft_config") \
                and model.peft_config["default"].peft_type.value == "ADALORA":
            out["importance_bytes"] += 3 * rank_bytes
        if (qs := getattr(p, "quant_state", None)) is not None:
            out["weight_bytes"] += qs.absmax.nbytes + (qs.state2.absmax.nbytes + qs.offset.nbytes if qs.nested else 0)
        layer = re.search(r"\.layers?\.(\d+)\.", name)
        held = whole.setdefault(layer and int(layer[1]), [0, 0])
        held[0] += p.numel() * p.element_size()
        held[1] += p.numel() * p.element_size() if trained else 0
    root_params, root_grads = whole.pop(None)
    out["activation_bytes"] = (single_card_activations + root_params + root_grads
                               + max(2 * params + grads for params, grads in whole.values()))
    return out


def meta_model(cls, cfg, peft_config=None):
    """A bf16 model as from_pretrained(dtype=torch.bfloat16) builds it (fp32 rotary buffers), on the meta device."""
    with torch.device("meta"):
        model = cls._from_config(cfg, dtype=torch.bfloat16)
        return get_peft_model(model, peft_config) if peft_config else model


FSDP_CASES = {  # name: (config, footprint kwargs, model builder)
    "full": (LlamaConfig(**GQA), dict(method="full"), lambda cfg, _: meta_model(LlamaForCausalLM, cfg)),
    "lora": (LlamaConfig(**GQA), dict(method="lora", r=4, target_modules="all-linear"),
             lambda cfg, _: meta_model(LlamaForCausalLM, cfg, LoraConfig(r=4, target_modules="all-linear"))),
    "adalora": (LlamaConfig(**GQA), dict(method="adalora", r=4, target_modules="all-linear"),
                lambda cfg, _: meta_model(LlamaForCausalLM, cfg, AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                                               target_modules="all-linear"))),
    "qlora-bf16-storage": (LlamaConfig(**GQA), dict(method="qlora", r=4, target_modules="all-linear",
                                                     double_quant=True, quant_storage="bfloat16"),
                           lambda cfg, paths: get_peft_model(
                               load_4bit(paths["llama-gqa"], LlamaForCausalLM, True, quant_storage=torch.bfloat16),
                               LoraConfig(r=4, target_modules="all-linear"))),
    "roberta-seq-cls-lora": (RobertaConfig(**ENC), dict(method="lora", r=4, target_modules=["query", "value"]),
                             lambda cfg, _: meta_model(RobertaForSequenceClassification, cfg, LoraConfig(
                                 r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))),
}


@pytest.mark.parametrize("case", FSDP_CASES)
def test_fsdp_rank_holds_a_padded_dim0_chunk_of_every_tensor_peft_and_bitsandbytes_create(checkpoints, case):
    cfg, kw, build = FSDP_CASES[case]
    model = build(cfg, checkpoints)
    if case.startswith("qlora"):  # bitsandbytes views the packed codes in bf16: (n / 4, 1)
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        assert q_proj.dtype == torch.bfloat16 and q_proj.shape == (256 * 256 // 4, 1)
    single = footprint(cfg, **kw, batch_size=2, seq_len=64)
    for world_size in (2, 3, 7):  # 3, 7: padded chunks (256 rows, r=4, ranknum's single element)
        report = footprint(cfg, **kw, batch_size=2, seq_len=64, world_size=world_size, sharding="fsdp")
        expected = fsdp_bytes(model, world_size, single.activation_bytes)
        assert {k: getattr(report, k) for k in expected} == expected, world_size
        assert (report.world_size, report.sharding, report.trainable_params) == (world_size, "fsdp",
                                                                                 single.trainable_params)


@pytest.mark.parametrize("method", METHODS)
def test_ddp_holds_the_single_card_footprint_plus_a_bucket_copy_of_the_trainable_gradients(method):
    kw = dict(double_quant=True, target_modules="all-linear", gradient_checkpointing=True)
    single = footprint("llama-2-7b", method, **kw)
    grad_element = 2 if method == "full" else 4  # bf16 weights; PEFT's fp32 adapters
    for world_size in (2, 8):
        ddp = footprint("llama-2-7b", method, world_size=world_size, sharding="ddp", **kw)
        assert ddp.grad_bytes - single.grad_bytes == grad_element * single.trainable_params > 0
        assert on_one_card(dataclasses.replace(ddp, grad_bytes=single.grad_bytes)) == single


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("vocab, seq_len, heaviest", [(1000, 16, 0), (32000, 512, 1)],
                         ids=["layers-on-card-0", "logits-on-the-last-card"])
def test_device_map_reports_the_most_loaded_card_of_an_even_layer_split(vocab, seq_len, heaviest, checkpointing):
    cfg = LlamaConfig(**{**GQA, "num_hidden_layers": 5, "vocab_size": vocab})
    model = meta_model(LlamaForCausalLM, cfg, LoraConfig(r=4, target_modules="all-linear"))
    layers_on = [3, 2]  # 5 layers on 2 cards: the first card takes the extra one
    first_layer = [0, 3]
    cards = [dict.fromkeys(["weight_bytes", "adapter_bytes", "grad_bytes", "optimizer_bytes"], 0) for _ in range(2)]
    cards[0]["weight_bytes"] += sum(b.nbytes for b in model.buffers())  # rotary inv_freq: with the embeddings
    for name, p in model.named_parameters():
        layer = re.search(r"\.layers\.(\d+)\.", name)
        card = (int(layer[1]) >= first_layer[1]) if layer else (0 if "embed_tokens" in name else 1)
        cards[card]["adapter_bytes" if "lora_" in name else "weight_bytes"] += p.nbytes
        if p.requires_grad:
            cards[card]["grad_bytes"] += p.nbytes
            cards[card]["optimizer_bytes"] += 8 * p.numel()
    common = dict(batch_size=2, seq_len=seq_len, gradient_checkpointing=checkpointing)
    for card, k in enumerate(layers_on):  # activations of its layers; the last card also keeps the logits
        only = footprint({**cfg.to_dict(), "num_hidden_layers": k}, "full", head="none", **common)
        cards[card]["activation_bytes"] = only.activation_bytes + (2 * seq_len * vocab * (2 + 4) if card == 1 else 0)
    assert max(range(2), key=lambda c: sum(cards[c].values())) == heaviest
    report = footprint(cfg, "lora", r=4, target_modules="all-linear", world_size=2, sharding="device_map", **common)
    assert {k: getattr(report, k) for k in cards[heaviest]} == cards[heaviest]
    assert report.importance_bytes == 0 and (report.world_size, report.sharding) == (2, "device_map")


def test_per_card_bytes_fall_with_more_cards_and_the_report_says_per_card():
    kw = dict(r=8, target_modules="all-linear", double_quant=True, gradient_checkpointing=True,
              quant_storage="bfloat16")
    single = footprint("llama-2-70b", "qlora", **kw).total_bytes
    fsdp = [footprint("llama-2-70b", "qlora", world_size=n, sharding="fsdp", **kw).total_bytes for n in (2, 4, 8)]
    split = [footprint("llama-2-70b", "qlora", world_size=n, sharding="device_map", **kw).total_bytes
             for n in (2, 4, 8)]
    assert single > fsdp[0] > fsdp[1] > fsdp[2] and single > split[0] > split[1] > split[2]
    assert "per card of 4 (fsdp)" in str(footprint("llama-2-70b", "qlora", world_size=4, sharding="fsdp", **kw))


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=0, sharding="fsdp"), r"world_size must be a positive integer number of cards.*got 0"),
    (dict(world_size=2.0, sharding="fsdp"), r"world_size must be a positive integer.*got 2\.0"),
    (dict(world_size=True, sharding="ddp"), r"world_size must be a positive integer.*got True"),
    (dict(world_size="2", sharding="ddp"), r"world_size must be a positive integer.*got '2'"),
    (dict(world_size=2), r"world_size=2 needs a sharding: 'ddp' .*'fsdp' .*'device_map' .*pass sharding="),
    (dict(world_size=2, sharding="zero3"), r"unknown sharding 'zero3'; choose one of None .*'ddp', 'fsdp' or "
                                           r"'device_map'"),
    (dict(quant_storage="int8"), r"unknown quant_storage 'int8' \(bnb_4bit_quant_storage\).*'bfloat16'"),
    (dict(method="qlora", world_size=2, sharding="fsdp"),
     r"Cannot flatten integer dtype tensors.*BitsAndBytesConfig\(bnb_4bit_quant_storage=torch\.bfloat16\).*"
     r"quant_storage='bfloat16'"),
    (dict(method="qlora-adalora", world_size=1, sharding="fsdp", compute_dtype="float16"),
     r"FSDP cannot shard 4-bit weights stored as uint8.*torch\.float16.*quant_storage='float16'"),
    (dict(world_size=33, sharding="device_map"), r"cannot split 32 layers over 33 cards.*pass world_size <= 32"),
    (dict(config=dict(model_type="llama", hidden_size=6, num_hidden_layers=1, num_attention_heads=1,
                      intermediate_size=10, vocab_size=100), method="qlora", quant_storage="float32"),
     r"q_proj: 36 4-bit codes pack into 18 bytes, not a multiple of 4.*pass quant_storage='uint8'"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_card_arguments_raise_naming_the_fix(kwargs, message):
    kwargs = {"config": "llama-7b", "method": "lora", **kwargs}
    with pytest.raises(ValueError, match=message):
        footprint(kwargs.pop("config"), **kwargs)
