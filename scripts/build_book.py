"""Build the book's editions: English into ``_build/html/``, Chinese into ``_build/html/zh/``.

    python scripts/build_book.py                 # both editions (what `make book` runs)
    python scripts/build_book.py --edition en    # one edition; also zh_CN
    python scripts/build_book.py -W --keep-going # warnings are errors, reported all at once

Both builds use Jupyter Book 1's configuration (``_config.yml``, ``_toc.yml``) through
``jupyter_book.sphinx.build_sphinx``, the function ``jupyter-book build`` calls; the Chinese one
adds ``language = "zh_CN"``, so Sphinx replaces each message by its translation from
``locale/zh_CN/LC_MESSAGES/``. The notebooks are executed through the shared jupyter-cache
(``_build/.jupyter_cache``): the first build that needs a notebook runs it (unless
``scripts/run_notebooks.py`` already did), the other edition reads the same outputs. Each
edition keeps its own doctrees, so switching language never rebuilds the other one.

Prints the seconds each edition took; exits with Sphinx's status (non-zero on the first failure).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# language -> (output folder, doctree folder)
EDITIONS = {
    "en": (ROOT / "_build" / "html", ROOT / "_build" / ".doctrees"),
    "zh_CN": (ROOT / "_build" / "html" / "zh", ROOT / "_build" / ".doctrees-zh_CN"),
}


def build(language: str, *, warningiserror: bool = False, keep_going: bool = False, quiet: bool = False) -> int:
    """Build one edition with Sphinx's html builder; return Sphinx's exit status."""
    from jupyter_book.sphinx import build_sphinx

    out_dir, doctrees = EDITIONS[language]
    return build_sphinx(
        ROOT, out_dir, noconfig=True, path_config=ROOT / "_config.yml", doctreedir=doctrees,
        confoverrides={"external_toc_path": "_toc.yml", "latex_individualpages": False, "language": language},
        warningiserror=warningiserror, keep_going=keep_going, quiet=quiet,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edition", choices=[*EDITIONS, "all"], default="all")
    parser.add_argument("-W", dest="warningiserror", action="store_true", help="turn warnings into errors")
    parser.add_argument("--keep-going", action="store_true", help="with -W, report every warning before failing")
    parser.add_argument("-q", "--quiet", action="store_true", help="print warnings and the timings only")
    args = parser.parse_args(argv)

    languages = list(EDITIONS) if args.edition == "all" else [args.edition]
    timings = []
    for language in languages:
        start = time.perf_counter()
        status = build(language, warningiserror=args.warningiserror, keep_going=args.keep_going, quiet=args.quiet)
        timings.append((language, time.perf_counter() - start))
        if status:
            print(f"build_book: the {language} edition failed (status {status})", file=sys.stderr)
            return status
    for language, seconds in timings:
        print(f"build_book: {language} edition in {seconds:.0f} s -> {EDITIONS[language][0].relative_to(ROOT)}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
