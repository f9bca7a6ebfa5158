"""Fast kernels for :mod:`companion.quant.blockwise`, in plain vectorised torch, bit-exact with the
readable reference path (the tests check both against bitsandbytes).

**Encoding** (value -> 4-bit code). The reference scales each value, ``s = x * (1 / absmax)``, and
binary-searches 15 thresholds (``torch.bucketize``). Here one fused pass computes a bucket number
``k = int(32768 + x * (32767 / absmax))``, so ``k`` is, to within 0.01, ``32768 + 32767 * s``,
and a 65,538-entry uint8 table maps ``k`` to the code. A bucket that lies within two of a
threshold's own bucket is *ambiguous* (table entry 255): only for those values, well under 1% of
them, is ``s`` computed exactly as bitsandbytes does and compared with the thresholds. Outside
those buckets the error bound above decides the side of every threshold, so the codes are the
reference's codes. Blocks with a maximum below 1e-30 (where ``32767 / absmax`` would overflow)
are sent to the exact path whole.

**Decoding** (code -> value). Every 2 packed bytes (4 codes, never split by a block, since
blocksizes are multiples of 4) are read as one uint16 and looked up in a 65,536 x 4 table of code
values (one gather per 4 values instead of unpacking nibbles; each row of 4 float32 is moved as
one 16-byte complex128 element, which torch gathers faster than a 2-D row), then multiplied by the block's
absmax in place: ``code[q] * absmax``, the same single float32 product as bitsandbytes' kernel,
rounded once to the output dtype.
"""

from __future__ import annotations

import sys
from functools import lru_cache

import torch

from .codebooks import thresholds

_C, _D = 32767.0, 32768.0  # bucket k = int(_D + _C * s) for s in [-1, 1]
_TINY = 1e-30  # blocks with absmax below this take the exact path (32767 / absmax would overflow)
_SENTINEL = 65537.0  # bucket of those blocks
_AMBIGUOUS = 255
CHUNK = 1 << 22  # elements per chunk of the encoder's float32 and int32 temporaries
LITTLE_ENDIAN = sys.byteorder == "little"


def _key(code: torch.Tensor) -> bytes:
    return code.detach().cpu().float().contiguous().numpy().tobytes()


@lru_cache(maxsize=16)
def _encode_table(code_bytes: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    bounds, order = thresholds(code)
    k_bounds = (bounds * _C + _D).to(torch.int64)  # bucket of each threshold, (15,)
    k = torch.arange(65538)
    table = order[(k_bounds[None, :] < k[:, None]).sum(1)].to(torch.uint8)  # thresholds surely below s
    for kb in k_bounds.tolist():
        table[max(kb - 2, 0): kb + 3] = _AMBIGUOUS
    table[65536:] = _AMBIGUOUS  # 65537: the sentinel bucket of tiny blocks
    return table


@lru_cache(maxsize=16)
def _decode_table(code_bytes: bytes) -> torch.Tensor:
    """(65536, 4) float32: the 4 code values of the two bytes whose little-endian uint16 is the row."""
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    u = torch.arange(65536)
    lo, hi = u & 0xFF, u >> 8  # first byte in memory, second byte
    return torch.stack([code[lo >> 4], code[lo & 15], code[hi >> 4], code[hi & 15]], 1).contiguous()


def encode_full_blocks(x: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out: torch.Tensor) -> None:
    """Write the packed codes of ``x`` (blocks, blocksize), scaled by ``absmax`` (blocks,), into ``out``
    (blocks * blocksize // 2 uint8), even index in the high nibble."""
    blocks, blocksize = x.shape
    device = x.device
    table = _encode_table(_key(code)).to(device)
    bounds, order = (t.to(device) for t in thresholds(code))
    recip = 1.0 / absmax.clamp(min=1e-38)  # exactly bitsandbytes' scale
    tiny = absmax < _TINY
    rc = torch.where(tiny, 0.0, recip * _C)[:, None]  # (blocks, 1)
    d = torch.where(tiny, _SENTINEL, _D)[:, None]
    rows = max(1, CHUNK // blocksize)
    g = torch.empty(min(rows, blocks), blocksize, dtype=torch.float32, device=device)
    k = torch.empty(g.numel(), dtype=torch.int32, device=device)
    q = torch.empty(blocks * blocksize, dtype=torch.uint8, device=device)  # one code per value
    for r0 in range(0, blocks, rows):  # few large ops: each op's threads must meet, costly on a busy CPU
        m = min(rows, blocks - r0)
        gm, km = g[:m], k[: m * blocksize]
        torch.addcmul(d[r0:r0 + m], x[r0:r0 + m], rc[r0:r0 + m], out=gm)  # 32768 + 32767 * s, roughly
        km.copy_(gm.view(-1))  # truncation to the bucket number
        torch.index_select(table, 0, km, out=q[r0 * blocksize: (r0 + m) * blocksize])
    amb = (q == _AMBIGUOUS).nonzero().squeeze(1)
    if amb.numel():  # exact path: s as bitsandbytes computes it, then the thresholds
        s = x.reshape(-1)[amb].float() * recip[amb // blocksize]
        q[amb] = order[torch.bucketize(s.clamp(-1, 1), bounds)].to(torch.uint8)
    torch.add(q[1::2], q[0::2], alpha=16, out=out[: q.numel() // 2])  # (q[0::2] << 4) | q[1::2]


def can_decode(packed: torch.Tensor, n: int) -> bool:
    """The fast decoder reads whole groups of 4 codes as uint16 on a little-endian machine."""
    return (LITTLE_ENDIAN and hasattr(torch, "uint16") and n % 4 == 0 and packed.is_contiguous()
            and packed.storage_offset() % 2 == 0)


def decode(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int, code: torch.Tensor,
           dtype: torch.dtype) -> torch.Tensor:
    """``code[q] * absmax[block]`` for the ``n`` codes in ``packed`` (uint8, n // 2 bytes), as ``dtype``."""
    table = _decode_table(_key(code)).to(packed.device).view(torch.complex128).view(-1)  # 16 bytes per row
    words = packed.reshape(-1)[: n // 2].view(torch.uint16).to(torch.int32)  # (n // 4,): 4 codes each
    values = torch.index_select(table, 0, words).view(torch.float32)  # (n,) code values, copied bit for bit
    full = n - n % blocksize
    blocks = full // blocksize
    out = values if dtype == torch.float32 else torch.empty(n, dtype=dtype, device=packed.device)
    # one float32 product per value, rounded once into ``out`` (bitsandbytes: code[q] * scale, then the cast)
    torch.mul(values[:full].view(blocks, blocksize), absmax[:blocks, None], out=out[:full].view(blocks, blocksize))
    if full < n:
        torch.mul(values[full:], absmax[blocks], out=out[full:])
    return out
