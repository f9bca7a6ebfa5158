"""Open pages of both built editions in a headless Chromium with the network off, and check them.

    python scripts/check_offline.py                      # after `make book` (or scripts/build_book.py)
    python scripts/check_offline.py --screenshots DIR    # also save a PNG of each page
    python scripts/check_offline.py --browser PATH       # a Chromium other than /usr/bin/chromium

Each page is loaded from disk (``file://``) in a browser context that is offline and whose every
request to anything but a local file is aborted and recorded. After MathJax and Mermaid have
finished, a page fails when

* a formula is left as LaTeX (a ``.math`` element without a typeset ``mjx-container``, or ``\\(``
  or ``\\[`` in the visible text), or the page should have formulas and has none;
* a Mermaid diagram has no drawing (no ``<svg>``, an empty one, or Mermaid's syntax-error
  picture), or the page should have diagrams and has none;
* an image does not decode (a broken ``<img>``);
* the page requested anything from the network;
* its link to the other edition points to a file that does not exist.

Before the book, a canary page with each of these faults is opened the same way: the check fails
if it does not see all of them, so a broken check cannot pass a broken book.

Driven by Playwright (``playwright`` on PyPI) with Debian's ``chromium`` package, which
``.ci/run`` installs; exits 2 with instructions when no Chromium is found, 1 when a page fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parent.parent
EDITIONS = {"en": Path("."), "zh_CN": Path("zh")}
# page -> what it must contain: "math", "mermaid", "image"
PAGES = {
    "book/index.html": {"math", "mermaid"},
    "book/ch01_motivation.html": {"math", "mermaid"},
    "book/ch02_adalora_theory.html": {"math"},
    "book/ch07_selection.html": {"math", "mermaid"},
    "notebooks/ch01_memory_wall.html": {"math", "image"},
    "notebooks/ch04_nf4_double_quant.html": {"math", "image"},
    "notebooks/ch06_comparison.html": {"image"},
}
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
NO_BROWSER = (
    "No Chromium found for the offline check. On Debian or Ubuntu: sudo apt-get install chromium "
    "(then /usr/bin/chromium is used); elsewhere: python -m playwright install chromium; or pass "
    "--browser /path/to/chromium."
)

_INSPECT = """async () => {
  const out = {};
  const maths = [...document.querySelectorAll('.math')];
  out.math = maths.length;
  out.math_raw = maths.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 60));
  const text = document.body.innerText;
  out.latex_in_text = (text.match(/\\\\[\\(\\[]/g) || []).length;
  const diagrams = [...document.querySelectorAll('pre.mermaid, div.mermaid')];
  out.mermaid = diagrams.length;
  out.mermaid_bad = diagrams.filter(e => {
    const svg = e.querySelector('svg');
    if (!svg) return true;
    const box = svg.getBoundingClientRect();
    return box.width < 10 || box.height < 10 || svg.getAttribute('aria-roledescription') === 'error'
      || /Syntax error/.test(svg.textContent);
  }).map(e => (e.getAttribute('data-original-code') || e.textContent).slice(0, 60));
  const images = [...document.images];
  images.forEach(i => { i.loading = 'eager'; });
  out.image = images.length;
  out.image_broken = (await Promise.all(images.map(i => i.decode().then(() => null, () => i.getAttribute('src')))))
    .filter(x => x !== null);
  const link = document.querySelector('p.edition-switch a');
  out.edition_link = link ? link.href : null;
  return out;
}"""


@dataclass
class PageResult:
    url: str
    facts: dict
    requests: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def find_browser(explicit: str | None) -> str | None:
    """The Chromium executable to drive: ``--browser``, ``$CHROMIUM``, then the usual names on PATH."""
    for candidate in (explicit, os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate) or (Path(candidate).is_file() and candidate)):
            return str(path)
    return None


def judge(facts: dict, wants: set[str], requests: list[str]) -> list[str]:
    """The problems of one page from what the browser saw (empty list: the page reads offline)."""
    problems = []
    if facts["math_raw"] or facts["latex_in_text"]:
        problems.append(f"formulas not typeset: {facts['math_raw'][:3]} ({facts['latex_in_text']} raw \\( or \\[ in the text)")
    if facts["mermaid_bad"]:
        problems.append(f"diagrams not drawn: {facts['mermaid_bad'][:3]}")
    if facts["image_broken"]:
        problems.append(f"broken images: {facts['image_broken'][:5]}")
    for feature in sorted(wants):
        if facts[feature] == 0:
            problems.append(f"expected at least one {feature} on this page, found none")
    if requests:
        problems.append(f"network requests while offline: {sorted(set(requests))[:5]}")
    link = facts.get("edition_link")
    if not link:
        problems.append("no link to the other edition (p.edition-switch)")
    elif urlparse(link).scheme != "file" or not Path(unquote(urlparse(link).path)).is_file():
        problems.append(f"the link to the other edition points to a missing file: {link}")
    return problems


def _offline_router(requests: list[str]):
    """A Playwright route handler: local files load, anything else is recorded in ``requests`` and aborted."""
    def route_request(route) -> None:
        if route.request.url.startswith(("file:", "data:", "blob:", "about:")):
            route.continue_()
        else:
            requests.append(route.request.url)
            route.abort("internetdisconnected")
    return route_request


# A page broken in every way the check looks for: if the browser reports it as fine, the check itself
# is broken (a JavaScript error in _INSPECT, a browser that ignores the route), and says so.
CANARY = """<!doctype html><html><head><meta charset="utf-8">
<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js"></script></head><body>
<p><span class="math notranslate nohighlight">\\(x^2\\)</span></p>
<pre class="mermaid">flowchart LR
  A --> B</pre>
<img src="missing.png" alt="missing">
</body></html>"""
CANARY_PROBLEMS = ("formulas not typeset", "diagrams not drawn", "broken images", "network requests while offline",
                   "no link to the other edition")


def _inspect(browser, path: Path, timeout_ms: int, screenshot: Path | None = None) -> tuple[dict, list[str]]:
    """Open ``path`` offline, wait for MathJax and Mermaid, and return what _INSPECT saw and the blocked requests."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    context.route("**/*", _offline_router(requests))
    try:
        page = context.new_page()
        page.goto(path.as_uri(), wait_until="load", timeout=max(timeout_ms, 10_000))
        try:
            page.wait_for_function(
                "() => !document.querySelector('.math') || (window.MathJax && MathJax.startup"
                " && MathJax.startup.promise && document.querySelector('mjx-container'))", timeout=timeout_ms)
            page.evaluate("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
            page.wait_for_function(
                "() => [...document.querySelectorAll('pre.mermaid')].every(e => e.querySelector('svg'))",
                timeout=timeout_ms)
        except PlaywrightTimeout:
            pass  # judged afterwards: what did not render is reported as such
        facts = page.evaluate(_INSPECT)
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=False)
        return facts, requests
    finally:
        context.close()


def check(html_root: Path, browser_path: str, screenshots: Path | None = None, timeout_ms: int = 30_000) -> list[PageResult]:
    """Check the canary page, then every page of PAGES in every edition under ``html_root``."""
    from playwright.sync_api import sync_playwright

    results = []
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as tmp:
        browser = playwright.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
        try:
            canary = Path(tmp) / "canary.html"
            canary.write_text(CANARY, encoding="utf-8")
            facts, requests = _inspect(browser, canary, timeout_ms=3_000)
            found = judge(facts, {"math", "mermaid", "image"}, requests)
            missed = [kind for kind in CANARY_PROBLEMS if not any(p.startswith(kind) for p in found)]
            results.append(PageResult("canary (a page broken on purpose)", facts, requests,
                                      [f"the check did not see these faults of the canary page: {missed}"] if missed else []))
            for edition, prefix in EDITIONS.items():
                for page_path, wants in PAGES.items():
                    path = html_root / prefix / page_path
                    if not path.is_file():
                        results.append(PageResult(str(path), {}, problems=[f"{path} was not built"]))
                        continue
                    shot = screenshots / f"{edition}-{page_path.replace('/', '-')}.png" if screenshots else None
                    facts, requests = _inspect(browser, path, timeout_ms, shot)
                    results.append(PageResult(path.as_uri(), facts, requests, judge(facts, wants, requests)))
        finally:
            browser.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html", help="the English edition's root")
    parser.add_argument("--browser", help="path of a Chromium executable")
    parser.add_argument("--screenshots", type=Path, help="save a PNG of each page's first screen here")
    args = parser.parse_args(argv)

    browser = find_browser(args.browser)
    if browser is None:
        print(NO_BROWSER, file=sys.stderr)
        return 2
    results = check(args.html.resolve(), browser, args.screenshots)
    for result in results:
        f = result.facts
        summary = (f"math {f['math']}, diagrams {f['mermaid']}, images {f['image']}" if f else "not built")
        verdict = "ok" if not result.problems else "FAIL"
        print(f"{verdict:4}  {result.url.split('/_build/html/')[-1]:48}  {summary}")
        for problem in result.problems:
            print(f"      {problem}")
    failed = [r for r in results if r.problems]
    print(f"offline check: {len(results) - len(failed)} of {len(results)} pages read offline (browser {browser})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
