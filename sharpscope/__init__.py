"""sharpscope: Hessian-spectrum and sharpness diagnostics for PyTorch.

Curvature operators (:func:`hessian_operator`, :func:`ggn_operator`, :func:`ntk_operator`,
:func:`preconditioned_hessian_operator`; :func:`batch_loss` for loss closures over dict batches;
:func:`as_operator` for a matrix or a function), the Lanczos
eigensolver (:func:`lanczos`) and randomized estimators (:func:`hutchinson_trace`, :func:`hutchpp_trace`,
:func:`spectral_density`); parameterizations (:func:`parametrize`) and scalable model families; capture
(:class:`Recorder`, :func:`open_run`) and offline spectrum jobs (``sharpscope spectrum``).
"""
from ._version import __version__
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
from .operators import GGNOperator, HessianOperator, NTKOperator, ggn_operator, hessian_operator, ntk_operator
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
from .preconditioning import PreconditionedOperator, effective_step_sizes, preconditioned_hessian_operator, stability_threshold
from .registry import UntrustedNameError, register_loss, register_model, register_optimizer
from .runs.callbacks import huggingface_callback, lightning_callback
from .runs.capture import Recorder, every_schedule, log_schedule
from .runs.jobs import run_spectrum_job
from .runs.store import Run, RunFileError, RunWriter, open_run
from .sharded_vectors import ShardedVectorOperator, shard_vectors
from .stability import eos_threshold
from .sweep import load_probe, run_sweep

__all__ = [
    "__version__",
    "hessian_operator", "ggn_operator", "ntk_operator", "preconditioned_hessian_operator", "batch_loss", "BatchLoss",
    "HessianOperator", "GGNOperator", "NTKOperator", "PreconditionedOperator", "SymmetricOperator", "as_operator",
    "stability_threshold", "effective_step_sizes",
    "lanczos", "LanczosResult", "shard_vectors", "ShardedVectorOperator",
    "hutchinson_trace", "hutchpp_trace", "spectral_density", "TraceEstimate", "SpectralDensity",
    "check_symmetry", "SymmetryCheck", "NotSymmetricError", "StochasticForwardError", "StaleOperatorError",
    "DerivativeCheckError",
    "dense_hessian", "dense_ggn", "dense_jacobian", "ntk_gram",
    "Recorder", "every_schedule", "log_schedule", "lightning_callback", "huggingface_callback",
    "parametrize", "parametrize_from_record", "infer_roles", "lr_exponent", "Parameterization", "Exponents",
    "ParamGroups", "PARAMETERIZATIONS", "MLP", "CNN", "Transformer", "MoE", "MoELayer", "FAMILIES",
    "build_model", "build_optimizer", "OptimizerList", "coord_check", "plot_coord_check", "CoordCheckResult",
    "layer_alignment", "alignment_terms",
    "super_consistency", "lr_transfer", "edge_of_stability", "eos_threshold", "to_long_table",
    "open_run", "Run", "RunWriter", "RunFileError", "run_spectrum_job",
    "register_model", "register_loss", "register_optimizer", "UntrustedNameError",
    "collect", "analyze", "write_report", "load_probe", "run_sweep",
]
