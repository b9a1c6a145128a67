r"""Per-layer alignment between a layer's weights (or their change since initialization) and its inputs.

Everett et al. 2024 ("Scaling Exponents Across Parameterizations and Optimizers", arXiv 2407.05872,
the section on alignment) show that which learning-rate exponents hold depends on how a layer's
update :math:`\Delta W` lines up with the activations :math:`x` it multiplies: the product
:math:`\Delta W x` sums fan-in :math:`d` terms, which add up like :math:`\sqrt d` when they are
uncorrelated (no alignment: the central limit theorem) and like :math:`d` when every term has the
same sign (full alignment: the law of large numbers, the Cauchy-Schwarz bound). The paper measures
a log-alignment ratio of this kind per layer; only its abstract and summaries could be read here, so
the normalisation below is sharpscope's (0 = none, 1 = full), not a copy of the paper's.

For a weight-like layer (``nn.Linear``, ``nn.Conv1d/2d`` without groups, Hugging Face's ``Conv1D``)
with *effective* weight matrix :math:`U` (``out x d``: ``module.weight`` as the forward pass uses it,
i.e. the parameterization's multiplier :math:`m^{-a}` times the stored tensor; a convolution's
kernel flattened to ``out x (C_in k)``), and the layer's inputs :math:`x_s \in \mathbb R^d`
(``s`` over the samples of the stored batch; for a convolution every patch; for a sequence every
position), captured by forward hooks on the stored batch:

.. math::

    M &= \Big(\tfrac{1}{S\,\text{out}}\sum_{s,i} (U_i \cdot x_s)^2\Big)^{1/2}
        &&\text{(measured: RMS of } U x \text{ over samples and outputs)}\\
    N &= \Big(\tfrac{1}{\text{out}}\sum_{i,j} U_{ij}^2\, \overline{x_j^2}\Big)^{1/2}
        &&\text{(no alignment: } \mathbb E\,M^2 \text{ when the signs of } U \text{ are random)}\\
    F &= \Big(\tfrac{1}{\text{out}}\sum_i \|U_i\|^2 \cdot \tfrac1S \sum_s \|x_s\|^2\Big)^{1/2}
        &&\text{(full alignment: the Cauchy-Schwarz bound } |U_i\cdot x_s| \le \|U_i\|\,\|x_s\|)\\
    \text{alignment} &= \frac{\log (M/N)}{\log (F/N)}

with :math:`\overline{x_j^2} = \frac1S\sum_s x_{sj}^2`. When every input coordinate has the same
mean square, :math:`N = \mathrm{RMS}(U)\,\mathrm{RMS}(x)\sqrt d` and
:math:`F = \mathrm{RMS}(U)\,\mathrm{RMS}(x)\, d`, so the denominator is :math:`\log\sqrt d`. In general
:math:`(F/N)^2 = (\sum_j c_j)(\sum_j \overline{x_j^2}) / \sum_j c_j \overline{x_j^2}` (:math:`c_j` the squared
norm of U's column j) is an effective fan-in: d when either factor is spread evenly over the
coordinates, less when both concentrate on the same ones (an SGD update has zero columns where the
inputs are always zero, e.g. blank pixels, and those then do not count). Values are **not
clipped**: :math:`M \le F` always, so alignment <= 1, and 1 means every output is at the
Cauchy-Schwarz bound; a value below 0 means :math:`U x` is *smaller* than for random signs
(anti-aligned: U's rows avoid the directions the inputs occupy). Undefined (NaN) where
:math:`U = 0` (the update at step 0) or :math:`F/N < 1.01` (an effective fan-in of about 1).

Both the update :math:`U = \Delta W = W_t - W_0` (effective weights at step t minus those of the step-0
checkpoint, multiplying the current inputs :math:`x_t`: the :math:`\Delta W x` term of the paper's
decomposition of a layer's output) and the parameters themselves (:math:`U = W_t`) are measured.

Across widths the ratio :math:`R = M / (\mathrm{RMS}(U)\,\mathrm{RMS}(x)) = d\,M/F` grows like
:math:`d^{\alpha}` with :math:`\alpha = 1/2` (none) .. 1 (full); dividing by the entry scales removes
the parameterization's multiplier and the lr's width scaling, so the exponent fitted by
:func:`sharpscope.analysis.alignment.fit_exponents` is that of the alignment alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .functional import deterministic_mode, running_stats_kept

__all__ = ["AlignmentTerms", "LayerAlignment", "alignment_terms", "layer_alignment", "MIN_SPREAD"]

MIN_SPREAD = 1.01  # F/N below this (an effective fan-in below ~1.02): alignment is undefined
_CHUNK = 1 << 24  # entries of one block of rows (x U^T) in float64: 128 MiB


@dataclass(frozen=True)
class AlignmentTerms:
    """M, N, F of one matrix against one set of inputs (module docstring), with the entry scales."""

    measured: float
    none: float
    full: float
    rms_u: float
    rms_x: float
    fan_in: int

    @property
    def alignment(self) -> float:
        """log(M/N) / log(F/N): 0 none, 1 full; NaN where undefined (U = 0, or F/N < MIN_SPREAD)."""
        if not (self.measured > 0 and self.none > 0 and self.full >= MIN_SPREAD * self.none):
            return float("nan")
        return math.log(self.measured / self.none) / math.log(self.full / self.none)

    @property
    def ratio(self) -> float:
        """M / (RMS(U) RMS(x)): grows like fan-in^(1/2) (none) .. fan-in (full)."""
        scale = self.rms_u * self.rms_x
        return self.measured / scale if scale > 0 else float("nan")


@dataclass(frozen=True)
class LayerAlignment:
    """One layer: its name, fan-in, the update's terms (None without a reference) and the weights'."""

    name: str
    fan_in: int
    update: AlignmentTerms | None
    params: AlignmentTerms


def alignment_terms(U: torch.Tensor, X: torch.Tensor) -> AlignmentTerms:
    """M, N, F (module docstring) of ``U`` (``out x d``) on the rows of ``X`` (``S x d``), in float64."""
    if U.ndim != 2 or X.ndim != 2 or U.shape[1] != X.shape[1]:
        raise ValueError(f"alignment needs U (out x d) and X (samples x d) with the same d, got "
                         f"{tuple(U.shape)} and {tuple(X.shape)}")
    U = U.detach().double()
    S, out, d = X.shape[0], U.shape[0], U.shape[1]
    ux_sq, x_sq = 0.0, torch.zeros(d, dtype=torch.float64, device=U.device)
    for rows in X.detach().split(max(1, _CHUNK // max(out, d))):  # S x out products in bounded memory
        rows = rows.to(U.device, torch.float64)
        ux_sq += float(((rows @ U.T) ** 2).sum())
        x_sq += (rows ** 2).sum(dim=0)
    x_sq = x_sq / S                                   # mean square of each input coordinate
    measured = (ux_sq / (S * out)) ** 0.5
    none = float(((U ** 2) @ x_sq).sum().div(out).sqrt())
    full = float(((U ** 2).sum() / out * x_sq.sum()).sqrt())
    return AlignmentTerms(measured, none, full, float((U ** 2).mean().sqrt()), float((x_sq.mean()).sqrt()),
                          int(d))


# -- the layers we understand: their effective matrix and their inputs as rows -----------------------
def _as_matrix(module: nn.Module) -> torch.Tensor | None:
    """The effective weight as ``out x d`` (None for a layer this module does not handle)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        return module.weight.reshape(module.weight.shape[0], -1)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # Hugging Face: weight (in, out)
        return module.weight.T
    return None


def _input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of length fan-in (a convolution's patches, a sequence's positions)."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)  # (N, C, 1, L): a 2-D patch extraction with kernel (1, k)
        kernel, dil, pad, stride = (1, *module.kernel_size), (1, *module.dilation), (0, *module.padding), \
            (1, *module.stride)
    elif isinstance(module, nn.Conv2d):
        kernel, dil, pad, stride = module.kernel_size, module.dilation, module.padding, module.stride
    else:
        return x.reshape(-1, x.shape[-1])
    if x.ndim == 3:  # an unbatched image
        x = x.unsqueeze(0)
    patches = nn.functional.unfold(x, kernel, dilation=dil, padding=pad, stride=stride)  # (N, C k, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _inputs_of(model: nn.Module, inputs: Any, batchnorm: str) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Every handled layer's input on ``inputs`` (one forward pass; dropout off, BatchNorm per
    ``batchnorm``, its running statistics restored afterwards). Layers the forward pass does not call
    (e.g. ``nn.MultiheadAttention``'s ``out_proj``) are absent."""
    captured: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if _as_matrix(module) is not None:
            def hook(mod, args, _name=name):
                if args and torch.is_tensor(args[0]):  # a layer called twice: its inputs of both calls
                    rows = _input_rows(mod, args[0].detach())
                    seen = captured.get(_name)
                    captured[_name] = (mod, rows if seen is None else torch.cat([seen[1], rows]))
            handles.append(module.register_forward_pre_hook(hook))
    try:
        with deterministic_mode(model, batchnorm), running_stats_kept(model), torch.no_grad():
            model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    finally:
        for h in handles:
            h.remove()
    return captured


def layer_alignment(model: nn.Module, inputs: Any, reference: nn.Module | Mapping[str, torch.Tensor] | None = None,
                    *, batchnorm: str = "batch") -> list[LayerAlignment]:
    """Alignment of each handled layer's effective weights (and, given ``reference``, of their change
    since it) with the layer's inputs on ``inputs``, in model order (module docstring).

    ``reference``: the same model at step 0 (its effective weights are read by module name) or a
    mapping ``{layer name: effective weight}``. Layers whose forward pass is not called are skipped.
    """
    if isinstance(reference, nn.Module):
        reference = {name: w.detach() for name, module in reference.named_modules()
                     if (w := _as_matrix(module)) is not None}
    captured = _inputs_of(model, inputs, batchnorm)
    if not captured:
        raise ValueError(f"{type(model).__name__} has no layer alignment can measure (nn.Linear, nn.Conv1d/2d "
                         "without groups, Hugging Face Conv1D) called by its forward pass")
    out = []
    for name, (module, X) in captured.items():
        with torch.no_grad():
            W = _as_matrix(module).detach()
            update = None
            if reference is not None:
                if name not in reference or tuple(reference[name].shape) != tuple(W.shape):
                    raise ValueError(f"the reference model has no layer {name!r} of shape {tuple(W.shape)}: "
                                     "it is not the same model")
                update = alignment_terms(W - reference[name].to(W.device, W.dtype), X)
            out.append(LayerAlignment(name, int(W.shape[1]), update, alignment_terms(W, X)))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(out, key=lambda la: order[la.name])
