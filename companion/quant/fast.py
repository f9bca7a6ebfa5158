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
are sent to the exact path whole. The work is done in chunks that stay in the CPU cache.

**Decoding** (code -> value). Every 2 packed bytes (4 codes, never split by a block, since
blocksizes are multiples of 4) are read as one int16 and looked up in a 65,536 x 4 table of code
values; ``embedding_bag`` with per-sample weights does the lookup and the multiplication by the
block's absmax in one pass: ``code[i] * absmax``, the same single float32 product as
bitsandbytes' kernel, then one rounding to the output dtype.
"""

from __future__ import annotations

import sys
from functools import lru_cache

import torch
import torch.nn.functional as F

from .codebooks import thresholds

_C, _D = 32767.0, 32768.0  # bucket k = int(_D + _C * s) for s in [-1, 1]
_TINY = 1e-30  # blocks with absmax below this take the exact path (32767 / absmax would overflow)
_SENTINEL = 65537.0  # bucket of those blocks
_AMBIGUOUS = 255
CHUNK = 1 << 18  # elements per chunk: the work set (~2.5 MB) stays in cache
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
    """(65536, 4) float32: the 4 code values of the int16 ``v``, at row ``v + 32768``."""
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    u = torch.arange(-32768, 32768) & 0xFFFF  # the two bytes of a little-endian int16
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
    q = torch.empty(g.numel(), dtype=torch.uint8, device=device)
    for r0 in range(0, blocks, rows):
        m = min(rows, blocks - r0)
        gm, km, qm = g[:m], k[: m * blocksize], q[: m * blocksize]
        torch.addcmul(d[r0:r0 + m], x[r0:r0 + m], rc[r0:r0 + m], out=gm)  # 32768 + 32767 * s, roughly
        km.copy_(gm.view(-1))  # truncation to the bucket number
        torch.index_select(table, 0, km, out=qm)
        amb = (qm == _AMBIGUOUS).nonzero().squeeze(1)
        if amb.numel():  # exact path: s as bitsandbytes computes it, then the thresholds
            s = x[r0:r0 + m].reshape(-1)[amb].float() * recip[r0 + amb // blocksize]
            qm[amb] = order[torch.bucketize(s.clamp(-1, 1), bounds)].to(torch.uint8)
        half = m * blocksize // 2
        torch.add(qm[1::2], qm[0::2], alpha=16, out=out[r0 * blocksize // 2: r0 * blocksize // 2 + half])


def can_decode(packed: torch.Tensor, n: int) -> bool:
    """The fast decoder reads whole groups of 4 codes as int16 on a little-endian machine."""
    return LITTLE_ENDIAN and n % 4 == 0 and packed.is_contiguous() and packed.storage_offset() % 2 == 0


def decode(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int, code: torch.Tensor,
           dtype: torch.dtype) -> torch.Tensor:
    """``code[q] * absmax[block]`` for the ``n`` codes in ``packed`` (uint8, n // 2 bytes), as ``dtype``."""
    device = packed.device
    table = _decode_table(_key(code)).to(device)
    words = packed.reshape(-1)[: n // 2].view(torch.int16)  # (n // 4,): 4 codes each
    groups, per_block = words.numel(), blocksize // 4
    out = torch.empty(n, dtype=dtype, device=device)
    rows = max(per_block, CHUNK // 4 // per_block * per_block)  # whole blocks per chunk
    idx = torch.empty(min(rows, groups), dtype=torch.int32, device=device)
    offsets = torch.arange(idx.numel(), dtype=torch.int32, device=device)  # bags of one row each
    for g0 in range(0, groups, rows):
        m = min(rows, groups - g0)
        im = idx[:m]
        im.copy_(words[g0:g0 + m])
        im.add_(32768)
        b0 = g0 // per_block
        scale = absmax[b0: b0 + -(-m // per_block)].repeat_interleave(per_block)[:m]
        rows4 = F.embedding_bag(im, table, offsets[:m], mode="sum", per_sample_weights=scale)  # (m, 4)
        out[4 * g0: 4 * (g0 + m)].copy_(rows4.view(-1))
    return out
