"""Comparing a student's answer with the reference's, and describing both in a message.

Each ``compare_*`` returns ``None`` when the answer is right and otherwise one sentence that says how it
is wrong (type, dtype, shape, or the first differing value), which :func:`companion.exercises.check`
puts into the :class:`~companion.exercises.CheckResult` message.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

def describe(value: Any, limit: int = 8) -> str:
    """A short, readable description of a value for a message: tensors by dtype, shape and first values."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        head = flat[:limit].tolist()
        more = ", ..." if flat.numel() > limit else ""
        return f"tensor(dtype={value.dtype}, shape={tuple(value.shape)}, values=[{', '.join(_num(v) for v in head)}{more}])"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(v, limit) for v in value[:limit])
        more = ", ..." if len(value) > limit else ""
        return f"({inner}{more})" if isinstance(value, tuple) else f"[{inner}{more}]"
    if isinstance(value, dict):
        items = list(value.items())
        inner = ", ".join(f"{k!r}: {describe(v, limit)}" for k, v in items[:limit])
        return "{" + inner + (", ..." if len(items) > limit else "") + "}"
    if isinstance(value, float):
        return _num(value)
    text = repr(value)
    return text if len(text) <= 300 else text[:300] + "..."


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: "an int", "a float"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _num(v) -> str:
    return f"{v:.7g}" if isinstance(v, float) else repr(v)


def compare_tensor(got, expected: torch.Tensor, *, rtol: float | None = None, atol: float | None = None,
                   what: str = "the result") -> str | None:
    """``got`` must be a tensor of ``expected``'s dtype and shape, equal within ``rtol``/``atol``
    (``torch.testing.assert_close``'s defaults for the dtype when both are None; ``rtol=atol=0``
    asks for bit-exact equality)."""
    if not isinstance(got, torch.Tensor):
        return f"{what} must be a torch.Tensor, got {type(got).__name__}"
    if got.dtype != expected.dtype:
        return f"{what} has dtype {got.dtype}, expected {expected.dtype}"
    if tuple(got.shape) != tuple(expected.shape):
        return f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    got = got.detach().cpu()
    if rtol == 0 and atol == 0:
        equal = got == expected
        if got.is_floating_point():
            equal |= got.isnan() & expected.isnan()  # NaN where the reference has NaN counts as equal
        if bool(equal.all()):
            return None
        bad = (got != expected).reshape(-1).nonzero().reshape(-1)
    else:
        try:
            torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, equal_nan=True)
            return None
        except AssertionError:
            pass
        g, e = got.double().reshape(-1), expected.double().reshape(-1)
        r = 1.3e-6 if rtol is None else rtol
        a = 1e-5 if atol is None else atol
        bad = ((g - e).abs() > a + r * e.abs()).nonzero().reshape(-1)
        if bad.numel() == 0:
            bad = (g != e).nonzero().reshape(-1)
    i = int(bad[0]) if bad.numel() else 0
    index = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), expected.shape)) if expected.dim() else ()
    tol = "exactly" if rtol == 0 and atol == 0 else "within tolerance"
    return (f"{what} differs from the reference {tol} at {bad.numel()} of {expected.numel()} positions; "
            f"first at index {index}: expected {_num(expected.reshape(-1)[i].item())}, "
            f"got {_num(got.reshape(-1)[i].item())}")


def compare_number(got, expected: float, *, rel: float = 1e-9, abs_: float = 0.0, kind=(int, float),
                   what: str = "the result") -> str | None:
    """``got`` must be a Python (or 0-dim tensor / numpy) number close to ``expected``."""
    if hasattr(got, "item") and getattr(got, "ndim", 1) == 0:
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        return f"{what} must be {_a(names)}, got {type(got).__name__} ({describe(got)})"
    if math.isclose(got, expected, rel_tol=rel, abs_tol=abs_):
        return None
    return f"{what} is {_num(got)}, expected {_num(expected)}"


def compare_equal(got, expected, what: str = "the result") -> str | None:
    """``got == expected`` (same type family), for ints, strings, booleans, tuples of them."""
    if type(got) is not type(expected) and not (isinstance(got, int) and isinstance(expected, int)
                                               and not isinstance(got, bool)):
        return f"{what} must be {_a(type(expected).__name__)}, got {type(got).__name__} ({describe(got)})"
    if got == expected:
        return None
    return f"{what} is {describe(got)}, expected {describe(expected)}"


def compare_tuple(*parts: Callable[[Any, Any], str | None], names: tuple[str, ...]) -> Callable:
    """A comparison for a tuple result whose i-th element is compared with ``parts[i]``."""
    def compare(got, expected):
        if not isinstance(got, (tuple, list)) or len(got) != len(parts):
            return f"the result must be a tuple of {len(parts)} ({', '.join(names)}), got {describe(got)}"
        for part, name, g, e in zip(parts, names, got, expected):
            msg = part(g, e)
            if msg:
                return msg.replace("the result", name, 1)
        return None
    return compare
