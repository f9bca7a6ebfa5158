"""Sphinx extension: the built book reads without network.

* **Math**: the ``sphinx-mathjax-offline`` package (listed next to this extension in ``_config.yml``)
  copies MathJax 3 into ``_static/mathjax`` and points ``mathjax_path`` at it.
* **Diagrams**: ``sphinxcontrib-mermaid`` renders ``{mermaid}`` blocks in the browser, importing
  Mermaid as an ES module from a CDN. Browsers refuse ES-module imports from ``file://`` pages,
  so a local ``.mjs`` would not help a book opened from disk. This extension keeps the
  library's page script (themes, lazy rendering) and changes one thing: Mermaid comes from
  the classic bundle ``mermaid.min.js`` of the npm package ``mermaid@<mermaid_version>``,
  copied into ``_static/mermaid/`` and loaded by a plain ``<script>`` before that page script.
  The bundle is taken from the npm registry's tarball once, checked against the registry's
  sha512, and kept in ``_build/.vendor/`` (``offline_vendor_dir``).
* **Images**: the Colab badge the notebooks link to (``colab.research.google.com/assets/...``)
  is replaced in the pages by a local copy, ``book/_static/colab-badge.svg``; the notebooks
  themselves keep the official badge for GitHub and Colab.

Errors: an ``ExtensionError`` naming the missing file and the command that fetches it when the
Mermaid bundle is absent and the registry cannot be reached.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import tarfile
import urllib.request
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.builders.html._assets import _JavaScript
from sphinx.errors import ExtensionError
from sphinx.util import logging

logger = logging.getLogger(__name__)

# npm's "integrity" field for the tarballs this book pins (https://registry.npmjs.org/mermaid/<version>).
MERMAID_INTEGRITY = {
    "11.4.1": "sha512-Mb01JT/x6CKDWaxigwfZYuYmDZ6xtrNwNlidKZwkSrDaY9n90tdrJTV5Umk+wP1fZscGptmKFXHsXMDEVZ+Q6A==",
}
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
STATIC = Path(__file__).resolve().parent.parent / "_static"
_IMPORT = re.compile(r"^\s*import mermaid from [^;\n]*;?\s*$", re.MULTILINE)


def mermaid_bundle(version: str, vendor_dir: Path, *, timeout: float = 60.0) -> Path:
    """Path of ``mermaid.min.js`` for ``version``, fetched from the npm registry if not yet vendored.

    Raises ``ExtensionError`` for a version without a pinned integrity hash, a tarball whose sha512
    differs from the pin, or a registry that cannot be reached while the file is missing.
    """
    target = vendor_dir / f"mermaid-{version}" / "mermaid.min.js"
    if target.is_file():
        return target
    if version not in MERMAID_INTEGRITY:
        raise ExtensionError(
            f"mermaid_version = {version!r} has no pinned npm integrity hash in {__file__}: add "
            f"the 'integrity' of https://registry.npmjs.org/mermaid/{version} to MERMAID_INTEGRITY."
        )
    url = f"https://registry.npmjs.org/mermaid/-/mermaid-{version}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except OSError as exc:
        raise ExtensionError(
            f"The offline book needs Mermaid's bundle at {target}, and {url} could not be fetched "
            f"({exc}). Build once with network, or copy package/dist/mermaid.min.js from that "
            f"tarball (npm pack mermaid@{version}) to {target}."
        ) from exc
    algorithm, expected = MERMAID_INTEGRITY[version].split("-", 1)
    digest = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if digest != expected:
        raise ExtensionError(f"{url}: {algorithm} {digest} differs from the pinned {expected}; not used.")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        bundle = tar.extractfile("package/dist/mermaid.min.js")
        if bundle is None:
            raise ExtensionError(f"{url} has no package/dist/mermaid.min.js")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bundle.read())
    return target


def _add_static_dirs(app: Sphinx) -> None:
    if app.builder.format != "html":
        return
    vendor_dir = Path(app.config.offline_vendor_dir or Path(app.srcdir) / "_build" / ".vendor")
    bundle = mermaid_bundle(app.config.mermaid_version, vendor_dir)
    # html_static_path copies each directory's contents into _static/: the bundle lands in _static/mermaid/.
    app.config.html_static_path.extend([str(STATIC), str(bundle.parent.parent / "_mermaid_static")])
    static = bundle.parent.parent / "_mermaid_static" / "mermaid"
    static.mkdir(parents=True, exist_ok=True)
    if not (static / "mermaid.min.js").is_file() or (static / "mermaid.min.js").stat().st_size != bundle.stat().st_size:
        (static / "mermaid.min.js").write_bytes(bundle.read_bytes())


def _local_colab_badge(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    if app.builder.format != "html":
        return
    depth = docname.count("/")
    for image in doctree.findall(nodes.image):
        if image.get("uri") == COLAB_BADGE:
            image["uri"] = "../" * depth + "_static/colab-badge.svg"
            image["candidates"] = {"*": image["uri"]}


def _local_mermaid(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    for index, script in enumerate(scripts):
        body = script.attributes.get("body", "") if script.filename is None else ""
        if not _IMPORT.search(body):
            continue
        attributes = dict(script.attributes, body=_IMPORT.sub("const mermaid = window.mermaid;", body, count=1))
        scripts[index] = _JavaScript(None, priority=script.priority, **attributes)
        bundle = _JavaScript("_static/mermaid/mermaid.min.js", priority=script.priority - 1)
        if bundle not in scripts:
            scripts.insert(index, bundle)
        break


def setup(app: Sphinx) -> dict:
    app.add_config_value("offline_vendor_dir", "", "html")
    app.connect("builder-inited", _add_static_dirs)
    app.connect("doctree-resolved", _local_colab_badge)
    # After sphinxcontrib-mermaid's install_js (priority 500) has added its page script.
    app.connect("html-page-context", _local_mermaid, priority=900)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
