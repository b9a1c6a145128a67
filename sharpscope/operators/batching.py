"""Block products (``matmat``): a block of columns cut into chunks that fit the memory budget, each multiplied
batched (``is_grads_batched``, ``vmap``) or one column at a time, and the measured choice between the two
(docs/operators-semantics.md). A mixin of :class:`~.base.CurvatureOperator`."""
from __future__ import annotations

import time
import warnings

import torch

from ._autograd import SavedBytes
from .modes import FD

_BATCH_TRIAL = (True, False, True, False)  # batched=None: warm-up pair, then a timed pair
_TRIAL_BLOCK = 8   # batched=None measures on a block of at least this many columns, in chunks of
_TRIAL_CHUNK = 4   # at least this many, and batches only when that is this much faster per column:
_TRIAL_GAIN = 1.25
_BATCH_ERRORS = (RuntimeError, NotImplementedError, ValueError, TypeError)


class BlockProducts:
    """Planning of block products: ``batched`` (None: measured), ``matmat_choice`` (the outcome)."""

    def _reset_batching(self) -> None:
        self.matmat_choice: str | None = {True: "batched", False: "one-at-a-time", None: None}[self.batched]
        self._batch_trials: list[tuple[bool, float]] = []
        self._batched_failed: str | None = None
        self._column_bytes: int | None = None

    def _block_product(self, V: torch.Tensor) -> torch.Tensor:
        """``A V`` as rows: chunks of columns, batched or not (:meth:`_plan`); single columns and the
        products of the auto reverse/forward trial go one at a time."""
        rows, m = V.T, V.shape[1]
        out = torch.empty(m, self.shape[0], dtype=self.dtype, device=self.device)
        i = 0
        while i < m:
            if self.modes.state in ("measuring", FD) or m - i == 1:
                out[i] = self._product(rows[i])
                i += 1
                continue
            batched, width = self._plan(m, m - i)
            out[i: i + width] = self._timed_rows(rows[i: i + width]) if batched is None else \
                self._try_rows(rows[i: i + width], batched)
            i += width
        return out.T

    def _plan(self, block: int, remaining: int) -> tuple[bool | None, int]:
        """Batched or not, and how many columns, for the next chunk of a ``block``-column product; None:
        a chunk of the auto measurement (which of the two it is, :meth:`_timed_rows` knows)."""
        if self.batched is False or self._batched_failed is not None:
            return False, remaining
        if self.batched is True or self.matmat_choice == "batched":
            return True, min(remaining, self._max_columns())
        if self.matmat_choice is not None or block < _TRIAL_BLOCK or remaining < _TRIAL_CHUNK:
            return False, remaining  # too narrow to measure: one at a time, as without batching
        return None, min(remaining, self._max_columns(), max(_TRIAL_CHUNK, block // 4))

    def _timed_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """A chunk of the auto measurement: batched and one at a time alternate (a warm-up pair, then a
        timed pair; every result is a real product); batching is kept when it is ``_TRIAL_GAIN`` times
        faster per column."""
        batched, mode = _BATCH_TRIAL[len(self._batch_trials)], self.modes.state
        self._synchronize()
        start = time.perf_counter()
        out = self._try_rows(rows, batched)
        self._synchronize()
        if self._batched_failed is None and self.modes.state == mode:
            self._batch_trials.append((batched, (time.perf_counter() - start) / rows.shape[0]))
            if len(self._batch_trials) == len(_BATCH_TRIAL):
                per_column = dict(self._batch_trials[-2:])
                faster = per_column[True] * _TRIAL_GAIN <= per_column[False]
                self.matmat_choice = "batched" if faster else "one-at-a-time"
        return out

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _try_rows(self, rows: torch.Tensor, batched: bool) -> torch.Tensor:
        """The chunk's products; when a batched one fails and one column at a time succeeds (an op without
        a batching rule), batching is off for this operator from then on. An error of both (an op without
        the derivative) goes down the fallback ladder, batching not blamed."""
        if not batched:
            return self._rows_product(rows, False)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*There is a performance drop.*")
                return self._rows_product(rows, True)
        except _BATCH_ERRORS as err:
            failure = err
        out = self._rows_product(rows, False)
        self._batched_failed = f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
        self.matmat_choice = "one-at-a-time"
        if self.batched is True:
            warnings.warn(f"{type(self).__name__}: batched products unsupported ({self._batched_failed}); "
                          "taking the columns one at a time", RuntimeWarning, stacklevel=6)
        return out

    def _max_columns(self) -> int:
        """Columns a batched chunk may hold: the budget left by the cached graphs over one column's share
        (one batch's graph, measured once with saved-tensor hooks)."""
        if self._column_bytes is None:
            counter = SavedBytes(self.fn.params)
            with counter.hooks():
                graph = self._build_graph(next(iter(self.batches)))
            del graph
            self._column_bytes = counter.nbytes
        cached = (self.graph_bytes or 0) if self._graphs is not None else 0
        return int(max(1, (self._budget() - cached) // max(self._column_bytes, 1)))
