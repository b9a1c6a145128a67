"""sharpscope: Hessian-spectrum and sharpness diagnostics for PyTorch.

Curvature operators (:func:`hessian_operator`, :func:`ggn_operator`, :func:`ntk_operator`,
:func:`preconditioned_hessian_operator`; :func:`batch_loss` for loss closures over dict batches;
:func:`as_operator` for a matrix or a function), the Lanczos
eigensolver (:func:`lanczos`) and randomized estimators (:func:`hutchinson_trace`, :func:`hutchpp_trace`,
:func:`spectral_density`); parameterizations (:func:`parametrize`) and scalable model families; capture
(:class:`Recorder`, :func:`open_run`) and offline spectrum jobs (``sharpscope spectrum``).

The public names are imported on first use (PEP 562): ``import sharpscope`` loads neither torch nor the
analysis layer, so the command line answers ``--help`` at once; ``ss.hessian_operator`` (or ``from sharpscope
import hessian_operator``) imports its module the first time it is read.
"""
# ruff: noqa: F401 - the imports under TYPE_CHECKING re-export the public names for type checkers and griffe
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from ._version import __version__

# every public name -> the module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("hessian_operator", "ggn_operator", "ntk_operator", "fisher_operator", "HessianOperator",
                     "GGNOperator", "NTKOperator", "FisherOperator"), ".operators"),
    **dict.fromkeys(("preconditioned_hessian_operator", "PreconditionedOperator", "stability_threshold",
                     "effective_step_sizes"), ".preconditioning"),
    **dict.fromkeys(("batch_loss", "BatchLoss"), ".closures"),
    **dict.fromkeys(("SymmetricOperator", "as_operator", "check_symmetry", "SymmetryCheck", "NotSymmetricError",
                     "StochasticForwardError", "StaleOperatorError", "DerivativeCheckError"), ".linop"),
    **dict.fromkeys(("lanczos", "LanczosResult"), ".lanczos"),
    **dict.fromkeys(("shard_vectors", "ShardedVectorOperator"), ".sharded_vectors"),
    **dict.fromkeys(("hutchinson_trace", "hutchpp_trace", "spectral_density", "TraceEstimate", "SpectralDensity"),
                    ".estimators"),
    **dict.fromkeys(("dense_hessian", "dense_ggn", "dense_jacobian", "ntk_gram"), ".dense"),
    **dict.fromkeys(("Recorder", "every_schedule", "log_schedule"), ".runs.capture"),
    **dict.fromkeys(("lightning_callback", "huggingface_callback"), ".runs.callbacks"),
    **dict.fromkeys(("parametrize", "parametrize_from_record", "infer_roles", "lr_exponent", "Parameterization",
                     "Exponents", "ParamGroups", "PARAMETERIZATIONS"), ".param"),
    **dict.fromkeys(("MLP", "CNN", "Transformer", "MoE", "MoELayer", "FAMILIES", "build_model"), ".models"),
    **dict.fromkeys(("build_optimizer", "OptimizerList"), ".optim"),
    **dict.fromkeys(("coord_check", "plot_coord_check", "CoordCheckResult"), ".coordcheck"),
    **dict.fromkeys(("layer_alignment", "alignment_terms"), ".alignment"),
    "super_consistency": ".analysis.consistency",
    "lr_transfer": ".analysis.transfer",
    "edge_of_stability": ".analysis.eos",
    "eos_threshold": ".stability",
    "to_long_table": ".analysis.tables",
    **dict.fromkeys(("open_run", "Run", "RunWriter", "RunFileError"), ".runs.store"),
    "run_spectrum_job": ".runs.jobs",
    **dict.fromkeys(("register_model", "register_loss", "register_optimizer", "UntrustedNameError"), ".registry"),
    **dict.fromkeys(("collect", "analyze"), ".analysis.comparisons"),
    "write_report": ".analysis.report",
    **dict.fromkeys(("load_probe", "run_sweep"), ".sweep"),
}

__all__ = ["__version__", *_EXPORTS]

# public names that are also subpackages: importing the subpackage must not rebind the public name
_SHADOWED = frozenset({"lanczos"})


def __getattr__(name: str) -> Any:
    """Import the module of a public name the first time the name is read (PEP 562), and keep it."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sharpscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """The package's module type. Importing a subpackage binds it as an attribute of its package
    (``sharpscope.lanczos = <module>``); for a public name that is also a subpackage, that binding is left out,
    so that ``ss.lanczos`` stays the eigensolver (the subpackage is in ``sys.modules`` all the same)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # what type checkers and the API reference (griffe, which does not run this file) read
    from .alignment import alignment_terms, layer_alignment
    from .analysis.comparisons import analyze, collect
    from .analysis.consistency import super_consistency
    from .analysis.eos import edge_of_stability
    from .analysis.report import write_report
    from .analysis.tables import to_long_table
    from .analysis.transfer import lr_transfer
    from .closures import BatchLoss, batch_loss
    from .coordcheck import CoordCheckResult, coord_check, plot_coord_check
    from .dense import dense_ggn, dense_hessian, dense_jacobian, ntk_gram
    from .estimators import SpectralDensity, TraceEstimate, hutchinson_trace, hutchpp_trace, spectral_density
    from .lanczos import LanczosResult, lanczos
    from .linop import (
        DerivativeCheckError,
        NotSymmetricError,
        StaleOperatorError,
        StochasticForwardError,
        SymmetricOperator,
        SymmetryCheck,
        as_operator,
        check_symmetry,
    )
    from .models import CNN, FAMILIES, MLP, MoE, MoELayer, Transformer, build_model
    from .operators import (
        FisherOperator,
        GGNOperator,
        HessianOperator,
        NTKOperator,
        fisher_operator,
        ggn_operator,
        hessian_operator,
        ntk_operator,
    )
    from .optim import OptimizerList, build_optimizer
    from .param import (
        PARAMETERIZATIONS,
        Exponents,
        Parameterization,
        ParamGroups,
        infer_roles,
        lr_exponent,
        parametrize,
        parametrize_from_record,
    )
    from .preconditioning import (
        PreconditionedOperator,
        effective_step_sizes,
        preconditioned_hessian_operator,
        stability_threshold,
    )
    from .registry import UntrustedNameError, register_loss, register_model, register_optimizer
    from .runs.callbacks import huggingface_callback, lightning_callback
    from .runs.capture import Recorder, every_schedule, log_schedule
    from .runs.jobs import run_spectrum_job
    from .runs.store import Run, RunFileError, RunWriter, open_run
    from .sharded_vectors import ShardedVectorOperator, shard_vectors
    from .stability import eos_threshold
    from .sweep import load_probe, run_sweep
