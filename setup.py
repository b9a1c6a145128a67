"""Installation script for sharpscope (metadata lives here; pyproject.toml only names the backend)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

# the docs site (mkdocs.yml): the site generator, its theme, and the API reference from the docstrings
DOCS = ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings>=1.0", "mkdocstrings-python>=2.0"]

version = re.search(r'__version__ = "([^"]+)"', Path("sharpscope/_version.py").read_text()).group(1)

setup(
    name="sharpscope",
    version=version,
    description="Hessian-spectrum and sharpness diagnostics for PyTorch: does your learning rate transfer?",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sharpscope", "sharpscope.*"]),
    include_package_data=True,
    # the CUDA kernels live in the repository's cuda/; an editable install reads them there, a regular
    # install ships them here (sharpscope/lanczos/backends/kernels.py searches both)
    data_files=[("share/sharpscope/cuda", sorted(str(p) for p in Path("cuda").glob("*.cu*")))],
    install_requires=[
        # torch is pinned by scripts/*.sh (the CPU wheel on disk); a range here never pulls a CUDA build
        "torch>=2.4",
        "numpy>=1.24",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "h5py>=3.8",
        "tqdm>=4.60",
        "scikit-learn>=1.2",
    ],
    extras_require={
        # curvlinops-for-pytorch (tests/test_curvlinops.py) is installed by scripts/_env.sh with --no-deps:
        # its backpack-for-pytorch pulls torchvision, which replaces the pinned torch; these are the
        # dependencies it imports
        # ruff: the linter .ci/run runs (configuration in pyproject.toml); the [docs] packages: .ci/run and
        # tests/test_docs.py build the docs site with mkdocs build --strict; playwright drives the system's
        # Chromium for tests/test_render.py (executable_path: it downloads no browser)
        "test": ["pytest>=7", "pytest-xdist>=3", "dask[distributed]>=2024.1", "lightning>=2.0",
                 "transformers>=4.40", "accelerate>=1.1", "einops>=0.6", "einconv>=0.1", "linear_operator>=0.5",
                 "ruff>=0.6", "playwright>=1.40", *DOCS],
        "docs": DOCS,
        "dask": ["dask[distributed]"],
        "dask-cuda": ["dask[distributed]", "dask-cuda"],
        "lightning": ["lightning"],
        "huggingface": ["transformers>=4.40", "accelerate>=1.1"],
        # CuPy's wheel must match torch's CUDA major version (sharpscope refuses a mismatch with the
        # reason): [cupy-cuda12] for CUDA 12, [cupy-cuda13] for CUDA 13; [cupy] is kept as an alias
        # of [cupy-cuda12] so that existing instructions keep working
        "cupy": ["cupy-cuda12x"],
        "cupy-cuda12": ["cupy-cuda12x"],
        "cupy-cuda13": ["cupy-cuda13x"],
    },
    entry_points={"console_scripts": ["sharpscope=sharpscope.cli:main"]},
)
