"""The report as a page: report.html (self-contained: figures embedded as base64 PNG, no server, no network)
and report.md, rendered from the metrics, the findings and the saved figures.

The page answers first: the summary paragraph written from the verdicts (with what the probe expected and,
for an ``[expect]`` table, whether each expectation held), then the headline figure at full width, then the
verdict table with one "not analysed" note for the checks that cannot apply, the notes, the other figures,
the runs, and the settings in a collapsed block. Nothing on it is wider than the window: tables scroll in
their own box, long values wrap.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from .expectations import ExpectationCheck
from .figures import FigureFile
from .findings import Finding, Labels, expectation_lines, not_analysed_note, plural, summary_sentences

__all__ = ["html_page", "markdown_page", "verdict_rows", "VERDICT_HEAD"]

VERDICT_HEAD = ("runs", "check", "verdict", "value", "interval", "threshold", "evidence")
ALIGNMENT_NOTE = ("Alignment per layer (0 = none, 1 = full; not clipped: below 0 anti-aligned) of the update dW "
                  "since step 0, and in brackets of the weights W, with the layer's inputs on the stored batch; "
                  "the exponent is the slope of log(||dW x|| / (RMS dW RMS x)) against log(fan-in) across the "
                  "compared runs (1/2: no alignment, 1: full); regimes: full >= {full}, none <= {none}.")
CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1f2328;line-height:1.45;background:#fff}
main{max-width:1200px;margin:0 auto;padding:14px 24px 48px}
h1{font-size:24px;margin:4px 0 8px;overflow-wrap:anywhere}
h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #e4e4e4;padding-bottom:3px}
.summary{font-size:16px;overflow-wrap:anywhere}
.summary p{margin:5px 0}
.summary .lead{font-size:16.5px}
.summary .expected,.summary .common{color:#444;font-size:14.5px}
.held{color:#1a7f37}.failed{color:#cf222e;font-weight:600}.open{color:#6e5a00}
figure{display:inline-block;vertical-align:top;width:calc(50% - 14px);margin:8px 6px}
figure.wide{display:block;width:100%;margin:8px 0}
figure img{display:block;max-width:100%;height:auto}
figure.wide img{width:100%}
figcaption{font-size:13px;color:#555;overflow-wrap:anywhere}
li{overflow-wrap:anywhere}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #d0d7de;padding:4px 8px;font-size:14px;vertical-align:top;text-align:left}
th{background:#f6f8fa}
td.v{font-weight:bold;white-space:nowrap}
td.ev{overflow-wrap:anywhere;min-width:16em}
.na{color:#444;font-size:14.5px}
details{margin:18px 0}
summary{cursor:pointer;font-weight:600}
dl{display:grid;grid-template-columns:minmax(0,max-content) minmax(0,1fr);gap:3px 16px;font-size:14px}
dt{font-weight:600}dd{margin:0;overflow-wrap:anywhere}
pre{white-space:pre-wrap;overflow-wrap:anywhere;font-size:13px}
"""


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3g}"


def verdict_rows(items: Sequence[Finding], interval: bool) -> list[tuple[str, ...]]:
    """One row per applicable finding: :data:`VERDICT_HEAD` (without the interval column unless asked)."""
    rows = []
    for f in items:
        if not f.applicable:
            continue
        value = f"{f.value_name} {_fmt(f.value)}" if f.value is not None else ""
        cells = [f.subject or "all runs", f.check, f.verdict, value]
        if interval:
            cells.append(f"{_fmt(f.interval[0])} - {_fmt(f.interval[1])}" if f.interval else "no interval")
        rows.append(tuple(cells + [f.threshold, f.reason]))
    return rows


def _alignment_tables(metrics: Mapping[str, Any], labels: Labels) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per comparison with alignment results: a caption, the column heads and one row per layer (fan-in
    and update alignment per size at the verdict's step, the fitted exponents and the regime)."""
    def num(x: Any) -> str:
        return "-" if x is None else f"{x:.2f}"

    tables = []
    for g in metrics["groups"]:
        found = g.get("alignment")
        if not found or not found.get("layers"):
            continue
        sizes = list(next(iter(found["layers"].values()))["fan_in"])
        head = ["layer"] + [f"{g['axis']} {float(s):g}: fan-in / alignment (W)" for s in sizes] + \
            ["exponent dW", "exponent W", "regime"]
        rows = []
        for layer, a in found["layers"].items():
            cells = [f"{a['fan_in'][s]} / {num(a['alignment'][s])} ({num(a['param_alignment'][s])})" for s in sizes]
            rows.append([layer, *cells, num(a["exponent"]), num(a["param_exponent"]), a["verdict"]])
        tables.append((f"{labels.entry(g) or 'all runs'}, step {found['step']}", head, rows))
    return tables


def _run_columns(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The runs table's coordinate columns: lr, width and depth, and every other axis that varies."""
    cols = ["parameterization", "optimizer"]
    cols = [c for c in cols if len({r.get(c) for r in runs}) > 1] + ["lr", "width", "depth"]
    axes = sorted({k for r in runs for k in (r.get("axes") or {})} - set(cols))
    return cols + [a for a in axes if len({repr((r.get("axes") or {}).get(a)) for r in runs}) > 1]


def _run_cells(r: Mapping[str, Any], cols: Sequence[str]) -> list[str]:
    def cell(value: Any) -> str:
        return "" if value is None else format(value, "g") if isinstance(value, (int, float)) else str(value)

    cells = [Path(r["path"]).name]
    cells += [cell(r.get(c) if c in ("parameterization", "optimizer", "lr", "width", "depth")
                   else (r.get("axes") or {}).get(c)) for c in cols]
    loss = "diverged" if r.get("final_loss") is None else format(r["final_loss"], ".4g")
    return cells + [loss + (" (blew up)" if r.get("blew_up") else "")]


def _expected(settings: Mapping[str, Any]) -> str:
    return str(settings.get("expected") or "").strip()


def _check_class(c: ExpectationCheck) -> str:
    return {"held": "held", "did not hold": "failed"}.get(c.status, "open")


def _settings_items(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for key, value in (metrics.get("settings") or {}).items():
        out.append((key, value if isinstance(value, str) else json.dumps(value)))
    out += [(f"{name} version", str(v)) for name, v in (metrics.get("versions") or {}).items()]
    return out


def _summary_html(metrics: Mapping[str, Any], items: Sequence[Finding], labels: Labels,
                  checks: Sequence[ExpectationCheck]) -> str:
    """The summary section: the paragraph from the verdicts, what was expected and whether it held, and
    what all runs share."""
    esc = html.escape
    settings = metrics.get("settings") or {}
    parts = ["<section id=summary class=summary>",
             f"<p class=lead>{esc(' '.join(summary_sentences(metrics, items, labels)))}</p>"]
    expected = [f"<b>Expected</b>: {esc(_expected(settings))}"] if _expected(settings) else []
    if checks:
        expected.append("<b>Checked</b> ([expect]): " + "; ".join(
            f"<span class={_check_class(c)}>{esc(line)}</span>" for c, line in zip(checks, expectation_lines(checks))))
    if expected:
        parts.append(f"<p class=expected>{' '.join(expected)}</p>")
    common = labels.common()
    n = len(metrics.get("runs", []))
    compared = " and ".join(plural(a) for a in metrics.get("compared", []))
    about = [f"{n} run{'' if n == 1 else 's'}" + (f" compared across {compared}" if compared and n > 1 else "")]
    about += [f"all runs: {', '.join(common)}" if n > 1 else ", ".join(common)] if common else []
    parts.append(f"<p class=common>{esc('; '.join(about))}</p></section>")
    return "".join(parts)


def _verdicts_html(items: Sequence[Finding]) -> str:
    """The verdict table (an interval column where a finding has one) and the "Not analysed" note."""
    esc = html.escape
    parts = []
    has_interval = any(f.interval is not None for f in items)
    heads = [h for h in VERDICT_HEAD if h != "interval" or has_interval]
    rows = verdict_rows(items, has_interval)
    parts.append("<h2>Verdicts</h2>")
    if rows:
        body = "".join("<tr>" + "".join(f"<td{' class=v' if i == 2 else ' class=ev' if i == len(r) - 1 else ''}>"
                                        f"{esc(c)}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
        parts.append(f"<div class=scroll><table class=verdicts><tr>{''.join(f'<th>{h}</th>' for h in heads)}</tr>"
                     f"{body}</table></div>")
    else:
        parts.append("<p>No verdict among these runs.</p>")
    missing = not_analysed_note(items)
    if missing:
        parts.append(f"<p class=na><b>Not analysed</b> (cannot apply to these runs): {esc('; '.join(missing))}.</p>")
    return "".join(parts)


def html_page(title: str, metrics: Mapping[str, Any], items: Sequence[Finding], labels: Labels,
              figures: Sequence[FigureFile], checks: Sequence[ExpectationCheck] = ()) -> str:
    """report.html: self-contained, opens from disk."""
    esc = html.escape

    def figure(f: FigureFile, ident: str = "") -> str:
        png = base64.b64encode(f.path.read_bytes()).decode()
        return (f"<figure{f' id={ident}' if ident else ''}{' class=wide' if f.wide else ''}><img alt='{esc(f.caption)}' "
                f"src='data:image/png;base64,{png}'><figcaption>{esc(f.caption)}</figcaption></figure>")

    parts = [f"<h1>{esc(title)}</h1>", _summary_html(metrics, items, labels, checks)]
    head = [f for f in figures if f.role == "headline"]
    parts += [figure(f, "headline") for f in head]
    parts.append(_verdicts_html(items))
    tables = _alignment_tables(metrics, labels)
    if tables:
        from .alignment import FULL_AT_LEAST, NONE_AT_MOST

        parts.append(f"<h2>Alignment</h2><p>{esc(ALIGNMENT_NOTE.format(full=FULL_AT_LEAST, none=NONE_AT_MOST))}</p>")
        for caption, columns, trs in tables:
            parts.append(f"<p>{esc(caption)}</p><div class=scroll><table><tr>"
                         + "".join(f"<th>{esc(h)}</th>" for h in columns) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in trs)
                         + "</table></div>")
    if metrics.get("problems"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(p)}</li>" for p in metrics["problems"]) + "</ul>")
    rest = [f for f in figures if f.role != "headline"]
    if rest or not head:
        parts.append("<h2>Figures</h2>" + ("".join(figure(f) for f in rest) if rest else "<p>No spectra to plot.</p>"))
    runs = metrics.get("runs", [])
    if runs:
        cols = _run_columns(runs)
        parts.append("<h2>Runs</h2><div class=scroll><table><tr>"
                     + "".join(f"<th>{esc(h)}</th>" for h in ["run", *cols, "final loss"]) + "</tr>"
                     + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in _run_cells(r, cols)) + "</tr>"
                               for r in runs) + "</table></div>")
    parts.append("<details><summary>Settings and software</summary><dl>"
                 + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in _settings_items(metrics))
                 + "</dl></details>")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><main>{''.join(parts)}</main></body></html>")


def markdown_page(title: str, metrics: Mapping[str, Any], items: Sequence[Finding], labels: Labels,
                  figures: Sequence[FigureFile], out: Path, checks: Sequence[ExpectationCheck] = ()) -> str:
    """report.md: the same content in the same order, figures linked from ``figures/``."""
    settings = metrics.get("settings") or {}
    lines = [f"# {title}", "", " ".join(summary_sentences(metrics, items, labels)), ""]
    if _expected(settings):
        lines += [f"**Expected**: {_expected(settings)}", ""]
    if checks:
        lines += [f"- {line}" for line in expectation_lines(checks)] + [""]
    for f in figures:
        if f.role == "headline":
            lines += [f"![{f.caption}]({f.path.relative_to(out)})", ""]
    has_interval = any(f.interval is not None for f in items)
    heads = [h for h in VERDICT_HEAD if h != "interval" or has_interval]
    lines += ["## Verdicts", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(f"**{c}**" if i == 2 else c.replace("|", "/") for i, c in enumerate(r)) + " |"
              for r in verdict_rows(items, has_interval)]
    missing = not_analysed_note(items)
    if missing:
        lines += ["", f"Not analysed (cannot apply to these runs): {'; '.join(missing)}."]
    tables = _alignment_tables(metrics, labels)
    if tables:
        from .alignment import FULL_AT_LEAST, NONE_AT_MOST

        lines += ["", "## Alignment", "", ALIGNMENT_NOTE.format(full=FULL_AT_LEAST, none=NONE_AT_MOST)]
        for caption, head, rows in tables:
            lines += ["", f"{caption}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
    if metrics.get("problems"):
        lines += ["", "## Notes", ""] + [f"- {p}" for p in metrics["problems"]]
    rest = [f for f in figures if f.role != "headline"]
    if rest:
        lines += ["", "## Figures", ""] + [f"![{f.caption}]({f.path.relative_to(out)})" for f in rest]
    lines += ["", "<details><summary>Settings and software</summary>", ""]
    lines += [f"- {k}: {v}" for k, v in _settings_items(metrics)] + ["", "</details>", ""]
    return "\n".join(lines)
