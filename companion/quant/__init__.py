"""4-bit NormalFloat and double quantization from first principles (Chapter 4, part 1), bit-exact
with bitsandbytes 0.50 on a CPU.

- :mod:`~companion.quant.codebooks`    -- NF4, FP4, Int4, the equal-bin variant, the 8-bit dynamic map
- :mod:`~companion.quant.blockwise`    -- ``quantize_4bit`` / ``dequantize_4bit`` (blockwise absmax, packing)
- :mod:`~companion.quant.fast`         -- the table-driven kernels ``blockwise`` runs on
- :mod:`~companion.quant.dynamic`      -- blockwise 8-bit quantization (bitsandbytes' CPU lookup table)
- :mod:`~companion.quant.double_quant` -- quantizing the block constants again (paper Eq. 5-6)
- :mod:`~companion.quant.state`        -- ``QuantState``, convertible to and from bitsandbytes'
- :mod:`~companion.quant.linear4bit`   -- a frozen 4-bit ``Linear4bit`` (and its ``Params4bit``) a LoRA
  adapter can sit on, a stand-in for bitsandbytes' (state_dict included)
- :mod:`~companion.quant.peft_lora`    -- ``register_lora_linear4bit``: PEFT's LoRA merges into it as into
  bitsandbytes' layer (imported on first use: it loads PEFT)
- :mod:`~companion.quant.metrics`      -- bits per parameter, quantization error tables

Quick look::

    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    w_hat = dequantize_4bit(packed, state)        # same dtype and shape as w
    bits_per_parameter(state)                     # 4.127 for a large w
"""

from .blockwise import BLOCKSIZES, dequantize_4bit, encode_reference, quantize_4bit
from .codebooks import (QUANT_TYPES, create_dynamic_map, create_normal_map, equal_bin_codebook, fp4_codebook,
                        get_codebook, int4_codebook, nf4_codebook, paper_eq4_levels, thresholds)
from .double_quant import NESTED_BLOCKSIZE, double_dequantize, double_quantize
from .dynamic import dequantize_blockwise, quantize_blockwise
from .linear4bit import Linear4bit, Params4bit, replace_linear
from .metrics import bits_per_parameter, error_table, quantization_error, roundtrip
from .state import QuantState

__all__ = [
    "BLOCKSIZES", "Linear4bit", "LoraLinear4bit", "NESTED_BLOCKSIZE", "Params4bit", "QUANT_TYPES", "QuantState",
    "bits_per_parameter", "create_dynamic_map", "create_normal_map", "dequantize_4bit", "dequantize_blockwise",
    "double_dequantize",
    "double_quantize", "encode_reference", "equal_bin_codebook", "error_table", "fp4_codebook", "get_codebook",
    "int4_codebook", "nf4_codebook", "paper_eq4_levels", "quantization_error", "quantize_4bit",
    "quantize_blockwise", "register_lora_linear4bit", "replace_linear", "roundtrip", "thresholds",
]


def __getattr__(name):  # PEP 562: importing PEFT only when its LoRA layer is asked for
    if name in ("LoraLinear4bit", "register_lora_linear4bit"):
        from . import peft_lora

        return getattr(peft_lora, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
