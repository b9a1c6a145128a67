#!/usr/bin/env python
"""Render a report.html in headless Chromium (driven by Playwright) and check that it reads as it should.

Chromium (Debian: ``apt-get install chromium``) loads the page from disk with no server and no network; the
Python package ``playwright`` (the ``test`` extra) drives the installed browser through
``executable_path`` -- no browser download. At a 1300 x 900 window the check passes when

* the DOM holds the verdict table and every embedded figure (``data:image/png``) of the file, all loaded;
* the page does not overflow sideways (``document.documentElement.scrollWidth <= innerWidth``), with its
  collapsed blocks (the settings) opened;
* the first screen holds the summary and the headline figure (their bounding boxes end within 900 px),
  where the page has figures;
* the full-page screenshot is not blank: enough non-white pixels, and coloured ones (the figures' curves).

Run: .venv/bin/python scripts/render_report.py OUT/report.html [--screenshot full.png] [--first-screen first.png]
Exit status 0 on success, 1 when the page does not render as expected, 2 when no browser can be driven.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

# a closed network: no background requests, no first-run or sync machinery
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]
WIDTH, HEIGHT = 1300, 900


def find_chromium() -> str | None:
    """The Chromium executable (PATH, then /usr/bin/chromium), or None."""
    found = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    return found or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def missing_browser() -> str | None:
    """Why no browser can be driven here (None: one can)."""
    if find_chromium() is None:
        return "Chromium not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (pip install -e '.[test]')"
    return None


def measure(page: Path, full: Path, first: Path | None = None, width: int = WIDTH, height: int = HEIGHT) -> dict:
    """Load ``page`` at ``width`` x ``height``; screenshots (full page to ``full``, the first screen to
    ``first``) and what the checks need, as a dict."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), args=FLAGS, headless=True)
        try:
            tab = browser.new_page(viewport={"width": width, "height": height})
            tab.goto(page.resolve().as_uri(), wait_until="load")
            if first is not None:
                tab.screenshot(path=str(first))
            tab.evaluate("() => document.querySelectorAll('details').forEach(d => { d.open = true; })")
            found = tab.evaluate("""() => {
                const box = (sel) => { const e = document.querySelector(sel);
                    if (!e) return null; const r = e.getBoundingClientRect();
                    return {top: r.top + scrollY, bottom: r.bottom + scrollY, width: r.width}; };
                const imgs = [...document.images];
                return {scrollWidth: document.documentElement.scrollWidth, innerWidth: innerWidth,
                        verdicts: [...document.querySelectorAll('h2')].some(h => h.textContent === 'Verdicts'),
                        figures: imgs.filter(i => i.src.startsWith('data:image/png;base64,')).length,
                        loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
                        summary: box('#summary'), headline: box('#headline')};
            }""")
            tab.screenshot(path=str(full), full_page=True)
        finally:
            browser.close()
    return found


def check(page: Path, screenshot: Path, first: Path | None = None, width: int = WIDTH, height: int = HEIGHT) -> list[str]:
    """Render ``page``; return the problems found (empty: it reads as it should)."""
    reason = missing_browser()
    if reason:
        raise FileNotFoundError(reason)
    source = page.read_text()
    expected = source.count("data:image/png;base64,")
    found = measure(page, screenshot, first, width, height)
    problems = []
    if not found["verdicts"]:
        problems.append("the rendered DOM has no verdict table")
    if found["figures"] != expected or found["loaded"] != expected:
        problems.append(f"the rendered DOM holds {found['figures']} of the page's {expected} figures "
                        f"({found['loaded']} loaded)")
    if found["scrollWidth"] > found["innerWidth"]:
        problems.append(f"the page overflows sideways: {found['scrollWidth']} px wide in a {found['innerWidth']} px window")
    summary, head = found["summary"], found["headline"]
    if summary is None or summary["bottom"] > height:
        problems.append("the summary is not on the first screen" + (f" (ends at {summary['bottom']:.0f} px)"
                                                                    if summary else " (no #summary)"))
    if expected and (head is None or head["bottom"] > height):
        problems.append("the headline figure is not on the first screen" + (f" (ends at {head['bottom']:.0f} px)"
                                                                            if head else " (no #headline)"))
    import matplotlib.image as mpimg

    pixels = mpimg.imread(screenshot)[..., :3]
    ink = float((pixels.min(axis=-1) < 0.9).mean())
    colour = float((pixels.max(axis=-1) - pixels.min(axis=-1) > 0.25).mean())
    if ink < 0.01:
        problems.append(f"the screenshot is blank ({ink:.2%} non-white pixels)")
    if expected and colour < 0.001:
        problems.append(f"the screenshot shows no coloured curves ({colour:.3%} coloured pixels)")
    title = re.search(r"<title>(.*?)</title>", source)
    print(f"{page}: {title.group(1) if title else ''!s}: {found['figures']}/{expected} figures in the DOM, "
          f"width {found['scrollWidth']}/{found['innerWidth']} px, summary ends at "
          f"{summary['bottom'] if summary else float('nan'):.0f} px, headline figure at "
          f"{head['bottom'] if head else float('nan'):.0f} px, {ink:.1%} ink, {colour:.2%} colour; "
          f"screenshot {screenshot}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path, help="report.html")
    parser.add_argument("--screenshot", type=Path, help="the full-page PNG (default: next to the page)")
    parser.add_argument("--first-screen", type=Path, help="also save the first screen (1300 x 900) as this PNG")
    args = parser.parse_args(argv)
    if not args.page.exists():
        print(f"{args.page}: no such file", file=sys.stderr)
        return 1
    try:
        problems = check(args.page, args.screenshot or args.page.with_name("report-screenshot.png"), args.first_screen)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
