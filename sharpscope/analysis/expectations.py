"""What a probe expects, as a table the report checks: the optional ``[expect]`` table of a probe file.

::

    [expect]
    mup = "consistent"                      # every super-consistency verdict of the muP groups
    sp = ["inconsistent", "diverging-up"]   # any one of these verdicts holds
    [expect.ntk]                            # per check: a quantity of [measure] quantities, or transfer
    precond = "diverging-down"
    transfer = "shifts"

A key is one of the probe's parameterizations. Its value is a verdict (or a list of verdicts, any of which
holds) for every super-consistency verdict of that parameterization's groups, or a table naming the check:
a measured quantity (its super-consistency verdicts) or ``transfer`` (its lr-transfer verdicts). Verdicts:
:data:`CONSISTENCY_VERDICTS` and :data:`TRANSFER_VERDICTS`. The report says per expectation whether it
**held**, **did not hold** (naming the verdicts found), was **undecided** (an ``undetermined`` verdict) or
was **not tested** (the check does not apply to the runs, e.g. lr transfer with one lr).

Plain Python: the probe file validates the table with :func:`parse_expectations` before anything trains.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["Expectation", "ExpectationCheck", "parse_expectations", "check_expectations", "CONSISTENCY_VERDICTS",
           "TRANSFER_VERDICTS"]

CONSISTENCY_VERDICTS = ("consistent", "converging", "diverging-up", "diverging-down", "inconsistent")
TRANSFER_VERDICTS = ("transfers", "shifts")
EVERY_QUANTITY = "consistency"  # the check of the short form ``mup = "consistent"``


@dataclass(frozen=True)
class Expectation:
    """One line of ``[expect]``: the verdicts (any of) expected of ``check`` (``"consistency"``: every
    quantity's super consistency; a quantity name: its super consistency; ``"transfer"``: lr transfer)
    for the groups of ``parameterization``."""

    parameterization: str
    check: str
    verdicts: tuple[str, ...]

    @property
    def kind(self) -> str:
        return "transfer" if self.check == "transfer" else "consistency"

    def as_dict(self) -> dict[str, Any]:
        return {"parameterization": self.parameterization, "check": self.check, "expected": list(self.verdicts)}


@dataclass(frozen=True)
class ExpectationCheck:
    """An expectation against the report's verdicts: ``status`` is ``held``, ``did not hold``,
    ``undecided`` or ``not tested``; ``found``: the verdicts of the matching checks; ``note``: why it
    was not tested, or which verdict broke it."""

    expectation: Expectation
    status: str
    found: tuple[str, ...]
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {**self.expectation.as_dict(), "status": self.status, "found": list(self.found), "note": self.note}


def _verdicts(value: Any, where: str, allowed: Sequence[str]) -> tuple[str, ...]:
    words = [value] if isinstance(value, str) else value
    if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
        raise ValueError(f"{where} must be a verdict or a list of verdicts ({', '.join(allowed)}), got {value!r}")
    for w in words:
        if w not in allowed:
            raise ValueError(f"{where}: unknown verdict {w!r}; choose from {', '.join(allowed)}")
    return tuple(words)


def parse_expectations(table: Any, *, parameterizations: Sequence[str] | None = None,
                       quantities: Sequence[str] | None = None, where: str = "") -> tuple[Expectation, ...]:
    """Validate an ``[expect]`` table (module docstring); every problem is a one-line ``ValueError``,
    prefixed with ``where`` (the probe file). ``parameterizations`` / ``quantities``: the names the keys
    may take (None: any)."""
    try:
        return _parse(table, parameterizations, quantities)
    except ValueError as err:
        raise ValueError(f"{where}: {err}" if where else str(err)) from None


def _parse(table: Any, parameterizations: Sequence[str] | None, quantities: Sequence[str] | None
           ) -> tuple[Expectation, ...]:
    if not isinstance(table, Mapping):
        raise ValueError(f"[expect] must be a table, got {type(table).__name__}")
    out = []
    for param, value in table.items():
        if parameterizations is not None and param not in parameterizations:
            raise ValueError(f"[expect] {param}: not a parameterization of this probe; use one of "
                             f"{', '.join(parameterizations)}")
        if not isinstance(value, Mapping):
            out.append(Expectation(param, EVERY_QUANTITY, _verdicts(value, f"[expect] {param}", CONSISTENCY_VERDICTS)))
            continue
        checks = ["transfer", EVERY_QUANTITY, *(quantities or [])]
        for check, words in value.items():
            if quantities is not None and check not in checks:
                raise ValueError(f"[expect.{param}] {check}: not a check of this probe; use transfer, consistency "
                                 f"or a measured quantity ({', '.join(quantities)})")
            allowed = TRANSFER_VERDICTS if check == "transfer" else CONSISTENCY_VERDICTS
            out.append(Expectation(param, check, _verdicts(words, f"[expect.{param}] {check}", allowed)))
    return tuple(out)


def check_expectations(expectations: Iterable[Expectation], findings: Iterable[Any]) -> list[ExpectationCheck]:
    """Each expectation against the findings (objects with ``kind``, ``parameterization``, ``quantity``,
    ``verdict``, ``check`` and ``not_analysed``; :class:`sharpscope.analysis.findings.Finding`)."""
    findings = list(findings)
    out = []
    for e in expectations:
        matched = [f for f in findings if f.parameterization == e.parameterization and f.kind == e.kind
                   and (e.check in (EVERY_QUANTITY, "transfer") or f.quantity == e.check)]
        applicable = [f for f in matched if f.not_analysed is None]
        found = tuple(f.verdict for f in applicable)
        if not matched:
            out.append(ExpectationCheck(e, "not tested", (), "no such verdict among these runs"))
        elif not applicable:
            out.append(ExpectationCheck(e, "not tested", (), f"not analysed: {matched[0].not_analysed}"))
        elif any(f.verdict not in e.verdicts and f.verdict != "undetermined" for f in applicable):
            broken = [f for f in applicable if f.verdict not in e.verdicts and f.verdict != "undetermined"]
            out.append(ExpectationCheck(e, "did not hold", found,
                                        "; ".join(f"{f.check}{f' ({f.subject})' if f.subject else ''}: {f.verdict}"
                                                  for f in broken)))
        elif any(f.verdict == "undetermined" for f in applicable):
            out.append(ExpectationCheck(e, "undecided", found, "; ".join(f"{f.check}: {f.reason}" for f in applicable
                                                                          if f.verdict == "undetermined")))
        else:
            out.append(ExpectationCheck(e, "held", found))
    return out
