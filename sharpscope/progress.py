"""Progress bars for long work: tqdm, shown at once, never, or only once the work has run a while.

``progress_bar`` is the plain bar of spectrum jobs, coord checks and sweeps. :class:`Progress` is the bar of
one solver or estimator call (``progress=`` of :func:`sharpscope.lanczos`, the estimators and
:func:`sharpscope.spectral_density`): with ``progress=None`` (their default) it stays silent until the call
has run :data:`DELAY` seconds and appears at the next update after that, so quick calls print nothing;
``True`` shows it from the start, ``False`` never. On a ``torch.distributed`` world only rank 0 shows it.
:func:`call_bars` sets what ``progress=None`` means inside a block (the spectrum job: off with ``--quiet``, and
bars that vanish when done, under the job's own bar of checkpoints).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator

__all__ = ["progress_bar", "Progress", "DELAY", "call_bars"]

DELAY = 2.0  # seconds a call runs before its bar appears (progress=None)
_CALL_BARS: ContextVar[tuple[bool, bool]] = ContextVar("sharpscope_call_bars", default=(True, True))


@contextmanager
def call_bars(enabled: bool = True, leave: bool = True) -> Iterator[None]:
    """Inside the block, a :class:`Progress` left at ``progress=None`` shows after the delay only if ``enabled``,
    and its bar stays on screen when done only if ``leave`` (an explicit ``progress=True``/``False`` wins)."""
    token = _CALL_BARS.set((bool(enabled), bool(leave)))
    try:
        yield
    finally:
        _CALL_BARS.reset(token)


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it", leave: bool = True) -> Any:
    """A tqdm bar over ``total`` items (a no-op bar when ``enabled`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave)


def _rank() -> int:
    try:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    except Exception:  # pragma: no cover - a torch without distributed support
        return 0


class Progress:
    """The bar of one call: ``advance(count)`` sets the count done so far, ``note(text)`` the text after it.

    Args:
        desc: what runs (the bar's label).
        total: the count at which the work is done, or None where it is not known in advance (a solve
            stops when it converges).
        progress: None (appear after ``delay`` seconds), True (at once) or False (never).
        unit: what is counted.
        delay: seconds before a ``progress=None`` bar appears (default :data:`DELAY`).
        clock: the time source (``time.monotonic``; tests pass a fake one).
        make_bar: builds the bar from tqdm's keyword arguments (``tqdm.auto.tqdm``).
    """

    def __init__(self, desc: str, total: int | None = None, progress: bool | None = None, *, unit: str = "product",
                 delay: float | None = None, clock: Callable[[], float] = time.monotonic,
                 make_bar: Callable[..., Any] | None = None) -> None:
        if progress not in (None, True, False):
            raise ValueError(f"progress must be None (a bar after {DELAY:g} s), True or False, got {progress!r}")
        self.desc, self.total, self.unit = desc, total, unit
        allowed, self.leave = _CALL_BARS.get()
        self.enabled = (progress is True or (progress is None and allowed)) and _rank() == 0
        self.delay = 0.0 if progress else float(DELAY if delay is None else delay)
        self.clock, self.make_bar = clock, make_bar
        self.start = clock()
        self.count, self.text = 0, ""
        self.bar: Any = None
        if self.enabled and self.delay <= 0:
            self._show()

    def _show(self) -> None:
        make_bar = self.make_bar
        if make_bar is None:
            from tqdm.auto import tqdm as make_bar
        self.bar = make_bar(desc=self.desc, total=self.total, unit=self.unit, initial=self.count, leave=self.leave)
        if self.text:
            self.bar.set_postfix_str(self.text, refresh=False)

    def advance(self, count: int) -> None:
        """``count`` done so far (shows the bar once the delay has passed)."""
        step, self.count = count - self.count, count
        if self.bar is not None:
            self.bar.update(step)
        elif self.enabled and self.clock() - self.start >= self.delay:
            self._show()

    def note(self, text: str) -> None:
        """The text shown after the count (e.g. the current estimate)."""
        self.text = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
