"""The book's Sphinx extensions: the edition links (book/_ext/editions.py) and the offline assets
(book/_ext/offline.py), and the verdicts of the offline browser check (scripts/check_offline.py)."""

import base64
import hashlib
import io
import os
import tarfile
from types import SimpleNamespace

import pytest
from docutils import nodes
from docutils.utils import new_document
from sphinx.builders.html._assets import _JavaScript
from sphinx.errors import ExtensionError

from book_modules import load

editions = load("book/_ext/editions.py")
offline = load("book/_ext/offline.py")
check_offline = load("scripts/check_offline.py")


@pytest.mark.parametrize("page, language, url, label", [
    ("book/ch01_motivation", "en", "../zh/book/ch01_motivation.html", "中文版"),
    ("book/ch01_motivation", "zh_CN", "../../book/ch01_motivation.html", "English"),
    ("notebooks/exercises/ch02_exercises", "en", "../../zh/notebooks/exercises/ch02_exercises.html", "中文版"),
    ("notebooks/exercises/ch02_exercises", "zh_CN", "../../../notebooks/exercises/ch02_exercises.html", "English"),
    ("genindex", None, "zh/genindex.html", "中文版"),
    ("search", "zh_CN", "../search.html", "English"),
])
def test_each_page_links_to_the_same_page_of_the_other_edition(page, language, url, label):
    assert editions.other_edition_url(page, language)[:2] == (url, label)


def test_an_unknown_language_is_refused_by_name():
    with pytest.raises(ValueError, match="no edition for language 'fr'"):
        editions.other_edition_url("book/index", "fr")


def test_the_switch_link_and_alternate_link_are_added_to_the_page():
    app = SimpleNamespace(config=SimpleNamespace(language="zh_CN"))
    context = {"body": "<h1>x</h1>", "metatags": ""}
    editions._switch_link(app, "book/setup", "page.html", context, None)
    assert context["body"].startswith('<p class="edition-switch"><a href="../../book/setup.html" hreflang="en"')
    assert 'rel="alternate" hreflang="en" href="../../book/setup.html"' in context["metatags"]


MERMAID_PAGE_SCRIPT = 'import mermaid from "https://cdn.jsdelivr.net/npm/mermaid@11.4.1/dist/mermaid.esm.min.mjs";\nmermaid.initialize({});\n'


def test_the_mermaid_page_script_uses_the_local_classic_bundle():
    scripts = [_JavaScript("_static/doctools.js"), _JavaScript(None, priority=500, body=MERMAID_PAGE_SCRIPT, type="module")]
    offline._local_mermaid(None, "book/index", "page.html", {"script_files": scripts}, None)
    assert [s.filename for s in scripts] == ["_static/doctools.js", "_static/mermaid/mermaid.min.js", None]
    assert scripts[1].priority < scripts[2].priority
    body = scripts[2].attributes["body"]
    assert "import mermaid" not in body and "https://" not in body
    assert body.startswith("const mermaid = window.mermaid;") and scripts[2].attributes["type"] == "module"


def test_pages_without_mermaid_keep_their_scripts():
    scripts = [_JavaScript("_static/doctools.js"), _JavaScript(None, body="console.log(1)")]
    context = {"script_files": list(scripts)}
    offline._local_mermaid(None, "book/index", "page.html", context, None)
    assert context["script_files"] == scripts


def test_the_colab_badge_is_served_from_the_book():
    document = new_document("x")
    badge, other = nodes.image(uri=offline.COLAB_BADGE), nodes.image(uri="figures/plot.png")
    document += [badge, other]
    app = SimpleNamespace(builder=SimpleNamespace(format="html"))
    offline._local_colab_badge(app, document, "notebooks/exercises/ch01_exercises")
    assert badge["uri"] == "../../_static/colab-badge.svg" and other["uri"] == "figures/plot.png"
    assert (offline.STATIC / "colab-badge.svg").is_file()


def _tarball(payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("package/dist/mermaid.min.js")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _fake_npm(tmp_path, monkeypatch, script: str) -> None:
    """Put an ``npm`` on PATH that runs ``script`` (bash; $2 is the package, $4 the --pack-destination)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/bash\n" + script)
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_the_mermaid_bundle_is_taken_only_from_a_tarball_with_the_pinned_hash(tmp_path, monkeypatch):
    data = _tarball(b"globalThis.mermaid = {};")
    (tmp_path / "good.tgz").write_bytes(data)
    # What `npm pack mermaid@0.0.1 --pack-destination DIR` does: the tarball appears in DIR.
    _fake_npm(tmp_path, monkeypatch, f'[ "$1 $2 $3" = "pack mermaid@0.0.1 --pack-destination" ] || exit 9\n'
                                     f'cp {tmp_path / "good.tgz"} "$4/mermaid-0.0.1.tgz"\n')
    monkeypatch.setitem(offline.MERMAID_INTEGRITY, "0.0.1", "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode())
    vendor = tmp_path / "vendor"
    path = offline.mermaid_bundle("0.0.1", vendor)
    assert path == vendor / "mermaid-0.0.1" / "mermaid.min.js"
    assert path.read_bytes() == b"globalThis.mermaid = {};"
    # The same tarball under a pin it does not match is refused and nothing is vendored.
    monkeypatch.setitem(offline.MERMAID_INTEGRITY, "0.0.1", "sha512-" + base64.b64encode(b"x" * 64).decode())
    path.unlink()
    with pytest.raises(ExtensionError, match="differs from the pinned"):
        offline.mermaid_bundle("0.0.1", vendor)
    assert not path.exists()


def test_a_tarball_without_the_bundle_is_refused_by_name(tmp_path, monkeypatch):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.addfile(tarfile.TarInfo("package/README.md"), io.BytesIO(b""))
    monkeypatch.setattr(offline, "_npm_pack", lambda spec, timeout: buffer.getvalue())
    digest = base64.b64encode(hashlib.sha512(buffer.getvalue()).digest()).decode()
    monkeypatch.setitem(offline.MERMAID_INTEGRITY, "0.0.3", f"sha512-{digest}")
    with pytest.raises(ExtensionError, match="has no package/dist/mermaid.min.js"):
        offline.mermaid_bundle("0.0.3", tmp_path)


@pytest.mark.parametrize("script, reason", [
    (None, "npm is not installed"),
    ('echo "npm error code E404" >&2; exit 1\n', "npm error code E404"),
])
def test_a_missing_bundle_that_npm_cannot_fetch_says_how_to_get_it(tmp_path, monkeypatch, script, reason):
    if script is None:
        monkeypatch.setenv("PATH", str(tmp_path))  # no npm anywhere
    else:
        _fake_npm(tmp_path, monkeypatch, script)
    with pytest.raises(ExtensionError, match=f"npm pack mermaid@11.4.1. could not fetch it .*{reason}.*apt-get install npm") as err:
        offline.mermaid_bundle("11.4.1", tmp_path / "vendor")
    assert str(tmp_path / "vendor" / "mermaid-11.4.1" / "mermaid.min.js") in str(err.value)
    with pytest.raises(ExtensionError, match="no pinned npm integrity hash"):
        offline.mermaid_bundle("9.9.9", tmp_path)
    (tmp_path / "mermaid-11.4.1").mkdir()
    (tmp_path / "mermaid-11.4.1" / "mermaid.min.js").write_text("// vendored")
    assert offline.mermaid_bundle("11.4.1", tmp_path).read_text() == "// vendored"  # npm not asked


def _facts(**changes):
    facts = {"math": 3, "math_raw": [], "latex_in_text": 0, "mermaid": 1, "mermaid_bad": [], "image": 2,
             "image_broken": [], "edition_link": None}
    facts.update(changes)
    return facts


def test_the_offline_verdict_passes_a_page_that_rendered(tmp_path):
    other = tmp_path / "other.html"
    other.write_text("<html></html>")
    assert check_offline.judge(_facts(edition_link=other.as_uri()), {"math", "mermaid", "image"}, []) == []


@pytest.mark.parametrize("changes, wants, requests, expected", [
    ({"math_raw": ["\\(x\\)"]}, set(), [], "formulas not typeset"),
    ({"latex_in_text": 2}, set(), [], "formulas not typeset"),
    ({"mermaid_bad": ["flowchart TD"]}, set(), [], "diagrams not drawn"),
    ({"image_broken": ["../_static/colab-badge.svg"]}, set(), [], "broken images"),
    ({"mermaid": 0}, {"mermaid"}, [], "expected at least one mermaid"),
    ({}, set(), ["https://cdn.jsdelivr.net/npm/mermaid"], "network requests while offline"),
])
def test_the_offline_verdict_names_each_failure(tmp_path, changes, wants, requests, expected):
    other = tmp_path / "other.html"
    other.write_text("<html></html>")
    problems = check_offline.judge(_facts(edition_link=other.as_uri(), **changes), wants, requests)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_the_offline_verdict_wants_a_working_link_to_the_other_edition(tmp_path):
    assert check_offline.judge(_facts(), set(), []) == ["no link to the other edition (p.edition-switch)"]
    missing = (tmp_path / "zh" / "index.html").as_uri()
    assert "points to a missing file" in check_offline.judge(_facts(edition_link=missing), set(), [])[0]


def test_without_chromium_the_check_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CHROMIUM", raising=False)
    assert check_offline.find_browser(None) is None
    assert check_offline.main(["--html", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "apt-get install chromium" in err and "playwright install chromium" in err


def test_the_table_of_contents_captions_are_translated_in_the_chinese_edition(tmp_path):
    from babel.messages.catalog import Catalog
    from babel.messages.mofile import write_mo
    from sphinx import addnodes

    catalog = Catalog(locale="zh_CN")
    catalog.add("Chapters", "章节")
    mo = tmp_path / "locale" / "zh_CN" / "LC_MESSAGES" / "book" / "toc_test.mo"
    mo.parent.mkdir(parents=True)
    with mo.open("wb") as handle:
        write_mo(handle, catalog)

    def doctree_and_app(language):
        document = new_document("x")
        document += [addnodes.toctree(caption="Chapters"), addnodes.toctree(caption="Untranslated")]
        config = SimpleNamespace(language=language, gettext_compact=False, locale_dirs=["locale"])
        return document, SimpleNamespace(config=config, env=SimpleNamespace(docname="book/toc_test"), srcdir=str(tmp_path))

    document, app = doctree_and_app("zh_CN")
    editions._toc_captions(app, document)
    assert [t["caption"] for t in document.findall(addnodes.toctree)] == ["章节", "Untranslated"]
    document, app = doctree_and_app("en")
    editions._toc_captions(app, document)
    assert [t["caption"] for t in document.findall(addnodes.toctree)] == ["Chapters", "Untranslated"]
