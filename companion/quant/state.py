"""What a 4-bit tensor needs besides its packed codes: a mirror of ``bitsandbytes.functional.QuantState``.

Field for field the same as bitsandbytes (QLoRA paper §3, Eq. 5-6):

- ``absmax``: one float32 scale per block of ``blocksize`` values; with double quantization the
  uint8 codes of ``absmax - offset`` on the 8-bit dynamic map instead;
- ``shape``, ``dtype``: shape and dtype of the original tensor (dequantization returns them);
- ``blocksize``, ``quant_type``, ``code``: the block length and the 16-value codebook;
- ``offset``: the mean of the float32 block maxima (double quantization only, a 0-dim tensor);
- ``state2``: the second level, a ``QuantState`` of its own with the float32 ``absmax`` of every
  256 first-level constants, the 256-value ``code`` and ``blocksize`` 256.

:meth:`QuantState.to_bnb` and :meth:`QuantState.from_bnb` convert without copying tensors, so
bitsandbytes can dequantize what the companion quantized, and the other way round.
:meth:`QuantState.as_dict` and :meth:`QuantState.from_dict` write and read the state-dict entries
bitsandbytes' ``Linear4bit`` saves beside its weight, in bitsandbytes' format.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

PACKED_KEY = "quant_state.bitsandbytes__"  # + quant_type: the JSON of the non-tensor fields, as uint8
TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
PLAIN_KEYS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # "float32", as bitsandbytes' str(dtype).strip("torch.")


def _dtype(name, key: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{key} must name a torch dtype such as 'float32', got {name!r}")
    return dtype


@dataclass(eq=False)
class QuantState:
    """The quantization state of one 4-bit tensor (or, as ``state2``, of its block constants)."""

    absmax: torch.Tensor
    shape: torch.Size | None = None
    code: torch.Tensor | None = None
    blocksize: int = 64
    quant_type: str | None = None
    dtype: torch.dtype = torch.float32
    offset: torch.Tensor | None = None
    state2: "QuantState | None" = None

    @property
    def nested(self) -> bool:
        """True with double quantization (``bitsandbytes`` ``compress_statistics=True``)."""
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def state_bytes(self) -> int:
        """Bytes of the per-tensor state that grows with the tensor: ``absmax``, and with double
        quantization ``state2.absmax`` and ``offset``. The shared code tables (16 and 256 float32
        values) are not counted, as in :func:`companion.memory.bytes_4bit`."""
        n = self.absmax.nbytes
        if self.nested:
            n += self.state2.absmax.nbytes + self.offset.nbytes
        return n

    def to(self, device) -> "QuantState":
        """A copy of the state on ``device``."""
        def move(t):
            return None if t is None else t.to(device)
        return QuantState(move(self.absmax), self.shape, move(self.code), self.blocksize, self.quant_type,
                          self.dtype, move(self.offset), self.state2.to(device) if self.nested else None)

    def as_dict(self, packed: bool = False) -> dict:
        """The state as bitsandbytes' ``QuantState.as_dict`` writes it: ``absmax``, ``quant_map``
        (the code), ``quant_type``, ``blocksize``, ``dtype``, ``shape`` and, with double quantization,
        ``nested_absmax``, ``nested_quant_map``, ``nested_blocksize``, ``nested_dtype``,
        ``nested_offset`` (a float). ``packed=True`` keeps the tensors and packs the other fields
        as JSON into one uint8 tensor under ``"quant_state.bitsandbytes__<quant_type>"``: what
        ``Linear4bit._save_to_state_dict`` stores under ``"<prefix>weight."``, byte for byte."""
        d = {"quant_type": self.quant_type, "absmax": self.absmax, "blocksize": self.blocksize,
             "quant_map": self.code, "dtype": _dtype_name(self.dtype), "shape": tuple(self.shape)}
        if self.nested:
            d.update(nested_absmax=self.state2.absmax, nested_blocksize=self.state2.blocksize,
                     nested_quant_map=self.state2.code.clone(),  # not shared with other layers (safetensors)
                     nested_dtype=_dtype_name(self.state2.dtype), nested_offset=self.offset.item())
        if not packed:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        plain = json.dumps({k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}).encode()
        tensors[PACKED_KEY + self.quant_type] = torch.tensor(list(plain), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict, device=None, name: str = "quant_state") -> "QuantState":
        """The inverse of :meth:`as_dict` (packed or not), as bitsandbytes' ``QuantState.from_dict``:
        keys without the ``"<prefix>weight."`` part, tensors moved to ``device``. ``name`` (the
        state-dict prefix) is only used in error messages, which name the missing or unknown key."""
        qs = dict(qs_dict)
        packed = [k for k in qs if k.startswith(PACKED_KEY)]
        if len(packed) > 1:
            raise ValueError(f"{name}: expected one {PACKED_KEY}<quant_type> entry, got {sorted(packed)}")
        if packed:
            blob = qs.pop(packed[0])
            try:
                qs.update(json.loads(bytes(blob.detach().cpu().to(torch.uint8).tolist()).decode()))
            except (ValueError, UnicodeDecodeError) as err:
                raise ValueError(f"{name}.{packed[0]} is not the JSON bitsandbytes packs there: {err}") from err
        unknown = sorted(set(qs) - set(TENSOR_KEYS) - set(PLAIN_KEYS))
        if unknown:
            raise ValueError(f"{name}: unknown quant-state entries {unknown}; expected {TENSOR_KEYS + PLAIN_KEYS}")
        nested_keys = [k for k in TENSOR_KEYS + PLAIN_KEYS if k.startswith("nested_")]
        needed = [k for k in TENSOR_KEYS + PLAIN_KEYS if not k.startswith("nested_")]
        if any(k in qs for k in nested_keys):
            needed += nested_keys
        missing = [k for k in needed if k not in qs]
        if missing:
            raise ValueError(f"{name}: the checkpoint lacks the quant-state entries {missing} (keys "
                             f"'{name}.<entry>'); save it from a 4-bit Linear4bit, whose state_dict carries them")

        def tensor(key):
            return qs[key].to(device) if device is not None else qs[key]
        state2 = offset = None
        if "nested_absmax" in qs:
            # exact: a float32 offset goes through a JSON double and back
            offset = torch.tensor(float(qs["nested_offset"]), dtype=torch.float32, device=device)
            state2 = cls(absmax=tensor("nested_absmax"), code=tensor("nested_quant_map"),
                         blocksize=int(qs["nested_blocksize"]),
                         dtype=_dtype(qs["nested_dtype"], f"{name}.nested_dtype"))
        return cls(absmax=tensor("absmax"), shape=torch.Size(qs["shape"]), code=tensor("quant_map"),
                   blocksize=int(qs["blocksize"]), quant_type=qs["quant_type"],
                   dtype=_dtype(qs["dtype"], f"{name}.dtype"), offset=offset, state2=state2)

    def to_bnb(self):
        """This state as a ``bitsandbytes.functional.QuantState`` (same tensors, no copy)."""
        from bitsandbytes.functional import QuantState as BnbQuantState

        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bitsandbytes only dequantizes quant_type 'nf4' and 'fp4', this state is "
                             f"{self.quant_type!r}")
        state2 = None
        if self.nested:
            state2 = BnbQuantState(absmax=self.state2.absmax, code=self.state2.code,
                                   blocksize=self.state2.blocksize, dtype=self.state2.dtype)
        return BnbQuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=self.code,
                             blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.dtype,
                             offset=self.offset, state2=state2)

    @classmethod
    def from_bnb(cls, qs) -> "QuantState":
        """The companion mirror of a ``bitsandbytes.functional.QuantState`` from ``quantize_4bit``."""
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("this QuantState was repacked for bitsandbytes' AVX512-BF16 CPU kernel "
                             "(Linear4bit eval forward); convert it before that forward, or call "
                             "bitsandbytes.functional._convert_weight_packed_for_cpu_inverse first")
        if qs.shape is None or qs.quant_type is None:
            raise ValueError("expected the QuantState of a 4-bit tensor (with shape and quant_type), "
                             "got the state of an 8-bit blockwise quantization")
        state2 = None
        if qs.nested:
            state2 = cls(absmax=qs.state2.absmax, code=qs.state2.code, blocksize=qs.state2.blocksize,
                         dtype=qs.state2.dtype)
        return cls(absmax=qs.absmax, shape=torch.Size(qs.shape), code=qs.code, blocksize=qs.blocksize,
                   quant_type=qs.quant_type, dtype=qs.dtype, offset=qs.offset, state2=state2)
