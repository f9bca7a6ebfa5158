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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
