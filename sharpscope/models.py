r"""Width/depth-scalable model families: MLP, CNN, a pre-LN Transformer decoder and a Mixture-of-Experts.

Plain ``nn.Module`` s with a ``width`` and a ``depth`` knob. Every family:

* stores its JSON-able constructor arguments in ``.config`` and is rebuilt from the factory string
  ``"sharpscope.models:<Class>"`` plus those kwargs (:func:`build_model`; no pickle);
* has ``with_width(w)`` / ``with_depth(L)`` (same architecture, other size), which
  :func:`sharpscope.param.parametrize` uses to find which dimensions grow with width;
* exposes ``residual_branches()`` and a ``branch_multiplier`` (1 by default; depth-muP sets
  :math:`(L/L_0)^{-1/2}`, Bordelon et al. 2023, Yang et al. 2023), ``coord_layers()`` (the layers a
  coord check follows) and ``example_batch(batch_size, generator)`` (a synthetic classification or
  next-token batch, used by the coord check).

The Transformer's attention calls ``torch.nn.functional.scaled_dot_product_attention`` with an
explicit ``scale=`` (default :math:`1/\sqrt{d_{head}}`; muP's :math:`1/d` is set by ``parametrize``);
heads grow with width at a fixed head dimension unless ``heads=`` is given. The MoE layer routes each
token to its top-k of E experts (E and k fixed as width grows); it evaluates every expert densely
and combines them with the (mostly zero) gate matrix, which keeps the forward pass a fixed-shape
function (vmap- and double-backward-friendly) at E/k times the compute of sparse dispatch.
"""
from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 (torch's idiom)

__all__ = ["MLP", "CNN", "Transformer", "MoE", "MoELayer", "Router", "Expert", "CausalSelfAttention",
           "FAMILIES", "build_model", "resolve_factory"]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu, "identity": lambda x: x}


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _positive(**values: int) -> None:
    for key, value in values.items():
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


class _Scalable(nn.Module):
    """Shared plumbing: config, resizing, residual branches, factory string."""

    width: int
    depth: int
    branch_multiplier: float

    def _store(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        self.width, self.depth = int(config["width"]), int(config["depth"])
        self.branch_multiplier = 1.0

    @property
    def factory(self) -> str:
        return f"{__name__}:{type(self).__name__}"

    def with_width(self, width: int) -> "_Scalable":
        """The same architecture at another width (dimensions that grow: multiples of ``width``)."""
        return type(self)(**{**self.config, "width": width})

    def with_depth(self, depth: int) -> "_Scalable":
        return type(self)(**{**self.config, "depth": depth})

    def residual_branches(self) -> list[nn.Module]:
        """Modules whose outputs are added to the residual stream (empty unless residual)."""
        return []

    def auxiliary_loss(self) -> torch.Tensor:
        """Extra training loss from the last forward pass (MoE load balancing); zero otherwise."""
        p = next(self.parameters())
        return p.new_zeros(())

    def _branch(self, h: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        return h + self.branch_multiplier * update


class MLP(_Scalable):
    r"""in_features -> width -> (depth x width->width) -> out_features; optionally residual.

    Forward: :math:`h_0 = W_{in} x`; :math:`h_{l} = h_{l-1} + s\, W_l \phi(h_{l-1})` (residual, s =
    ``branch_multiplier``) or :math:`h_l = W_l \phi(h_{l-1})`; output :math:`W_{out} \phi(h_L)`.
    """

    def __init__(self, width: int = 64, depth: int = 2, in_features: int = 8, out_features: int = 4,
                 residual: bool = False, activation: str = "relu", bias: bool = True) -> None:
        super().__init__()
        _positive(width=width, in_features=in_features, out_features=out_features)
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self._store(dict(width=width, depth=depth, in_features=in_features, out_features=out_features,
                         residual=residual, activation=activation, bias=bias))
        self.act = _activation(activation)
        self.input = nn.Linear(in_features, width, bias=bias)
        self.hidden = nn.ModuleList(nn.Linear(width, width, bias=bias) for _ in range(depth))
        self.readout = nn.Linear(width, out_features, bias=bias)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input(x)
        for layer in self.hidden:
            h = self._branch(h, layer(self.act(h))) if self.residual else layer(self.act(h))
        return self.readout(self.act(h))

    def residual_branches(self) -> list[nn.Module]:
        return list(self.hidden) if self.residual else []

    def coord_layers(self) -> dict[str, nn.Module]:
        return {"input": self.input, **{f"hidden.{i}": m for i, m in enumerate(self.hidden)}, "output": self.readout}

    def example_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch_size, self.config["in_features"], generator=generator)
        return x, torch.randint(0, self.config["out_features"], (batch_size,), generator=generator)


class CNN(_Scalable):
    r"""Conv net, width = channels: conv(in->width), depth x conv(width->width), global average pool, linear.

    Optionally residual (:math:`h + s\, \mathrm{conv}(\phi(h))`). Inputs (B, in_channels, H, W).
    """

    def __init__(self, width: int = 16, depth: int = 2, in_channels: int = 1, num_classes: int = 4,
                 image_size: int = 8, kernel_size: int = 3, residual: bool = False, activation: str = "relu",
                 bias: bool = True) -> None:
        super().__init__()
        _positive(width=width, in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                  kernel_size=kernel_size)
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self._store(dict(width=width, depth=depth, in_channels=in_channels, num_classes=num_classes,
                         image_size=image_size, kernel_size=kernel_size, residual=residual,
                         activation=activation, bias=bias))
        pad = kernel_size // 2
        self.act = _activation(activation)
        self.input = nn.Conv2d(in_channels, width, kernel_size, padding=pad, bias=bias)
        self.hidden = nn.ModuleList(nn.Conv2d(width, width, kernel_size, padding=pad, bias=bias)
                                    for _ in range(depth))
        self.readout = nn.Linear(width, num_classes, bias=bias)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input(x)
        for layer in self.hidden:
            h = self._branch(h, layer(self.act(h))) if self.residual else layer(self.act(h))
        return self.readout(self.act(h).mean(dim=(-2, -1)))

    def residual_branches(self) -> list[nn.Module]:
        return list(self.hidden) if self.residual else []

    def coord_layers(self) -> dict[str, nn.Module]:
        return {"input": self.input, **{f"hidden.{i}": m for i, m in enumerate(self.hidden)}, "output": self.readout}

    def example_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        c, s = self.config["in_channels"], self.config["image_size"]
        x = torch.randn(batch_size, c, s, s, generator=generator)
        return x, torch.randint(0, self.config["num_classes"], (batch_size,), generator=generator)


class CausalSelfAttention(nn.Module):
    r"""Multi-head causal self-attention through SDPA with an explicit logit scale.

    ``logit_scale`` defaults to :math:`1/\sqrt{d_{head}}` (SP); muP uses :math:`\sqrt{d_0}/d_{head}`
    (Yang et al. 2022, Tensor Programs V, Sec. 6: attention :math:`q^\top k / d`), set through
    :meth:`set_logit_scale` by :func:`sharpscope.param.parametrize`.
    """

    def __init__(self, width: int, heads: int, bias: bool = True) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads={heads}")
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        self.logit_scale = 1.0 / math.sqrt(self.head_dim)

    def set_logit_scale(self, scale: float) -> None:
        self.logit_scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.reshape(b, t, self.heads, self.head_dim).transpose(1, 2) for z in self.qkv(x).split(c, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.logit_scale)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class _FeedForward(nn.Module):
    def __init__(self, width: int, ratio: int, activation: str, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, ratio * width, bias=bias)
        self.fc2 = nn.Linear(ratio * width, width, bias=bias)
        self.act = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Expert(_FeedForward):
    """One expert: width -> ratio*width -> width (both matrices are hidden-role under muP)."""


class Router(nn.Linear):
    """An MoE router, width -> num_experts (readout-role under muP); tagged for role inference."""

    sharpscope_role = "router"


class _AddAuxiliaryGradient(torch.autograd.Function):
    """Identity on ``x`` whose backward also sends gradient 1 into ``aux``: the loss's gradient then
    includes the gradient of aux without the training loop adding aux to its loss (the device of
    DeepSeek-MoE's ``AddAuxiliaryLoss``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


AUX_LOSS_MODES = ("loop", "backward")


class MoELayer(nn.Module):
    r"""Top-k Mixture-of-Experts feed-forward layer (Shazeer et al. 2017; Switch/GShard-style balancing).

    Gates: :math:`p = \mathrm{softmax}(R h)`, keep the top-k, renormalize; output
    :math:`\sum_e g_e\, \mathrm{expert}_e(h)`. Load-balancing loss (Fedus et al. 2022, Switch
    Transformer): :math:`E \sum_e f_e P_e`, :math:`f_e` = fraction of top-k slots routed to e,
    :math:`P_e` = mean router probability; kept in ``last_aux_loss`` after each forward.
    ``aux_in_backward`` > 0 adds that weight times the balance loss's gradient to every backward pass in
    training mode (the forward output and the loss value are unchanged; in eval mode, where curvature
    is measured, nothing is added), so any training loop balances the experts.
    """

    def __init__(self, width: int, num_experts: int = 4, top_k: int = 2, expert_ratio: int = 2,
                 activation: str = "relu", bias: bool = True, aux_in_backward: float = 0.0) -> None:
        super().__init__()
        _positive(num_experts=num_experts, top_k=top_k, expert_ratio=expert_ratio)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
        if not aux_in_backward >= 0:
            raise ValueError(f"aux_in_backward must be >= 0, got {aux_in_backward}")
        self.aux_in_backward = float(aux_in_backward)
        self.num_experts, self.top_k = num_experts, top_k
        self.router = Router(width, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(width, expert_ratio, activation, bias) for _ in range(num_experts))
        self.last_aux_loss: torch.Tensor | None = None

    def gates(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate matrix (N, E) with k nonzeros per row, router probabilities (N, E)) for flat tokens h."""
        probs = torch.softmax(self.router(h), dim=-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        return gates, probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, x.shape[-1])
        gates, probs = self.gates(h)
        outs = torch.stack([expert(h) for expert in self.experts], dim=1)    # (N, E, width)
        chosen = (gates > 0).to(probs.dtype)
        self.last_aux_loss = self.num_experts * (chosen.mean(0) / self.top_k * probs.mean(0)).sum()
        out = (gates.unsqueeze(-1) * outs).sum(1)
        if self.aux_in_backward and self.training and torch.is_grad_enabled():
            out = _AddAuxiliaryGradient.apply(out, self.aux_in_backward * self.last_aux_loss)
        return out.reshape(x.shape)


class _MoEMixin:
    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def auxiliary_loss(self) -> torch.Tensor:
        weight = float(self.config.get("aux_loss_weight", 0.0))
        if self.config.get("aux_loss_mode", "loop") == "backward":   # already in every backward pass
            return next(self.parameters()).new_zeros(())
        losses = [m.last_aux_loss for m in self.moe_layers() if m.last_aux_loss is not None]
        if weight == 0.0 or not losses:
            return next(self.parameters()).new_zeros(())
        return weight * torch.stack(losses).sum()


class MoE(_MoEMixin, _Scalable):
    """in_features -> width -> depth residual MoE blocks (h + s * MoE(h)) -> out_features.

    E = ``num_experts`` and k = ``top_k`` stay fixed as width grows (the setting of Małaśnicki et al.
    2025); ``aux_loss_weight`` scales the load-balancing loss: returned by :meth:`auxiliary_loss` for the
    training loop to add (``aux_loss_mode="loop"``), or added to every training-mode backward pass by the
    layers themselves (``"backward"``: any loop, e.g. a sweep's, balances; :meth:`auxiliary_loss` is 0).
    Active parameters per token are fixed by k and ``expert_ratio``; ``num_experts`` only adds experts
    (the sparsity axis of Abnar et al. 2025).
    """

    def __init__(self, width: int = 64, depth: int = 1, in_features: int = 8, out_features: int = 4,
                 num_experts: int = 4, top_k: int = 2, expert_ratio: int = 2, aux_loss_weight: float = 0.0,
                 activation: str = "relu", bias: bool = True, aux_loss_mode: str = "loop") -> None:
        super().__init__()
        _positive(width=width, depth=depth, in_features=in_features, out_features=out_features)
        if aux_loss_mode not in AUX_LOSS_MODES:
            raise ValueError(f"unknown aux_loss_mode {aux_loss_mode!r}; choose one of {', '.join(AUX_LOSS_MODES)}")
        self._store(dict(width=width, depth=depth, in_features=in_features, out_features=out_features,
                         num_experts=num_experts, top_k=top_k, expert_ratio=expert_ratio,
                         aux_loss_weight=aux_loss_weight, activation=activation, bias=bias,
                         aux_loss_mode=aux_loss_mode))
        self.act = _activation(activation)
        self.input = nn.Linear(in_features, width, bias=bias)
        in_backward = float(aux_loss_weight) if aux_loss_mode == "backward" else 0.0
        self.blocks = nn.ModuleList(MoELayer(width, num_experts, top_k, expert_ratio, activation, bias, in_backward)
                                    for _ in range(depth))
        self.readout = nn.Linear(width, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input(x)
        for block in self.blocks:
            h = self._branch(h, block(h))
        return self.readout(self.act(h))

    def residual_branches(self) -> list[nn.Module]:
        return list(self.blocks)

    def coord_layers(self) -> dict[str, nn.Module]:
        layers: dict[str, nn.Module] = {"input": self.input}
        for i, block in enumerate(self.blocks):
            layers[f"blocks.{i}.router"] = block.router
            layers[f"blocks.{i}.moe"] = block
        return {**layers, "output": self.readout}

    def example_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch_size, self.config["in_features"], generator=generator)
        return x, torch.randint(0, self.config["out_features"], (batch_size,), generator=generator)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int, num_experts: int, top_k: int,
                 activation: str, bias: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, bias)
        self.mlp = (MoELayer(width, num_experts, top_k, mlp_ratio, activation, bias) if num_experts
                    else _FeedForward(width, mlp_ratio, activation, bias))


class Transformer(_MoEMixin, _Scalable):
    r"""A small pre-LN decoder-only Transformer language model, width = d_model.

    Token + learned position embeddings, ``depth`` blocks :math:`x + s\,\mathrm{attn}(\mathrm{LN}(x))`,
    :math:`x + s\,\mathrm{mlp}(\mathrm{LN}(x))`, final LN, untied readout to the vocabulary. Heads =
    width / ``head_dim`` (the head dimension stays fixed as width grows) unless ``heads`` is given (then
    the head dimension grows and the muP 1/d logit scale matters). ``num_experts > 0`` replaces each
    MLP by a top-k :class:`MoELayer`. Inputs: token ids (B, T) with T <= ``max_len``; output logits (B, T, vocab).
    """

    def __init__(self, width: int = 64, depth: int = 2, vocab_size: int = 32, max_len: int = 16,
                 head_dim: int = 16, heads: int | None = None, mlp_ratio: int = 4, num_experts: int = 0,
                 top_k: int = 2, aux_loss_weight: float = 0.0, activation: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        _positive(width=width, depth=depth, vocab_size=vocab_size, max_len=max_len, mlp_ratio=mlp_ratio)
        n_heads = heads if heads is not None else width // head_dim
        if heads is None and (width % head_dim or n_heads == 0):
            raise ValueError(f"width {width} must be a positive multiple of head_dim={head_dim}")
        self._store(dict(width=width, depth=depth, vocab_size=vocab_size, max_len=max_len, head_dim=head_dim,
                         heads=heads, mlp_ratio=mlp_ratio, num_experts=num_experts, top_k=top_k,
                         aux_loss_weight=aux_loss_weight, activation=activation, bias=bias))
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(_Block(width, n_heads, mlp_ratio, num_experts, top_k, activation, bias)
                                    for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.readout = nn.Linear(width, vocab_size, bias=bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[-1]
        if t > self.config["max_len"]:
            raise ValueError(f"sequence length {t} exceeds max_len={self.config['max_len']}")
        h = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            h = self._branch(h, block.attn(block.ln1(h)))
            h = self._branch(h, block.mlp(block.ln2(h)))
        return self.readout(self.ln_f(h))

    def residual_branches(self) -> list[nn.Module]:
        return [m for block in self.blocks for m in (block.attn, block.mlp)]

    def coord_layers(self) -> dict[str, nn.Module]:
        layers: dict[str, nn.Module] = {"tok_emb": self.tok_emb}
        for i, block in enumerate(self.blocks):
            layers[f"blocks.{i}.attn"] = block.attn
            layers[f"blocks.{i}.mlp"] = block.mlp
        return {**layers, "output": self.readout}

    def example_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random token sequences and their next-token targets (length max_len)."""
        seq = torch.randint(0, self.config["vocab_size"], (batch_size, self.config["max_len"] + 1), generator=generator)
        return seq[:, :-1], seq[:, 1:]


FAMILIES: dict[str, type[_Scalable]] = {"mlp": MLP, "cnn": CNN, "transformer": Transformer, "moe": MoE}


def resolve_factory(spec: str) -> Callable[..., Any]:
    """``"package.module:attr"`` (or a family name: ``"mlp"``, ``"cnn"``, ``"transformer"``, ``"moe"``) -> callable."""
    if isinstance(spec, str) and spec.lower() in FAMILIES:
        return FAMILIES[spec.lower()]
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"a model factory is 'module:function' or one of {', '.join(FAMILIES)}, got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import {module_name!r} for factory {spec!r}: {err}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (factory {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"factory {spec!r} is not callable")
    return obj


def build_model(factory: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a model from a ``"module:function"`` factory and JSON kwargs (importlib, no pickle).

    >>> build_model("sharpscope.models:MLP", {"width": 32}).width
    32
    """
    kwargs = dict(kwargs or {})
    try:
        model = resolve_factory(factory)(**kwargs)
    except TypeError as err:
        raise ValueError(f"factory {factory!r} rejected kwargs {sorted(kwargs)}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"factory {factory!r} returned {type(model).__name__}, not an nn.Module")
    return model
