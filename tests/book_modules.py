"""Import the book's tooling (scripts/, book/_ext/) in tests: neither is a package."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(relative: str):
    """The module at ``ROOT / relative``, imported once under its file name."""
    path = ROOT / relative
    name = f"book_tooling_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
