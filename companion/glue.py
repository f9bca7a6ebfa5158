"""Hand numbers from a notebook to the book's prose (MyST-NB ``glue``).

In the book build ``myst_nb`` is installed and :func:`glue` stores the value under ``name``
so that a chapter can write ``{glue:text}`notebooks/ch01_memory_wall.ipynb::name:.1f```.
Elsewhere (Colab, a plain Jupyter) there is no book to paste into, so the value is only
returned. Either way the notebook's own output shows the number.
"""

from __future__ import annotations

from typing import Any


def glue(name: str, value: Any) -> Any:
    """Store ``value`` for the book under ``name`` (when building the book) and return it.

    NumPy scalars are stored as Python numbers, so a format spec such as ``:.1f`` works in
    ``{glue:text}``. Strings are stored without quotes: paste them with ``{glue:}`` (``{glue:md}`` cannot read another document).
    """
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalar
        value = value.item()
    try:
        from myst_nb import glue as _myst_glue
    except ImportError:
        return value
    _myst_glue(name, PlainText(value) if isinstance(value, str) else value, display=False)
    return value


class PlainText(str):
    """A string whose ``text/plain`` display has no quotes, so ``{glue:}`` pastes it as words."""

    def _repr_pretty_(self, printer, cycle):
        printer.text(str(self))


def claim(holds: bool, statement: str, profile) -> bool:
    """Check a sentence of the chapter against this run's numbers; return ``holds``.

    ``profile`` is the :class:`companion.profiles.Profile` of the run. The book is built from the
    ``ci`` profile, so there a claim that does not hold raises ``AssertionError(statement)``: the prose
    would be wrong. A ``gpu`` run (other models, data, step counts) is the reader's own experiment,
    not the book's: a claim that does not hold there prints a note saying so instead of stopping
    the notebook. Checks of correctness (bit-exactness, shapes, byte counts) stay plain ``assert``.
    """
    if not holds:
        if profile.is_ci:
            raise AssertionError(statement)
        print(f"Note: in this {profile.name} run, the chapter's statement does not hold: {statement}")
    return bool(holds)
