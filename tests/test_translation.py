"""The Chinese edition's catalogue tooling (scripts/i18n.py): lint, status, the block format, diagrams.

`make translation` runs the real check on the whole book; these tests pin down what it decides.
"""

import hashlib
import re

import pytest
from babel.messages.catalog import Catalog

from book_modules import ROOT, load

i18n = load("scripts/i18n.py")

GLUE = "{glue:text}`../notebooks/ch01_memory_wall.ipynb::lora_weights_65b_gb:.0f`"


@pytest.mark.parametrize("msgid, msgstr", [
    (f"LLaMA-65B's take {GLUE} GB.", f"LLaMA-65B 的权重占 {GLUE} GB。"),
    ("See {doc}`Chapter 2 <ch02_adalora_theory>` and {cite}`hu2022lora`.", "见 {doc}`第 2 章 <ch02_adalora_theory>` 与 {cite}`hu2022lora`。"),
    ("Set `PROFILE = \"gpu\"` for $r = 8$, see [PyTorch](https://pytorch.org/).", "为 $r = 8$ 设置 `PROFILE = \"gpu\"`，见 [PyTorch](https://pytorch.org/)。"),
    ("\nI(w) = |w \\nabla L| \\quad \\text{sensitivity (Eq. 10)}\n", "\nI(w) = |w \\nabla L| \\quad \\text{敏感度（式 10）}\n"),
])
def test_a_faithful_translation_passes_the_lint(msgid, msgstr):
    assert i18n.lint_message(msgid, msgstr) == []


@pytest.mark.parametrize("msgid, msgstr, expected", [
    (f"LLaMA-65B's take {GLUE} GB.", "LLaMA-65B 的权重占 130 GB。", "missing from the translation: " + GLUE.replace("`", "")[:11]),
    ("It saves 74.6% of the constants.", "它节省了 75% 的常数。", "missing from the translation: 74.6"),
    ("Call `update_and_allocate`.", "调用 `update_allocate`。", "missing from the translation: `update_and_allocate`"),
    ("with $B = 0$", "其中 $B=0$", "missing from the translation: $B = 0$"),
    ("see [the docs](https://a.b/c)", "见[文档](https://a.b/d)", "missing from the translation: ](https://a.b/c)"),
    ("{doc}`Chapter 2 <ch02_adalora_theory>`", "{doc}`第 2 章 <ch03_adalora_practice>`", "missing from the translation: {doc}ch02"),
    ("\nh = W_0 x + BAx\n", "\nh = W_0 x + ABx\n", "display math changed"),
    ("Chapter 3", "  ", "empty translation"),
])
def test_the_lint_names_what_a_translation_lost(msgid, msgstr, expected):
    problems = i18n.lint_message(msgid, msgstr)
    assert problems and any(p.startswith(expected) for p in problems), problems


def _catalog(*entries):
    catalog = Catalog(locale="zh_CN")
    for msgid, msgstr, fuzzy in entries:
        catalog.add(msgid, msgstr, flags=("fuzzy",) if fuzzy else ())
    return catalog


def test_page_status_counts_untranslated_fuzzy_and_lint_against_fresh_messages():
    template = _catalog(("One", "", False), ("Two 2", "", False), ("Three", "", False), ("Four", "", False), ("New", "", False))
    po = _catalog(("One", "一", False), ("Two 2", "二", False), ("Three", "三", True), ("Four", "", False), ("Gone", "旧", False))
    status = i18n.page_status("book/x", template, po)
    assert (status.total, status.translated) == (5, 2)
    assert status.fuzzy == ["Three"]
    assert status.untranslated == ["Four", "New"]
    assert list(status.lint) == ["Two 2"]  # the number 2 is missing from its translation
    assert status.share == pytest.approx(0.4) and not status.ok
    done = i18n.page_status("book/x", _catalog(("One", "", False)), _catalog(("One", "一", False)))
    assert done.ok and done.share == 1.0


def test_the_block_format_round_trips_through_todo_and_fill(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(i18n, "LOCALE_DIR", tmp_path)
    i18n.save_po("book/demo", _catalog(("Heading", "", False), ("\nx = 1\n", "", False), ("Took 3 s", "", False)))
    blocks = tmp_path / "demo.txt"
    blocks.write_text("### 0\n标题\n\n### 1\nx = 1\n### 2\n用了 3 秒\n", encoding="utf-8")
    assert i18n.main(["fill", "book/demo", str(blocks)]) == 0
    catalog = i18n.load_po("book/demo")
    assert [m.string for m in i18n.entries(catalog)] == ["标题", "\nx = 1\n", "用了 3 秒"]
    blocks.write_text("### 2\n用了三秒\n", encoding="utf-8")
    assert i18n.main(["fill", "book/demo", str(blocks)]) == 1
    assert "NOT WRITTEN" in capsys.readouterr().out
    assert i18n.entries(i18n.load_po("book/demo"))[2].string == "用了 3 秒"  # the refused one was not written
    blocks.write_text("### 7\n多余\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="no entries \\[7\\]"):
        i18n.main(["fill", "book/demo", str(blocks)])


def test_fill_clears_the_fuzzy_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(i18n, "LOCALE_DIR", tmp_path)
    i18n.save_po("p", _catalog(("Old sentence", "旧句子", True)))
    (tmp_path / "b.txt").write_text("### 0\n新句子\n", encoding="utf-8")
    assert i18n.main(["fill", "p", str(tmp_path / "b.txt")]) == 0
    entry = i18n.entries(i18n.load_po("p"))[0]
    assert entry.string == "新句子" and not entry.fuzzy


def test_a_diagram_translation_must_name_the_current_english_file(tmp_path, monkeypatch):
    monkeypatch.setattr(i18n, "ROOT", tmp_path)
    english = tmp_path / "tree.mmd"
    english.write_text("flowchart TD\n    A[Start] --> B[End]\n", encoding="utf-8")
    assert "tree.zh_CN.mmd is missing" in i18n.diagram_problems(tmp_path)[0]
    digest = hashlib.sha256(english.read_bytes()).hexdigest()
    chinese = tmp_path / "tree.zh_CN.mmd"
    chinese.write_text(f"%% translated from tree.mmd sha256:{digest}\nflowchart TD\n    A[开始] --> B[结束]\n", encoding="utf-8")
    assert i18n.diagram_problems(tmp_path) == []
    english.write_text("flowchart TD\n    A[Start] --> C[Stop]\n", encoding="utf-8")
    assert "translates an older tree.mmd" in i18n.diagram_problems(tmp_path)[0]


def _edges(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    return [re.sub(r"\[[^\]]*\]|\{[^}]*\}|\|[^|]*\|", "", line).strip() for line in lines if "-->" in line]


@pytest.mark.parametrize("english", sorted(p for p in (ROOT / "book" / "figures").glob("*.mmd") if ".zh_CN." not in p.name),
                         ids=lambda p: p.name)
def test_each_chinese_diagram_draws_the_english_graph(english):
    chinese = english.with_name(f"{english.stem}.zh_CN.mmd")
    assert chinese.is_file()
    assert _edges(chinese) == _edges(english), "same nodes and edges; only the labels are translated"
    node_ids = lambda p: re.findall(r"^\s*(\w+)[\[{(]", p.read_text(encoding="utf-8"), re.MULTILINE)  # noqa: E731
    assert node_ids(chinese) == node_ids(english)


def test_every_catalogue_belongs_to_a_page_of_the_book():
    pages = {p.relative_to(ROOT).with_suffix("").as_posix() for p in [*ROOT.glob("book/*.md"), *ROOT.glob("notebooks/**/*.ipynb")]}
    catalogues = {p.relative_to(i18n.LOCALE_DIR).with_suffix("").as_posix() for p in i18n.LOCALE_DIR.rglob("*.po")}
    assert catalogues and catalogues <= pages, sorted(catalogues - pages)
