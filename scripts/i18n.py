"""The Chinese edition's message catalogues: extract, update, check, and fill them.

The English chapters and the notebooks' markdown cells are the source. Sphinx's gettext builder
extracts one message per paragraph, heading, list item, table cell, admonition title and caption
into ``_build/gettext/<page>.pot``; ``locale/zh_CN/LC_MESSAGES/<page>.po`` holds the translations.
A message is *translated* when its ``msgstr`` is non-empty and not marked fuzzy.

    python scripts/i18n.py update            # extract, then merge into the .po files (babel's fuzzy matching)
    python scripts/i18n.py status [--check]  # share translated per page; --check exits 1 below 100% or on a lint error
    python scripts/i18n.py todo PAGE         # untranslated and fuzzy messages of one page, as numbered blocks
    python scripts/i18n.py fill PAGE FILE    # write translations from numbered blocks (or JSON {msgid: msgstr}), after lint

The block format needs no escaping: ``### N`` on a line of its own, then the text of entry N
(its position in the page's ``.po`` file), up to the next ``### `` line. ``todo`` prints the
English in that format; replace each English text by its translation and give the file to ``fill``.

Changing an English sentence changes its msgid: ``update`` keeps the old translation as a fuzzy
entry (with the previous English as ``#| msgid``) and ``status --check`` fails until it is redone.

Lint (``lint_message``): a translation keeps, exactly and as often, the source's MyST roles'
targets (``{glue:text}`...```, ``{cite}``, ``{doc}``...), inline code, inline math, link targets and
numbers; display math (a message starting with a newline) may only change the text inside ``\\text{}``.

The diagrams are not messages: each ``book/figures/<name>.mmd`` has a ``<name>.zh_CN.mmd`` whose
first line names the sha256 of the English file it translates (``diagram_problems``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po, write_po

ROOT = Path(__file__).resolve().parent.parent
LANGUAGE = "zh_CN"
LOCALE_DIR = ROOT / "locale" / LANGUAGE / "LC_MESSAGES"
FIGURES = ROOT / "book" / "figures"
DIAGRAM_HEADER = "%% translated from {name} sha256:{digest}"

_ROLE = re.compile(r"\{([\w:.-]+)\}`([^`]*)`")
_CODE = re.compile(r"(``?)(.+?)\1")
_MATH = re.compile(r"\$\$?[^$]+\$\$?")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_TEXT = re.compile(r"\\text\{[^{}]*\}")


def extract(out_dir: Path) -> Path:
    """Run Sphinx's gettext builder on the book (notebooks not executed) into ``out_dir``; return it.

    Raises ``RuntimeError`` when Sphinx reports a failure.
    """
    from jupyter_book.sphinx import build_sphinx

    result = build_sphinx(
        ROOT, out_dir, noconfig=True, path_config=ROOT / "_config.yml", builder="gettext",
        doctreedir=out_dir.parent / ".doctrees-gettext", really_quiet=True,
        confoverrides={"external_toc_path": "_toc.yml", "latex_individualpages": False, "nb_execution_mode": "off"},
    )
    if result:
        raise RuntimeError(f"sphinx-build -b gettext failed ({result!r})")
    return out_dir


def templates(pot_dir: Path) -> dict[str, Catalog]:
    """Each page's template catalogue, keyed by Sphinx page name (``"book/ch01_motivation"``)."""
    pages = {}
    for pot in sorted(pot_dir.rglob("*.pot")):
        with pot.open("rb") as handle:
            pages[pot.relative_to(pot_dir).with_suffix("").as_posix()] = read_po(handle)
    return pages


def po_path(page: str) -> Path:
    return LOCALE_DIR / f"{page}.po"


def load_po(page: str) -> Catalog:
    path = po_path(page)
    if not path.is_file():
        return Catalog(locale=LANGUAGE)
    with path.open("rb") as handle:
        return read_po(handle, locale=LANGUAGE)


def save_po(page: str, catalog: Catalog) -> None:
    path = po_path(page)
    path.parent.mkdir(parents=True, exist_ok=True)
    catalog.header_comment = f"# Chinese (zh_CN) translation of {page} in 'PEFT in Practice: AdaLoRA & QLoRA'."
    catalog.project, catalog.version, catalog.fuzzy = "PEFT in Practice", "1", False
    catalog.last_translator = catalog.language_team = "The PEFT in Practice authors"
    catalog.msgid_bugs_address = "https://github.com/peft-in-practice/peft-in-practice/issues"
    with path.open("wb") as handle:
        write_po(handle, catalog, width=0, no_location=True, include_previous=True, omit_header=False)


def _tokens(text: str) -> Counter:
    """What a translation must keep: role targets, code, math, link targets, numbers."""
    found: Counter = Counter()
    for name, content in _ROLE.findall(text):
        target = re.search(r"<([^<>]+)>\s*$", content)
        found[f"{{{name}}}{target.group(1) if target else content}"] += 1
    rest = _ROLE.sub(" ", text)
    for match in _CODE.finditer(rest):
        found[match.group(0)] += 1
    rest = _CODE.sub(" ", rest)
    for match in _MATH.findall(rest):
        found[match] += 1
    rest = _MATH.sub(" ", rest)
    for url in _LINK.findall(rest):
        found[f"]({url})"] += 1
    rest = _LINK.sub(" ", rest)
    for number in _NUMBER.findall(rest):
        found[number] += 1
    return found


def lint_message(msgid: str, msgstr: str) -> list[str]:
    """Problems of one translation (empty list: fine). See the module docstring for the rules."""
    if not msgstr.strip():
        return ["empty translation"]
    if msgid.startswith("\n"):
        if _TEXT.sub(r"\\text{}", msgid).strip() != _TEXT.sub(r"\\text{}", msgstr).strip():
            return ["display math changed outside \\text{...}"]
        return []
    source, target = _tokens(msgid), _tokens(msgstr)
    problems = []
    missing, extra = source - target, target - source
    if missing:
        problems.append("missing from the translation: " + ", ".join(sorted(missing.elements())))
    if extra:
        problems.append("not in the English: " + ", ".join(sorted(extra.elements())))
    return problems


@dataclass
class PageStatus:
    page: str
    total: int
    translated: int
    fuzzy: list[str] = field(default_factory=list)
    untranslated: list[str] = field(default_factory=list)
    lint: dict[str, list[str]] = field(default_factory=dict)

    @property
    def share(self) -> float:
        return 1.0 if self.total == 0 else self.translated / self.total

    @property
    def ok(self) -> bool:
        return self.translated == self.total and not self.fuzzy and not self.lint


def page_status(page: str, template: Catalog, catalog: Catalog | None = None) -> PageStatus:
    """Compare one page's freshly extracted messages with its ``.po`` file."""
    catalog = load_po(page) if catalog is None else catalog
    status = PageStatus(page, 0, 0)
    for message in template:
        if not message.id:
            continue
        status.total += 1
        entry = catalog.get(message.id)
        if entry is None or not entry.string:
            status.untranslated.append(message.id)
        elif entry.fuzzy:
            status.fuzzy.append(message.id)
        else:
            status.translated += 1
            problems = lint_message(message.id, entry.string)
            if problems:
                status.lint[message.id] = problems
    return status


def diagram_problems(figures: Path = FIGURES) -> list[str]:
    """Each English ``.mmd`` diagram needs a ``.zh_CN.mmd`` made from its current text."""
    problems = []
    for english in sorted(figures.glob("*.mmd")):
        if english.name.endswith(f".{LANGUAGE}.mmd"):
            continue
        digest = hashlib.sha256(english.read_bytes()).hexdigest()
        chinese = english.with_name(f"{english.stem}.{LANGUAGE}.mmd")
        expected = DIAGRAM_HEADER.format(name=english.name, digest=digest)
        if not chinese.is_file():
            problems.append(f"{chinese.relative_to(ROOT)} is missing (translate {english.name}; first line: {expected})")
        elif chinese.read_text(encoding="utf-8").splitlines()[0].strip() != expected:
            problems.append(f"{chinese.relative_to(ROOT)} translates an older {english.name}: update it, then its first line to: {expected}")
    return problems


def update(pot_dir: Path) -> list[str]:
    """Merge freshly extracted templates into the ``.po`` files; return the pages written."""
    written = []
    for page, template in templates(pot_dir).items():
        catalog = load_po(page)
        catalog.update(template, update_header_comment=False, update_creation_date=False)
        catalog.obsolete.clear()
        save_po(page, catalog)
        written.append(page)
    return written


_BLOCK = re.compile(r"^### (\d+)[ \t]*$", re.MULTILINE)


def entries(catalog: Catalog) -> list:
    """The catalogue's messages in file order, header left out; ``### N`` refers to entries(...)[N]."""
    return [message for message in catalog if message.id]


def parse_blocks(text: str) -> dict[int, str]:
    """``{N: text}`` from the block format (see the module docstring)."""
    marks = list(_BLOCK.finditer(text))
    return {int(m.group(1)): text[m.end():(marks[i + 1].start() if i + 1 < len(marks) else len(text))].strip("\n")
            for i, m in enumerate(marks)}


def _same_edges(msgid: str, msgstr: str) -> str:
    """``msgstr`` with the leading and trailing whitespace of ``msgid`` (display math starts with a newline)."""
    core = msgid.strip()
    lead, trail = msgid[: len(msgid) - len(msgid.lstrip())], msgid[len(msgid.rstrip()):]
    return lead + msgstr.strip() + trail if core else msgstr


def _report(statuses: list[PageStatus], diagrams: list[str]) -> str:
    width = max(len(s.page) for s in statuses)
    lines = [f"{'page':<{width}}  messages  translated  fuzzy  lint  share"]
    for s in statuses:
        lines.append(f"{s.page:<{width}}  {s.total:8d}  {s.translated:10d}  {len(s.fuzzy):5d}  {len(s.lint):4d}  {s.share:6.1%}")
    total = sum(s.total for s in statuses)
    done = sum(s.translated for s in statuses)
    lines.append(f"{'all pages':<{width}}  {total:8d}  {done:10d}  {sum(len(s.fuzzy) for s in statuses):5d}  "
                 f"{sum(len(s.lint) for s in statuses):4d}  {done / max(total, 1):6.1%}")
    for s in statuses:
        for msgid, problems in s.lint.items():
            lines.append(f"lint {s.page}: {msgid[:70]!r}: {'; '.join(problems)}")
    lines.extend(f"diagram: {problem}" for problem in diagrams)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("update", help="extract the messages and merge them into locale/zh_CN")
    status = sub.add_parser("status", help="share of translated messages per page")
    status.add_argument("--check", action="store_true", help="exit 1 unless every page is at 100%% with no fuzzy or lint error")
    todo = sub.add_parser("todo", help="untranslated and fuzzy messages of a page, as JSON")
    todo.add_argument("page")
    todo.add_argument("--json", action="store_true", help="print {msgid: current msgstr} instead of numbered blocks")
    fill = sub.add_parser("fill", help="write translations from a JSON object {msgid: msgstr}")
    fill.add_argument("page")
    fill.add_argument("file", type=Path)
    args = parser.parse_args(argv)

    if args.command == "fill":
        catalog, text = load_po(args.page), args.file.read_text(encoding="utf-8")
        if args.file.suffix == ".json":
            translations = json.loads(text)
        else:
            listed = entries(catalog)
            blocks = parse_blocks(text)
            unknown = sorted(n for n in blocks if n >= len(listed))
            if unknown:
                raise SystemExit(f"{args.file}: no entries {unknown} in {args.page} ({len(listed)} entries)")
            translations = {listed[n].id: blocks[n] for n in blocks}
        translations = {msgid: _same_edges(msgid, msgstr) for msgid, msgstr in translations.items()}
        bad = {}
        for msgid, msgstr in translations.items():
            if msgid not in catalog:
                bad[msgid] = ["not a message of this page"]
            elif problems := lint_message(msgid, msgstr):
                bad[msgid] = problems
            else:
                entry = catalog[msgid]
                entry.string, entry.previous_id = msgstr, ()
                entry.flags.discard("fuzzy")
        save_po(args.page, catalog)
        for msgid, problems in bad.items():
            print(f"NOT WRITTEN {msgid[:70]!r}: {'; '.join(problems)}")
        print(f"{len(translations) - len(bad)} written, {len(bad)} refused")
        return 1 if bad else 0

    with tempfile.TemporaryDirectory() as tmp:
        pot_dir = extract(Path(tmp) / "gettext")
        if args.command == "update":
            for page in update(pot_dir):
                print(f"updated {po_path(page).relative_to(ROOT)}")
            return 0
        pages = templates(pot_dir)
        if args.command == "todo":
            if args.page not in pages:
                raise SystemExit(f"unknown page {args.page!r}; pages: {', '.join(pages)}")
            s = page_status(args.page, pages[args.page])
            catalog = load_po(args.page)
            wanted = set(s.untranslated) | set(s.fuzzy) | set(s.lint)
            if args.json:
                print(json.dumps({m: catalog[m].string if m in catalog else "" for m in wanted}, ensure_ascii=False, indent=1))
                return 0
            missing = [m for m in wanted if m not in catalog]
            if missing:
                raise SystemExit(f"{args.page}: {len(missing)} messages are not in its .po file yet: run `update` first")
            for n, message in enumerate(entries(catalog)):
                if message.id in wanted:
                    old = f"\n# fuzzy; the old translation was: {message.string}" if message.id in s.fuzzy else ""
                    print(f"### {n}{old}\n{message.id.strip(chr(10))}\n")
            return 0
        statuses = [page_status(page, template) for page, template in pages.items()]
    diagrams = diagram_problems()
    print(_report(statuses, diagrams))
    if args.check and (diagrams or not all(s.ok for s in statuses)):
        print("translation check failed: run `python scripts/i18n.py update`, translate the fuzzy and empty "
              "entries in locale/zh_CN/LC_MESSAGES/ (or `todo PAGE` / `fill PAGE FILE`), and fix the lint errors")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
