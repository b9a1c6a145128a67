"""Deprecated path: the job runner moved to :mod:`sharpscope.runs.jobs`, the spectra file to
:mod:`sharpscope.runs.spectra`, model rebuilding to :mod:`sharpscope.runs.rebuild` (see CHANGELOG.md)."""
from ._moved import warn_moved

warn_moved(__name__)

from .runs.executors import executor_from_spec  # noqa: E402,F401
from .runs.jobs import (QUANTITIES, JobReport, SpectrumSettings, compute_task, layer_groups,  # noqa: E402,F401
                        run_spectrum_job)
from .runs.rebuild import NoOptimizerState, build_loss, model_at  # noqa: E402,F401
from .runs.spectra import SpectraFile, spectra_path  # noqa: E402,F401
from .runs.store import first_diverged_step, logged_losses  # noqa: E402,F401
