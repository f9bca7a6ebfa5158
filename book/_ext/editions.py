"""Sphinx extension: the English and the Chinese edition of the book, side by side.

The English sources are the only sources. ``scripts/build_book.py`` builds them twice: with
``language = "en"`` into ``_build/html/`` and with ``language = "zh_CN"`` into ``_build/html/zh/``,
where Sphinx's gettext machinery replaces every paragraph, heading, admonition, table cell and
caption by its translation from ``locale/zh_CN/LC_MESSAGES/<page>.po``. Both builds read the
same executed notebooks from the jupyter-cache, so no notebook runs twice.

This extension gives each page a link to the same page in the other edition (and a
``<link rel="alternate" hreflang=...>``), sets the edition's title and search-box text, and
translates the captions of the table of contents ("Getting started", "Chapters", ...):
``sphinx-external-toc`` inserts those toctrees after Sphinx's translation transform has run, so
they are looked up here in the root page's catalogue, where the gettext builder extracted them.
"""

from __future__ import annotations

from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.locale import init as init_locale
from sphinx.util.i18n import docname_to_domain

# language -> (path of the edition's root below the English root, link label, book title, search text)
EDITIONS = {
    "en": ("", "English", None, None),
    "zh_CN": ("zh/", "中文版", "PEFT 实战：AdaLoRA 与 QLoRA", "搜索本书……"),
}


def edition_of(language: str | None) -> str:
    """The EDITIONS key for a Sphinx ``language`` value (``None`` and ``"en"`` are English)."""
    language = language or "en"
    if language not in EDITIONS:
        raise ValueError(f"no edition for language {language!r}; known: {sorted(EDITIONS)}")
    return language


def other_edition_url(pagename: str, language: str | None) -> tuple[str, str, str]:
    """``(relative URL, label, hreflang)`` of ``pagename`` in the other edition, from that page.

    ``pagename`` is Sphinx's (``"book/ch01_motivation"``); the URL climbs to the current edition's
    root, then to the English root, then down into the other edition.
    """
    current = edition_of(language)
    other = "zh_CN" if current == "en" else "en"
    up = "../" * pagename.count("/") + "../" * EDITIONS[current][0].count("/")
    url = f"{up}{EDITIONS[other][0]}{pagename}.html"
    return url, EDITIONS[other][1], other.replace("_", "-")


def _titles(app: Sphinx, config: Config) -> None:
    _, _, title, search = EDITIONS[edition_of(config.language)]
    if title:
        config.html_title = title
        config.html_theme_options = dict(config.html_theme_options, search_bar_text=search)


def _toc_captions(app: Sphinx, doctree: nodes.document) -> None:
    if edition_of(app.config.language) == "en":
        return
    toctrees = [t for t in doctree.findall(addnodes.toctree) if t.get("caption")]
    if not toctrees:
        return
    domain = docname_to_domain(app.env.docname, app.config.gettext_compact)
    dirs = [str(Path(app.srcdir, d)) for d in app.config.locale_dirs]
    catalog, _ = init_locale(dirs, app.config.language, domain)
    for toctree in toctrees:
        toctree["caption"] = catalog.gettext(toctree["caption"])


def _switch_link(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    if "body" not in context:
        return
    url, label, hreflang = other_edition_url(pagename, app.config.language)
    context["metatags"] = context.get("metatags", "") + f'\n<link rel="alternate" hreflang="{hreflang}" href="{url}" />'
    link = f'<p class="edition-switch"><a href="{url}" hreflang="{hreflang}" lang="{hreflang}">{label}</a></p>\n'
    context["body"] = link + context["body"]


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _titles)
    app.connect("doctree-read", _toc_captions, priority=400)
    app.connect("html-page-context", _switch_link)
    app.add_css_file("editions.css")
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
