"""What a report says, read from its metrics (a ``metrics.json`` dict): the verdict rows, the checks that do
not apply, the labels of the groups, and the summary paragraph written from the verdicts.

Every verdict becomes a :class:`Finding` with the same fields whatever produced it -- its check, verdict
word, the value it compared with its threshold, the reason, an optional interval -- so the page and the
command line render them alike. A check that cannot apply to the runs (the metrics entry carries
``not_analysed``: one size, fewer than 3 lrs, a layer whose fan-in does not grow) is a finding with
``not_analysed`` set: it goes into one "not analysed" note, not into the verdict table.

Labels carry only the settings that vary across the report's groups (``muP`` rather than
``mup / sgd / lr 0.5 / depth 2`` when only the parameterization varies); :func:`common_settings` names the
rest once. Nothing here computes a verdict: the analysis (:mod:`sharpscope.analysis.comparisons`) does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ..runs.quantities import REGISTRY
from .expectations import ExpectationCheck

__all__ = ["Finding", "Labels", "findings", "not_analysed_note", "summary_sentences", "display", "plural",
           "quantity_name", "entry_fixed", "expectation_lines"]

DISPLAY = {"mup": "muP", "sp": "SP", "ntk": "NTK", "mf": "MF", "sgd": "SGD", "adam": "Adam", "adamw": "AdamW",
           "adafactor": "Adafactor", "muon": "Muon", "adam-atan2": "Adam-atan2"}
EDGE_BAND = (0.8, 1.25)  # sharpness / threshold at the end counted "at the edge of stability"


def g(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits with a short exponent: 38000 -> ``3.8e4``."""
    return f"{x:.{digits}g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def display(name: Any) -> str:
    """How a parameterization or optimizer is written for readers: ``mup`` -> ``muP``, ``sgd`` -> ``SGD``."""
    return DISPLAY.get(str(name), str(name))


def plural(axis: str) -> str:
    """``width`` -> ``widths``; names already ending in s (``steps``) stay."""
    return axis if axis.endswith("s") else f"{axis}s"


def quantity_name(q: str) -> str:
    """A quantity as prose: its figure label up to the colon (``precond`` -> ``preconditioned sharpness``)."""
    label = REGISTRY[q].label if q in REGISTRY else q
    return label.split(":")[0]


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def entry_fixed(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The other axes' values of a metrics entry (a number in metrics.json files of sharpscope 0.1)."""
    fixed = entry.get("fixed")
    if isinstance(fixed, dict):
        return fixed
    return {} if fixed is None else {"depth" if entry["axis"] == "width" else "width": fixed}


@dataclass(frozen=True)
class Labels:
    """Names of groups by the settings that vary across a report: ``varying`` holds the coordinates
    (``parameterization``, ``optimizer``, ``lr`` or an axis name) that take >= 2 values among its groups,
    ``values`` every coordinate's values in order of appearance."""

    varying: tuple[str, ...]
    values: dict[str, list] = field(default_factory=dict)
    raw: bool = False  # names as stored (mup, sgd), not as displayed (muP, SGD)

    @classmethod
    def full(cls, metrics: Mapping[str, Any]) -> "Labels":
        """Labels naming every coordinate, with names as stored: ``"mup / sgd / lr 0.5 / depth 2"`` (the
        command line, where no line says what all runs share)."""
        of = cls.of(metrics)
        return cls(tuple(of.values), of.values, raw=True)

    @classmethod
    def of(cls, metrics: Mapping[str, Any]) -> "Labels":
        values: dict[str, list] = {}

        def see(name: str, value: Any) -> None:
            if value is not None and value not in values.setdefault(name, []):
                values[name].append(value)

        for e in [*metrics.get("groups", []), *metrics.get("transfer", [])]:
            see("parameterization", e.get("parameterization"))
            see("optimizer", e.get("optimizer"))
            see("lr", e.get("lr"))
            for name, value in entry_fixed(e).items():
                see(name, value)
        return cls(tuple(name for name, vals in values.items() if len(vals) >= 2), values)

    def __call__(self, parameterization: str, optimizer: str, lr: float | None = None,
                 fixed: Mapping[str, Any] | None = None) -> str:
        """``"muP"``, ``"muP / lr 0.5"``: the coordinates that vary, in that order; "" when none does."""
        parts = []
        name = str if self.raw else display
        if "parameterization" in self.varying:
            parts.append(name(parameterization))
        if "optimizer" in self.varying:
            parts.append(name(optimizer))
        if "lr" in self.varying and lr is not None:
            parts.append(f"lr {lr:g}")
        parts += [f"{name} {_show(value)}" for name, value in (fixed or {}).items() if name in self.varying]
        return " / ".join(parts)

    def entry(self, e: Mapping[str, Any]) -> str:
        return self(e["parameterization"], e["optimizer"], e.get("lr"), entry_fixed(e))

    def common(self) -> list[str]:
        """The settings all groups share, as words: ``["muP", "SGD", "lr 0.5", "depth 2"]``."""
        out = []
        for name, vals in self.values.items():
            if name in self.varying or len(vals) != 1:
                continue
            v = vals[0]
            out.append(display(v) if name in ("parameterization", "optimizer") else f"{name} {_show(v)}")
        return out


@dataclass(frozen=True)
class Finding:
    """One verdict, rendered alike whatever check made it.

    ``kind``: consistency, transfer or alignment; ``subject``: the group's label (only the settings that
    vary); ``check``: e.g. "precond across widths"; ``value``/``value_name``/``threshold``: the number the
    verdict compared and the rule; ``interval``: (low, high) of ``value`` where the analysis gives one;
    ``not_analysed``: why the check cannot apply to these runs (None: it applies); ``entry``: the metrics
    entry it came from."""

    kind: str
    subject: str
    check: str
    verdict: str
    reason: str
    parameterization: str
    optimizer: str
    lr: float | None
    fixed: dict
    axis: str
    quantity: str | None = None
    value: float | None = None
    value_name: str = ""
    threshold: str = ""
    interval: tuple[float, float] | None = None
    not_analysed: str | None = None
    entry: dict = field(default_factory=dict, repr=False)

    @property
    def applicable(self) -> bool:
        return self.not_analysed is None


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _interval(entry: Mapping[str, Any], key: str) -> tuple[float, float] | None:
    """An optional interval of the entry's value: ``<key>_interval`` or ``interval``, a pair of numbers."""
    raw = entry.get(f"{key}_interval", entry.get("interval"))
    if isinstance(raw, (list, tuple)) and len(raw) == 2 and all(_number(x) is not None for x in raw):
        return float(raw[0]), float(raw[1])
    return None


def findings(metrics: Mapping[str, Any], labels: Labels | None = None) -> list[Finding]:
    """Every verdict of ``metrics`` as a :class:`Finding`: per group its quantities, then lr transfer per
    family, then alignment per layer -- in the metrics' order."""
    labels = labels or Labels.of(metrics)
    out = []
    for g in metrics.get("groups", []):
        head = dict(parameterization=g["parameterization"], optimizer=g["optimizer"], lr=g.get("lr"),
                    fixed=entry_fixed(g), axis=g["axis"], subject=labels.entry(g))
        for q, ev in g.get("quantities", {}).items():
            th = ev.get("thresholds", {})
            out.append(Finding("consistency", check=f"{q} across {plural(g['axis'])}", verdict=ev.get("verdict", "?"),
                               reason=ev.get("reason", ""), quantity=q, value=_number(ev.get("spread_summary")),
                               value_name="spread",
                               threshold=f"<= {th['spread_max']:g}" if "spread_max" in th else "",
                               interval=_interval(ev, "spread_summary"), not_analysed=ev.get("not_analysed"),
                               entry=ev, **head))
    for t in metrics.get("transfer", []):
        threshold = (f"<= {t['shift_max']:g} octave, cost <= {t['cost_max']:.0%}"
                     if "shift_max" in t and "cost_max" in t else "")
        out.append(Finding("transfer", check=f"lr transfer across {plural(t['axis'])}", verdict=t.get("verdict", "?"),
                           reason=t.get("reason", ""), parameterization=t["parameterization"],
                           optimizer=t["optimizer"], lr=None, fixed=entry_fixed(t), axis=t["axis"],
                           subject=labels.entry({**t, "lr": None}), value=_number(t.get("shift_range_octaves")),
                           value_name="shift (octaves)", threshold=threshold,
                           interval=_interval(t, "shift_range_octaves"), not_analysed=t.get("not_analysed"), entry=t))
    for g in metrics.get("groups", []):
        found = g.get("alignment") or {}
        th = found.get("thresholds", {})
        for layer, a in found.get("layers", {}).items():
            reason = a.get("reason") or (f"exponent of ||dW x||/(RMS dW RMS x) vs fan-in at step {found['step']} "
                                         "(none 1/2, full 1)")
            out.append(Finding("alignment", check=f"alignment of {layer} across {plural(g['axis'])}",
                               verdict=a.get("verdict", "?"), reason=reason, parameterization=g["parameterization"],
                               optimizer=g["optimizer"], lr=g.get("lr"), fixed=entry_fixed(g), axis=g["axis"],
                               subject=labels.entry(g), value=_number(a.get("exponent")), value_name="exponent",
                               threshold=f"full >= {th['full']:g}, none <= {th['none']:g}" if th else "",
                               interval=_interval(a, "exponent"), not_analysed=a.get("not_analysed"), entry=a))
    return out


def _check_kind(f: Finding) -> str:
    """The check without its subject and quantity, as the "not analysed" note names it."""
    if f.kind == "transfer":
        return f"lr transfer across {plural(f.axis)}"
    if f.kind == "consistency":
        return f"super consistency across {plural(f.axis)}"
    return f.check


def not_analysed_note(items: Iterable[Finding]) -> list[str]:
    """The checks that cannot apply, folded: one entry per (check, reason), naming the quantities and the
    groups it concerns (no groups when it concerns them all): ``"lr transfer across widths: 1 lr (needs >= 3)"``,
    ``"super consistency across widths (hessian, precond): 1 width measured (needs >= 2)"``."""
    folded: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    every: dict[str, set] = {}
    for f in items:
        every.setdefault(_check_kind(f), set()).add(f.subject)
        if f.not_analysed is not None:
            subjects, quantities = folded.setdefault((_check_kind(f), f.not_analysed), ([], []))
            if f.subject not in subjects:
                subjects.append(f.subject)
            if f.quantity and f.kind == "consistency" and f.quantity not in quantities:
                quantities.append(f.quantity)
    out = []
    for (check, why), (subjects, quantities) in folded.items():
        what = f" ({', '.join(quantities)})" if quantities else ""
        scope = "" if set(subjects) == every[check] or subjects == [""] else f" for {', '.join(subjects)}"
        out.append(f"{check}{what}{scope}: {why}")
    return out


def _span(sizes: Sequence[float]) -> str:
    sizes = sorted(sizes)
    return f"{sizes[0]:g}-{sizes[-1]:g}" if len(sizes) > 2 else " and ".join(f"{s:g}" for s in sizes)


def _edge_phrase(entry: Mapping[str, Any], diverged: set[float] = frozenset()) -> str:
    """Where the quantity ended relative to its edge-of-stability threshold (tail means per size; sizes
    whose run diverged left out)."""
    eos = {k: v for k, v in (entry.get("edge_of_stability") or {}).items() if float(k) not in diverged}
    ratios = [r for r in (_number(v.get("tail_ratio")) for v in eos.values()) if r is not None]
    if not ratios:
        return ""
    lo, hi = min(ratios), max(ratios)
    span = f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}"
    thresholds = {_number(v.get("threshold")) for v in eos.values()}
    th = f" {g(next(iter(thresholds)))}" if len(thresholds) == 1 and None not in thresholds else ""
    if EDGE_BAND[0] <= lo and hi <= EDGE_BAND[1]:
        return f"at the edge of stability ({span} x its threshold{th} at the end)"
    where = "below" if hi < EDGE_BAND[0] else "above" if lo > EDGE_BAND[1] else "around"
    return f"{where} the edge of stability ({span} x its threshold{th} at the end)"


def _in_group(run: Mapping[str, Any], f: Finding) -> bool:
    def value(name: str) -> Any:
        return run.get(name) if name in ("width", "depth") else (run.get("axes") or {}).get(name)

    return (run.get("parameterization") == f.parameterization and run.get("optimizer") == f.optimizer
            and (f.lr is None or run.get("lr") == f.lr)
            and all(value(name) == v for name, v in f.fixed.items()))


def _diverged(runs: Sequence[Mapping[str, Any]], f: Finding) -> list[tuple[float, Any]]:
    """``(lr, size)`` of the group's runs that diverged (a NaN/inf loss) or blew up (ended above twice
    their initial loss)."""
    out = []
    for r in runs:
        if _in_group(r, f) and (r.get("final_loss") is None or r.get("blew_up")):
            out.append((r["lr"], r.get(f.axis) if f.axis in ("width", "depth") else (r.get("axes") or {}).get(f.axis)))
    return out


def _diverged_phrase(runs: Sequence[Mapping[str, Any]], f: Finding) -> str:
    """``"width 512 diverged at lr 0.5"``."""
    bad: dict[float, list[str]] = {}
    for lr, size in _diverged(runs, f):
        bad.setdefault(lr, []).append(_show(size))
    parts = []
    for lr, sizes in bad.items():
        sizes = sorted(set(sizes), key=lambda s: float(s) if s.replace(".", "", 1).isdigit() else 0)
        parts.append(f"{f.axis if len(sizes) == 1 else plural(f.axis)} {', '.join(sizes)} diverged at lr {lr:g}")
    return "; ".join(parts)


def _verdict_phrase(f: Finding, named: bool, runs: Sequence[Mapping[str, Any]] = ()) -> str:
    """``"preconditioned sharpness consistent across widths 64-512 (spread 0.051), at the edge ..."``;
    without the quantity and the sizes when ``named`` is False (said before). Runs of the group that
    diverged are named, and left out of where the others ended against the edge of stability."""
    if f.verdict == "undetermined":
        return f"{quantity_name(f.quantity) + ' ' if named else ''}undetermined ({f.reason})"
    number = f"spread {f.value:.2g}" if f.value is not None else f.reason
    if f.interval is not None:
        number += f", interval {f.interval[0]:.2g}-{f.interval[1]:.2g}"
    sizes = f.entry.get("sizes") or []
    what = f"{quantity_name(f.quantity)} {f.verdict} across {plural(f.axis)} {_span(sizes)}" if named and sizes \
        else f.verdict
    gone = {float(size) for _, size in _diverged(runs, f) if _number(size) is not None}
    edge = _edge_phrase(f.entry, gone)
    if gone:
        return f"{what} ({number}); {_diverged_phrase(runs, f)}" + (f", the others ended {edge}" if edge else "")
    return f"{what} ({number})" + (f", {edge}" if edge else "")


def _run_sentence(run: Mapping[str, Any], label: str) -> str:
    """One run on its own: where each measured quantity went, and the loss."""
    parts = []
    for q, s in (run.get("quantities") or {}).items():
        first, last = s.get("first"), s.get("last")
        if not first or not last:
            continue
        text = f"{quantity_name(q)} {g(first[1])} at step {first[0]:g} -> {g(last[1])} at step {last[0]:g}"
        th = _number(s.get("threshold"))
        if th:
            text += f" ({g(last[1] / th, 2)} x its EoS threshold {g(th)})"
        parts.append(text)
    first, last = run.get("loss_first"), run.get("loss_last")
    if run.get("final_loss") is None and run.get("loss_first") is not None:
        parts.append("the training loss diverged")
    elif first and last and first[0] != last[0]:
        parts.append(f"training loss {g(first[1])} at step {first[0]:g} -> {g(last[1])} at step {last[0]:g}")
    elif run.get("final_loss") is not None:
        parts.append(f"final training loss {g(run['final_loss'])}")
    return f"{label}: {'; '.join(parts)}."


def _group_sentences(items: Sequence[Finding], runs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list]:
    """A sentence per group with applicable consistency verdicts; the findings it covered."""
    quantities = {f.quantity for f in items if f.kind == "consistency" and f.applicable}
    by_group: dict[str, list[Finding]] = {}
    for f in items:
        if f.kind == "consistency" and f.applicable:
            by_group.setdefault(f.subject, []).append(f)
    sentences, named = [], set()
    for subject, group in by_group.items():
        phrases = []
        for f in group:
            key = (f.quantity, f.axis, tuple(f.entry.get("sizes", [])))
            phrases.append(_verdict_phrase(f, named=key not in named or len(quantities) > 1, runs=runs))
            named.add(key)
        diverged = _diverged_phrase(runs, group[0])
        text = "; ".join(phrases) + (f"; {diverged}" if diverged and diverged not in " ".join(phrases) else "")
        sentences.append(f"{subject}: {text}." if subject else f"{text[0].upper()}{text[1:]}.")
    return sentences, [f for group in by_group.values() for f in group]


def _transfer_sentence(f: Finding) -> str:
    number = f"shift {f.value:.2g} octave" if f.value is not None else f.reason
    if f.interval is not None:
        number += f", interval {f.interval[0]:.2g}-{f.interval[1]:.2g}"
    return f"{f.subject + ' ' if f.subject else ''}lr transfer across {plural(f.axis)}: {f.verdict} ({number})."


def summary_sentences(metrics: Mapping[str, Any], items: Sequence[Finding] | None = None,
                      labels: Labels | None = None) -> list[str]:
    """The summary paragraph, a sentence per group, written from the verdicts: e.g. "muP: preconditioned
    sharpness consistent across widths 64-512 (spread 0.051), at the edge of stability (...)." "SP:
    inconsistent (spread 1.2); width 512 diverged at lr 0.5." Then lr transfer, the runs compared with
    nothing (what each quantity did; a count past 4 runs), and one "Not analysed" sentence."""
    labels = labels or Labels.of(metrics)
    items = list(findings(metrics, labels) if items is None else items)
    runs = metrics.get("runs", [])
    sentences, covered = _group_sentences(items, runs)
    sentences += [_transfer_sentence(f) for f in items if f.kind == "transfer" and f.applicable]
    alone = [r for r in runs if not any(_in_group(r, f) for f in covered)]
    if 0 < len(alone) <= 4:
        for r in alone:
            label = labels(r["parameterization"], r["optimizer"], r["lr"],
                           {k: v for k, v in (("width", r.get("width")), ("depth", r.get("depth"))) if v is not None})
            sentences.append(_run_sentence(r, label or ("The run" if len(runs) == 1 else r["path"].rsplit("/", 1)[-1])))
    elif alone:
        sentences.append(f"{len(alone)} runs have nothing to be compared with: their trajectories are below.")
    missing = not_analysed_note(items)
    if missing:
        sentences.append("Not analysed: " + "; ".join(missing) + ".")
    return sentences or ["No verdict: see the notes below."]


MARKS = {"held": "✓", "did not hold": "✗", "undecided": "?", "not tested": "–"}


def expectation_lines(checks: Sequence[ExpectationCheck]) -> list[str]:
    """``"✓ muP consistent: held"``, one per expectation (the verdicts found where several were allowed or
    it did not hold; why, where it was not tested or is undecided)."""
    out = []
    for c in checks:
        e = c.expectation
        what = "" if e.check == "consistency" else "lr transfer " if e.check == "transfer" else f"{e.check} "
        line = f"{MARKS.get(c.status, '')} {display(e.parameterization)} {what}{' or '.join(e.verdicts)}: {c.status}"
        if c.status == "did not hold" or (c.status == "held" and len(e.verdicts) > 1):
            line += f" ({c.note or ', '.join(sorted(set(c.found)))})"
        elif c.note and c.status != "held":
            line += f" ({c.note})"
        out.append(line)
    return out
