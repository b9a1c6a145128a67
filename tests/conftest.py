"""Small models and data shared by the tests (float64 unless a test casts them)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sharpscope as ss

torch.set_num_threads(1)  # two pytest workers on two cores


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (long crash loops) run only with SHARPSCOPE_SLOW=1."""
    import os

    if os.environ.get("SHARPSCOPE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set SHARPSCOPE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class TinyAttention(nn.Module):
    """Embedding -> multi-head self-attention (SDPA inside) with residual and LayerNorm -> mean pool -> readout."""

    def __init__(self, d_in: int = 4, d: int = 8, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.readout = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.readout(torch.tanh(h).mean(dim=1))


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4)).double()


def make_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 5 * 5, 4)).double()


def make_attention(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyAttention(classes=4).double()


def make_data(kind: str, seed: int = 0, n: int = 16, classes: int = 4):
    g = torch.Generator().manual_seed(1000 + seed)
    shape = {"mlp": (n, 6), "cnn": (n, 1, 5, 5), "attention": (n, 5, 4)}[kind]
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


MODELS = {"mlp": make_mlp, "cnn": make_cnn, "attention": make_attention}


@pytest.fixture(params=sorted(MODELS))
def model_kind(request) -> str:
    return request.param


def probe_text(name: str = "tiny", widths=(16, 32), parameterizations=("mup",), lrs=(0.2,), steps: int = 6,
               every: int = 3, quantities=("precond",), base_width: int = 16) -> str:
    """A small probe file (tanh MLP on digits, SGD) for sweep, report and demo tests."""
    import json

    return f"""
[probe]
name = "{name}"
[model]
factory = "mlp"
kwargs = {{ depth = 1, in_features = 64, out_features = 10, activation = "tanh" }}
widths = {json.dumps(list(widths))}
base_width = {base_width}
[train]
parameterizations = {json.dumps(list(parameterizations))}
optimizers = ["sgd"]
lrs = {json.dumps(list(lrs))}
steps = {steps}
data = "digits"
[capture]
every = {every}
probe_size = 64
[measure]
quantities = {json.dumps(list(quantities))}
k = 1
"""


class Dense(ss.SymmetricOperator):
    """A dense symmetric matrix as an operator (synthetic spectra)."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A = A

    def _matvec(self, v):
        return self.A @ v


def with_spectrum(eigs, seed: int = 0, dtype: torch.dtype = torch.float64) -> Dense:
    """A random orthogonal similarity of ``diag(eigs)`` (symmetrised), as a :class:`Dense` operator."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64)) @ Q.T
    return Dense(((A + A.T) / 2).to(dtype))


def sweep_runs(tmp_path, name: str, **kwargs):
    """Run a small probe (:func:`probe_text`) into ``tmp_path/name``; its run files."""
    from sharpscope.sweep import run_sweep

    probe = tmp_path / f"{name}.toml"
    probe.write_text(probe_text(name, **kwargs))
    return run_sweep(probe, tmp_path / name, progress=False).runs


def report_metrics(tmp_path, runs, sub="r"):
    """Write the report over ``runs`` into ``tmp_path/sub``; its metrics.json."""
    import json

    from sharpscope.analysis.report import write_report

    write_report(runs, tmp_path / sub)
    return json.loads((tmp_path / sub / "metrics.json").read_text())


def operator_and_dense(kind: str, model_kind: str, seed: int, dtype=torch.float64):
    """The Hessian, GGN or NTK operator of a test model on its data (in ``dtype``) and its dense float64 matrix."""
    model = MODELS[model_kind](seed).to(dtype)
    x, y = make_data(model_kind, seed)
    x = x.to(dtype)
    ref_model, ce = MODELS[model_kind](seed), nn.CrossEntropyLoss()
    if kind == "hessian":
        return ss.hessian_operator(model, ce, (x, y)), ss.dense_hessian(ref_model, ce, make_data(model_kind, seed))
    if kind == "ggn":
        return ss.ggn_operator(model, ce, (x, y)), ss.dense_ggn(ref_model, ce, make_data(model_kind, seed))
    J = ss.dense_jacobian(ref_model, make_data(model_kind, seed)[0])
    return ss.ntk_operator(model, x), J @ J.T


def check_top_k(res, dense, k, rtol):
    """``res``'s top-k eigenvalues within ``rtol`` (relative to the largest) of ``dense``'s, all converged."""
    ref = torch.linalg.eigvalsh(dense).flip(0)[:k]
    rel = ((res.eigenvalues - ref).abs() / ref.abs().max()).max().item()
    assert rel <= rtol, f"relative error {rel:.2e} > {rtol:.0e}: {res.eigenvalues} vs {ref}"
    assert res.all_converged


class OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward cannot be differentiated again: double backward silently misses its terms."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class CustomTanh(nn.Module):
    """tanh as a custom ``autograd.Function`` with a ``@once_differentiable`` backward."""

    def forward(self, x):
        return OnceDifferentiableTanh.apply(x)


def assert_hvp_matches_central_differences(H, v: torch.Tensor, h: float = 1e-5, rtol: float = 1e-7) -> None:
    """``H v`` against central differences of ``H.gradient()`` along ``v`` (the parameters written in
    place and restored): a reference with no second-order autodiff path."""
    theta = H.fn.flat_params()

    def grad_at(flat):
        with torch.no_grad():
            for p, t in zip(H.fn.params, H.fn.unflatten(flat)):
                p.copy_(t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the math-SDPA fallback notice
            return H.gradient()

    fd = (grad_at(theta + h * v) - grad_at(theta - h * v)) / (2 * h)
    grad_at(theta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        hv = H.matvec(v)
    assert (hv - fd).norm() <= rtol * hv.norm()


def recorder_setup(seed: int = 0, optimizer: str = "adam"):
    """A small MLP with BatchNorm, its optimizer (``adam``, ``sgd`` with momentum, ``adafactor``) and one
    batch: the Recorder and run-file tests' training loop."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
    opt = {"adam": lambda: torch.optim.Adam(model.parameters(), lr=1e-2),
           "sgd": lambda: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
           "adafactor": lambda: torch.optim.Adafactor(model.parameters(), lr=1e-2)}[optimizer]()
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    return model, opt, (x, y)


def train_step(model, opt, data):
    """One cross-entropy step; returns the loss."""
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(data[0]), data[1])
    loss.backward()
    opt.step()
    return loss
