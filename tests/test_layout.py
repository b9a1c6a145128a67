"""The package layout: old module paths keep working (with a DeprecationWarning), public names and the
names stored in run files resolve, the CUDA sources are found."""
import importlib
import sys

import pytest

import sharpscope as ss
from sharpscope._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_warn_and_alias_the_new_modules(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to"):
        module = importlib.import_module(old)
    if old != "sharpscope.jobs":  # the one path whose names now live in several modules
        assert module is importlib.import_module(MOVED[old])


def test_the_old_jobs_module_keeps_every_name_it_had():
    sys.modules.pop("sharpscope.jobs", None)
    with pytest.warns(DeprecationWarning):
        jobs = importlib.import_module("sharpscope.jobs")
    from sharpscope.runs.spectra import SpectraFile

    assert jobs.SpectraFile is SpectraFile
    for name in ("QUANTITIES", "SpectrumSettings", "run_spectrum_job", "spectra_path", "build_loss", "model_at",
                 "first_diverged_step", "logged_losses", "executor_from_spec", "layer_groups", "JobReport"):
        assert hasattr(jobs, name), name


def test_old_backend_submodules_are_the_new_ones():
    for sub in ("torch_basis", "reference", "bf16"):
        sys.modules.pop(f"sharpscope.backends.{sub}", None)
    sys.modules.pop("sharpscope.backends", None)
    with pytest.warns(DeprecationWarning):
        from sharpscope.backends import torch_basis
    from sharpscope.lanczos.backends import torch_basis as new

    assert torch_basis is new


def test_public_names_and_the_lanczos_function():
    for name in ss.__all__:
        assert hasattr(ss, name), name
    assert callable(ss.lanczos) and ss.lanczos.__module__ == "sharpscope.lanczos.solver"


def test_cuda_sources_are_found_from_the_moved_kernel_loader():
    from sharpscope.lanczos.backends.kernels import cuda_source_dir

    assert (cuda_source_dir() / "orthogonalize.cu").is_file()


def test_python_dash_m_runs_the_command_line():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "sharpscope", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("sharpscope ")
