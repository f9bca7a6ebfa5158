"""Sphinx extension: the built book reads without network.

* **Math**: the ``sphinx-mathjax-offline`` package (listed next to this extension in ``_config.yml``)
  copies MathJax 3 into ``_static/mathjax`` and points ``mathjax_path`` at it.
* **Diagrams**: ``sphinxcontrib-mermaid`` renders ``{mermaid}`` blocks in the browser, importing
  Mermaid as an ES module from a CDN. Browsers refuse ES-module imports from ``file://`` pages,
  so a local ``.mjs`` would not help a book opened from disk. This extension keeps the
  library's page script (themes, lazy rendering) and changes one thing: Mermaid comes from
  the classic bundle ``mermaid.min.js`` of the npm package ``mermaid@<mermaid_version>``,
  copied into ``_static/mermaid/`` and loaded by a plain ``<script>`` before that page script.
  The first build takes the package's tarball with npm's own client (``npm pack``), checks it
  against the sha512 pinned here, and keeps the bundle in ``_build/.vendor/`` (``offline_vendor_dir``).
* **Images**: the Colab badge the notebooks link to (``colab.research.google.com/assets/...``)
  is replaced in the pages by a local copy, ``book/_static/colab-badge.svg``; the notebooks
  themselves keep the official badge for GitHub and Colab.

Errors: an ``ExtensionError`` naming the missing file and how to get it when the Mermaid bundle is
absent and ``npm`` is not installed or cannot fetch the package.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import tarfile
import shutil
import subprocess
import tempfile
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.builders.html._assets import _JavaScript
from sphinx.errors import ExtensionError
from sphinx.util import logging

logger = logging.getLogger(__name__)

# npm's "integrity" field of the tarballs this book pins (`npm view mermaid@<version> dist.integrity`).
MERMAID_INTEGRITY = {
    "11.4.1": "sha512-Mb01JT/x6CKDWaxigwfZYuYmDZ6xtrNwNlidKZwkSrDaY9n90tdrJTV5Umk+wP1fZscGptmKFXHsXMDEVZ+Q6A==",
}
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
STATIC = Path(__file__).resolve().parent.parent / "_static"
_IMPORT = re.compile(r"^\s*import mermaid from [^;\n]*;?\s*$", re.MULTILINE)


def _npm_pack(spec: str, timeout: float) -> bytes:
    """The tarball of the npm package ``spec`` (``name@version``), fetched by ``npm pack``.

    Raises ``FileNotFoundError`` when ``npm`` is not on PATH and ``RuntimeError`` (with npm's own
    message) when it fails or runs past ``timeout`` seconds.
    """
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run([npm, "pack", spec, "--pack-destination", tmp, "--silent"], cwd=tmp,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"npm pack {spec} took more than {timeout:.0f} s") from exc
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            message = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"npm pack {spec} failed (exit {done.returncode}): {' '.join(message)}")
        return tarballs[0].read_bytes()


def mermaid_bundle(version: str, vendor_dir: Path, *, timeout: float = 300.0) -> Path:
    """Path of ``mermaid.min.js`` (Mermaid ``version``), taken from its npm package if not yet vendored.

    The bundle is kept as ``vendor_dir / f"mermaid-{version}" / "mermaid.min.js"``; a file already
    there is used as it is, with no network. Otherwise ``npm pack mermaid@<version>`` fetches the
    package (``timeout`` in seconds), whose sha512 must equal ``MERMAID_INTEGRITY[version]``.

    Raises ``ExtensionError`` for a version without a pinned integrity hash, a tarball whose sha512
    differs from the pin, or a package that cannot be fetched (no npm, no network), naming the
    file to copy in by hand.
    """
    target = vendor_dir / f"mermaid-{version}" / "mermaid.min.js"
    if target.is_file():
        return target
    if version not in MERMAID_INTEGRITY:
        raise ExtensionError(
            f"mermaid_version = {version!r} has no pinned npm integrity hash in {__file__}: add "
            f"the output of `npm view mermaid@{version} dist.integrity` to MERMAID_INTEGRITY."
        )
    spec = f"mermaid@{version}"
    try:
        data = _npm_pack(spec, timeout)
    except (OSError, RuntimeError) as exc:
        raise ExtensionError(
            f"The offline book needs Mermaid's bundle at {target}, and `npm pack {spec}` could not "
            f"fetch it ({exc}). Install Node.js with npm (Debian/Ubuntu: apt-get install npm; conda: "
            f"conda install -c conda-forge nodejs) and build again with network, or copy "
            f"package/dist/mermaid.min.js from that package's tarball to {target}."
        ) from exc
    algorithm, expected = MERMAID_INTEGRITY[version].split("-", 1)
    digest = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if digest != expected:
        raise ExtensionError(f"npm pack {spec}: {algorithm} {digest} differs from the pinned {expected}; not used.")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        try:
            bundle = tar.extractfile("package/dist/mermaid.min.js")
        except KeyError:
            bundle = None
        if bundle is None:
            raise ExtensionError(f"npm pack {spec}: the tarball has no package/dist/mermaid.min.js")
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
