"""PEFT's LoRA on the companion's :class:`~companion.quant.Linear4bit`, merging like on bitsandbytes'.

PEFT picks the LoRA layer for a module by its type (``peft.tuners.lora.model.LoraModel._create_new_module``).
bitsandbytes' ``Linear4bit`` gets ``peft.tuners.lora.bnb.Linear4bit``, whose ``merge`` dequantizes the
base weight, adds ``Delta W = B A * scaling`` and quantizes the sum again. The companion's
``Linear4bit`` is an ``nn.Linear`` to PEFT, so a plain ``LoraConfig`` wraps it with ``lora.Linear``,
which trains fine but would merge by adding ``Delta W`` to the packed codes (the companion's
``Params4bit`` refuses that with a ``RuntimeError`` naming this module).

:func:`register_lora_linear4bit` registers :class:`LoraLinear4bit` for the companion's layer through
PEFT's documented custom-module hook (``LoraConfig._register_custom_module``, developer guide
"Custom models"). The layer is PEFT's bitsandbytes LoRA layer (same forward, ``get_delta_weight``
and variants such as DoRA) with ``merge``/``unmerge`` redone on the companion's quantizer, which is
bit-exact with bitsandbytes on a CPU, so the merged codes equal PEFT + bitsandbytes' codes::

    config = register_lora_linear4bit(LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(replace_linear(model), config)
    ...
    merged = model.merge_and_unload()   # Linear4bit layers holding the re-quantized W + Delta W

One deliberate difference: with ``lora_bias=True`` PEFT's bitsandbytes merge adds the LoRA bias
unscaled, although its forward scales it; this merge scales it, as PEFT's ``lora.Linear`` does,
so the merged layer computes what the unmerged one did.
"""

from __future__ import annotations

import warnings

import torch
from peft import AdaLoraConfig, LoraConfig
from peft.tuners.tuners_utils import check_adapters_to_merge

from .linear4bit import Linear4bit

try:
    from peft.tuners.lora.bnb import Linear4bit as _PeftBnbLinear4bit
except ImportError as err:  # peft defines it only when bitsandbytes is installed
    raise ImportError("companion.quant.peft_lora builds on PEFT's bitsandbytes LoRA layer; install bitsandbytes "
                      "(pip install bitsandbytes>=0.50)") from err


class LoraLinear4bit(_PeftBnbLinear4bit):
    """``peft.tuners.lora.bnb.Linear4bit`` over a companion ``Linear4bit``: merging dequantizes with
    :meth:`Linear4bit.dequantized_weight` (dtype ``quant_state.dtype``), adds the adapter's
    ``Delta W`` (out, in) and re-quantizes with :meth:`Linear4bit.requantize`, with the rounding
    warning PEFT gives. ``safe_merge=True`` raises ``ValueError`` on NaN before anything changes."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            warnings.warn("Merge lora module to 4-bit linear may get different generations due to rounding errors.")
            base = self.get_base_layer()
            weight = base.dequantized_weight()
            if adapter not in self.lora_variant:  # vanilla LoRA
                merged = weight + self.get_delta_weight(adapter)
            else:
                merged = self.lora_variant[adapter].merge_safe(self, adapter, weight)
            bias = self._lora_bias(adapter)
            if safe_merge and not (torch.isfinite(merged).all() and (bias is None or torch.isfinite(bias).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            base.requantize(merged)
            if bias is not None:
                base.bias.data += bias
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            warnings.warn("Unmerge lora module to 4-bit linear may get different generations due to rounding errors.")
            base = self.get_base_layer()
            weight = base.dequantized_weight()
            if adapter not in self.lora_variant:
                base.requantize(weight - self.get_delta_weight(adapter))
            else:
                base.requantize(self.lora_variant[adapter].unmerge(self, adapter, weight))
            bias = self._lora_bias(adapter)
            if bias is not None:
                base.bias.data -= bias

    def _lora_bias(self, adapter: str) -> torch.Tensor | None:
        """The LoRA bias as the forward adds it: ``lora_B.bias * scaling`` (None without ``lora_bias``)."""
        if not self.lora_bias[adapter]:
            return None
        if self.get_base_layer().bias is None:
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
        return (self.lora_B[adapter].bias * self.scaling[adapter]).detach()


def register_lora_linear4bit(config: LoraConfig) -> LoraConfig:
    """Make ``get_peft_model(model, config)`` wrap every companion ``Linear4bit`` it targets with
    :class:`LoraLinear4bit`, so that ``merge_and_unload``, ``merge_adapter`` and ``unmerge_adapter``
    work as for bitsandbytes' 4-bit layers. Registers through ``config._register_custom_module``
    (kept by the config object only, not by ``save_pretrained``: register again on the config you
    load with). Returns ``config``. Raises ``TypeError`` for anything but a ``LoraConfig``
    (AdaLoRA's PEFT model has no such hook; companion.adalora.SVDLinear covers 4-bit bases)."""
    if isinstance(config, AdaLoraConfig) or not isinstance(config, LoraConfig):
        raise TypeError(f"register_lora_linear4bit takes a peft.LoraConfig, got {type(config).__name__}; PEFT's "
                        "AdaLoRA does not dispatch custom layers (and does not merge into 4-bit bases either)")
    config._register_custom_module({Linear4bit: LoraLinear4bit})
    return config
