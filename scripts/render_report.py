#!/usr/bin/env python
"""Render a report.html in headless Chromium and check that it shows what it should.

Chromium (Debian: ``apt-get install chromium``) loads the page from disk with no server and no
network, takes a full-page screenshot, and dumps the DOM after load. The check passes when

* the DOM holds the verdict table and every embedded figure (``data:image/png``) of the file,
* the screenshot is not blank: enough non-white pixels, and coloured ones (the figures' curves).

Run: .venv/bin/python scripts/render_report.py OUT/report.html [--screenshot shot.png]
Exit status 0 on success, 1 when the page does not render as expected, 2 when Chromium is missing.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# a closed network: no background requests, no first-run or sync machinery
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=5000"]


def find_chromium() -> str | None:
    """The Chromium executable on PATH, or None."""
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _chromium(exe: str, page: Path, *extra: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=120)


def check(page: Path, screenshot: Path, width: int = 1200, height: int = 3000) -> list[str]:
    """Render ``page``; return the problems found (empty: it renders)."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("Chromium not found (Debian: apt-get install chromium)")
    source = page.read_text()
    problems = []
    dom = _chromium(exe, page, "--dump-dom")
    if dom.returncode != 0:
        return [f"chromium --dump-dom failed ({dom.returncode}): {dom.stderr.strip()[-300:]}"]
    if "<h2>Verdicts</h2>" not in dom.stdout:
        problems.append("the rendered DOM has no verdict table")
    expected, seen = source.count("data:image/png;base64,"), dom.stdout.count("data:image/png;base64,")
    if seen != expected:
        problems.append(f"the rendered DOM holds {seen} of the page's {expected} figures")
    shot = _chromium(exe, page, f"--screenshot={screenshot.resolve()}", f"--window-size={width},{height}")
    if shot.returncode != 0 or not screenshot.exists():
        return problems + [f"chromium --screenshot failed ({shot.returncode}): {shot.stderr.strip()[-300:]}"]
    import matplotlib.image as mpimg

    pixels = mpimg.imread(screenshot)[..., :3]
    ink = float((pixels.min(axis=-1) < 0.9).mean())
    colour = float((pixels.max(axis=-1) - pixels.min(axis=-1) > 0.25).mean())
    if ink < 0.01:
        problems.append(f"the screenshot is blank ({ink:.2%} non-white pixels)")
    if expected and colour < 0.001:
        problems.append(f"the screenshot shows no coloured curves ({colour:.3%} coloured pixels)")
    title = re.search(r"<title>(.*?)</title>", source)
    print(f"{page}: {title.group(1) if title else ''!s}: {seen}/{expected} figures in the DOM, "
          f"{ink:.1%} ink, {colour:.2%} colour; screenshot {screenshot}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path, help="report.html")
    parser.add_argument("--screenshot", type=Path, help="where to write the PNG (default: next to the page)")
    args = parser.parse_args(argv)
    if not args.page.exists():
        print(f"{args.page}: no such file", file=sys.stderr)
        return 1
    try:
        problems = check(args.page, args.screenshot or args.page.with_name("report-screenshot.png"))
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
