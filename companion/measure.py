"""Measure what a loaded model really holds, to check :func:`companion.memory.footprint`.

* :func:`stored_bytes` -- every parameter and buffer as stored, plus the quantization state
  bitsandbytes keeps beside each 4-bit weight (``QuantState.absmax``; with double
  quantization the nested ``state2.absmax`` and the ``offset``). transformers'
  ``get_memory_footprint()`` leaves that state out, so it cannot show the saving of double
  quantization (the shared 16- and 256-entry code tables are not counted here either).
* :func:`load_in_4bit` -- round-trip a model through ``save_pretrained`` and
  ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))``,
  the way a hub checkpoint is loaded in 4 bit. bitsandbytes >= 0.50 does this on a CPU too.
"""

from __future__ import annotations

import tempfile

import torch


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers, plus bitsandbytes 4-bit quantization state."""
    total = sum(b.nbytes for b in model.buffers())
    for p in model.parameters():
        total += p.nbytes
        qs = getattr(p, "quant_state", None)  # bitsandbytes.nn.Params4bit
        if qs is not None:
            total += qs.absmax.nbytes
            if qs.nested:
                total += qs.state2.absmax.nbytes + qs.offset.nbytes
    return total


def trainable_parameters(model: torch.nn.Module) -> int:
    """Number of parameters with ``requires_grad=True``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_in_4bit(model, *, double_quant: bool = True, quant_type: str = "nf4",
                 compute_dtype: torch.dtype = torch.bfloat16, skip_modules: list[str] | None = None,
                 device_map: str = "cpu"):
    """Save ``model`` (a transformers model) and load it back with 4-bit NF4 weights.

    ``skip_modules`` becomes ``llm_int8_skip_modules``: when given it *replaces* transformers'
    default list, so include ``"lm_head"`` (causal LMs) or ``"classifier"`` (encoders) yourself.

    The returned model keeps ``model``'s ``name_or_path`` (not the deleted temporary folder), which
    PEFT writes into ``adapter_config.json``, and has
    :func:`companion.qlora.keep_dequantize_kernel_on_cpu` applied: on a CPU it computes with
    bitsandbytes' dequantize-then-matmul path in every mode, whatever the CPU supports.
    """
    from transformers import BitsAndBytesConfig

    from .qlora import keep_dequantize_kernel_on_cpu

    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                    bnb_4bit_use_double_quant=double_quant,
                                    bnb_4bit_compute_dtype=compute_dtype,
                                    llm_int8_skip_modules=skip_modules)
    with tempfile.TemporaryDirectory() as tmp:
        model.to(compute_dtype).save_pretrained(tmp)
        loaded = type(model).from_pretrained(tmp, quantization_config=bnb_config, dtype=compute_dtype,
                                             device_map=device_map)
    loaded.name_or_path = loaded.config._name_or_path = model.name_or_path
    return keep_dequantize_kernel_on_cpu(loaded)
