"""A model as a deterministic function of a chosen subset of its parameters, and its data.

Everything the curvature operators and the dense references share: which tensors are the
variables (all trainable parameters by default, or a named subset), how a flat vector maps onto
them, how batches are read and weighted, and the deterministic mode in which curvature is measured:

* dropout (and anything else keyed on ``module.training``) is off: the model runs in ``eval()``
  (with ``nn.MultiheadAttention``'s inference fast path disabled: it is not differentiable correctly);
* BatchNorm, with ``batchnorm="batch"`` (default), normalizes with the batch's own statistics -- the
  training loss the optimizer sees -- and its running statistics are *not* updated (the forward
  pass receives throw-away copies of those buffers); with ``batchnorm="eval"`` it uses the stored
  running statistics (the test-time function).

The model's ``training`` flags are restored after every product.

Live models change (optimizer steps, ``model.half()``, a swapped Parameter): :meth:`ModelFunction.fingerprint`
reads, cheaply, everything the function's value depends on -- each parameter's identity, version
counter, storage, dtype, device and ``requires_grad``, the buffers the forward pass reads and the
training flags -- so that operators can tell when they are stale (:mod:`sharpscope.operators`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["ModelFunction", "Batch", "as_batches", "Fingerprint", "describe_change", "deterministic_mode", "running_stats_kept"]

BatchNormMode = Literal["batch", "eval"]
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class Batch:
    """One batch: positional model inputs, targets (or None) and its sample count."""

    inputs: tuple[torch.Tensor, ...]
    targets: Any
    size: int


def _to(x: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    if isinstance(x, torch.Tensor):
        if dtype is not None and x.is_floating_point():
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(t, device, dtype) for t in x)
    if isinstance(x, Mapping):
        return {k: _to(v, device, dtype) for k, v in x.items()}
    return x


_CRITERION = ("a loss closure, not a criterion of (outputs, targets): pass ss.batch_loss(lambda model, batch: "
              "model(**batch).loss, weight=...) as the loss (sharpscope.hf.causal_lm_loss() for a causal LM)")
_INPUTS = ("the model's outputs as a function of the batch: pass ss.batch_loss(outputs=lambda model, batch: ..., "
           "loss_of_outputs=...) before the data (sharpscope.hf.causal_lm_loss() for a causal LM)")


def mapping_batch_error(batch: Mapping, needs: str = _CRITERION) -> ValueError:
    """The one-line refusal of a Mapping batch given without a loss closure."""
    keys = ", ".join(map(str, list(batch)[:5])) + (", ..." if len(batch) > 5 else "")
    return ValueError(f"a Mapping batch (keys {keys}) needs {needs}")


def _make_batch(inputs: Any, targets: Any, device: torch.device, dtype: torch.dtype | None) -> Batch:
    inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    if not inputs or not isinstance(inputs[0], torch.Tensor):
        raise TypeError("a batch's inputs must be a tensor or a tuple of tensors")
    size = int(inputs[0].shape[0]) if inputs[0].ndim > 0 else 1
    if size == 0:
        raise ValueError("empty batch: inputs have 0 samples")
    if isinstance(targets, torch.Tensor) and targets.ndim > 0 and targets.shape[0] != size:
        raise ValueError(f"mismatched batch: inputs have {size} samples but targets have {targets.shape[0]}")
    return Batch(tuple(_to(t, device, dtype) for t in inputs), _to(targets, device, dtype), size)


def _is_single_batch(data: Any) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[0], (torch.Tensor, tuple, list))
            and (isinstance(data[1], torch.Tensor) or data[1] is None))


class as_batches:  # noqa: N801 - used like a function (as_batches(data, device)), named like one
    """A re-iterable view of ``data`` as :class:`Batch` objects on ``device``.

    ``data`` is one ``(inputs, targets)`` pair, a sequence of such pairs, or a re-iterable loader
    (a :class:`torch.utils.data.DataLoader` with a fixed order). A one-shot iterator is read once and
    kept in memory. A shuffled DataLoader is refused: the operator would change between products.
    """

    def __init__(self, data: Any, device: torch.device, dtype: torch.dtype | None = None,
                 with_targets: bool = True) -> None:
        self.device, self.dtype, self.with_targets = device, dtype, with_targets
        if data is None:
            raise ValueError("no data: pass an (inputs, targets) batch or an iterable of batches")
        if isinstance(data, Mapping):
            raise mapping_batch_error(data, _CRITERION if with_targets else _INPUTS)
        if not with_targets and isinstance(data, torch.Tensor):
            self._source: Any = [data]
        elif with_targets and _is_single_batch(data):
            self._source = [data]
        else:
            _check_fixed_order(data)
            if iter(data) is data:  # one-shot iterator: keep what it yields
                data = list(data)
            if isinstance(data, (tuple, list)) and data and isinstance(data[0], Mapping):
                raise mapping_batch_error(data[0], _CRITERION if with_targets else _INPUTS)
            self._source = data

    def __iter__(self) -> Iterator[Batch]:
        count = 0
        for item in self._source:
            if isinstance(item, Mapping):
                raise mapping_batch_error(item, _CRITERION if self.with_targets else _INPUTS)
            if self.with_targets:
                if not (isinstance(item, (tuple, list)) and len(item) == 2):
                    raise TypeError("each batch must be an (inputs, targets) pair, got "
                                    f"{type(item).__name__}")
                batch = _make_batch(item[0], item[1], self.device, self.dtype)
            else:
                batch = _make_batch(item, None, self.device, self.dtype)
            count += 1
            yield batch
        if count == 0:
            raise ValueError("empty data: the iterable yielded no batches")

    def total_size(self) -> int:
        return sum(b.size for b in self)


def _check_fixed_order(data: Any) -> None:
    """Refuse a DataLoader whose batches come in a random order (any sampler but a sequential one)."""
    if not isinstance(data, torch.utils.data.DataLoader):
        return
    sampler = data.batch_sampler.sampler if data.batch_sampler is not None else data.sampler
    if isinstance(sampler, torch.utils.data.RandomSampler):
        raise ValueError("the DataLoader shuffles (shuffle=True): curvature needs a fixed data order; "
                         "pass a DataLoader with shuffle=False")
    iterable = isinstance(data.dataset, torch.utils.data.IterableDataset)
    if not iterable and not isinstance(sampler, torch.utils.data.SequentialSampler):
        raise ValueError(f"the DataLoader draws its batches with a {type(sampler).__name__}: curvature needs a "
                         "fixed data order (batches differ between products, e.g. under BatchNorm); pass a "
                         "DataLoader with a sequential sampler (shuffle=False, no sampler=)")


def _select(model: nn.Module, params: Sequence[str] | str | None) -> list[tuple[str, nn.Parameter]]:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all have requires_grad=False)")
    if params is None:
        return trainable
    wanted = [params] if isinstance(params, str) else list(params)
    if not wanted:
        raise ValueError("params=[] selects no parameter: give parameter names or module prefixes, or None for "
                         "all trainable parameters")
    chosen, unmatched = [], []
    for key in wanted:
        hits = [(n, p) for n, p in trainable if n == key or n.startswith(key + ".")]
        if not hits:
            unmatched.append(key)
        chosen.extend(h for h in hits if h[0] not in {c[0] for c in chosen})
    if unmatched:
        names = ", ".join(n for n, _ in trainable[:8]) + (", ..." if len(trainable) > 8 else "")
        raise ValueError(f"no trainable parameter matches {unmatched}; trainable parameters are: {names}")
    return chosen


@contextlib.contextmanager
def deterministic_mode(model: nn.Module, batchnorm: str) -> Iterator[None]:
    """Dropout off (``eval()``); BatchNorm in training mode (batch statistics) for ``batchnorm="batch"``,
    in eval mode for ``"eval"``; the modules' flags restored on exit."""
    flags = [(m, m.training) for m in model.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # nn.MultiheadAttention's inference fast path (taken in eval mode when no input requires
        # grad, as under forward-mode AD) has wrong forward-mode derivatives: keep it off
        torch.backends.mha.set_fastpath_enabled(False)
        model.eval()
        if batchnorm == "batch":
            for m in model.modules():
                if isinstance(m, _BN_TYPES):
                    m.train()
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def running_stats_kept(model: nn.Module) -> Iterator[None]:
    """BatchNorm's buffers (running statistics, batch counts) restored on exit: for a model's own forward
    pass in training-mode BatchNorm, which updates them."""
    buffers = [b for m in model.modules() if isinstance(m, _BN_TYPES) for b in m.buffers(recurse=False)]
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, kept in zip(buffers, saved):
                b.copy_(kept)


class ModelFunction:
    """``model`` as a pure function of the selected parameters, in a deterministic mode.

    Args:
        model: any ``nn.Module``; its parameters are read, never modified.
        params: names (or module prefixes, e.g. ``"layers.0"``) of the trainable parameters that are
            the variables; ``None`` for all trainable ones. Tied weights appear once.
        batchnorm: ``"batch"`` (batch statistics, running stats untouched) or ``"eval"``.
    """

    def __init__(self, model: nn.Module, params: Sequence[str] | str | None = None,
                 batchnorm: BatchNormMode = "batch", call: Callable[[nn.Module, Any], Any] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if batchnorm not in ("batch", "eval"):
            raise ValueError(f"batchnorm must be 'batch' or 'eval', got {batchnorm!r}")
        self.model, self.batchnorm, self.selection, self.call = model, batchnorm, params, call
        # a closure call(model, batch) is evaluated as the forward pass of a wrapper holding the model
        self._module = model if call is None else _Closure(model, call)
        self._prefix = "" if call is None else "model."
        selected = _select(model, params)
        self.names = [n for n, _ in selected]
        self.params = [p for _, p in selected]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dim = sum(self.numels)
        first = self.params[0]
        self.dtype, self.device = first.dtype, first.device
        for n, p in selected:
            if p.dtype != self.dtype or p.device != self.device:
                raise ValueError(f"parameter {n} is {p.dtype} on {p.device} but {self.names[0]} is "
                                 f"{self.dtype} on {self.device}: select parameters of one dtype/device")
            if not torch.isfinite(p).all():
                raise FloatingPointError(f"parameter {n} contains NaN or inf")
        chosen = set(self.names)
        # non-selected trainable parameters enter as constants
        self._constants = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
        self._bn_buffers = [f"{m}.{b}" if m else b for m, mod in model.named_modules()
                            if isinstance(mod, _BN_TYPES) for b, _ in mod.named_buffers(recurse=False)]

    def rebuilt(self) -> "ModelFunction":
        """The same selection on the model as it is now (after its parameters changed)."""
        return ModelFunction(self.model, self.selection, self.batchnorm, self.call)

    # -- flat vectors <-> parameter tuples -------------------------------------------------
    def unflatten(self, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of the flat vector ``v`` shaped like the selected parameters (no copy)."""
        return tuple(t.view(s) for t, s in zip(torch.split(v, self.numels), self.shapes))

    def flatten(self, ts: Iterable[torch.Tensor | None]) -> torch.Tensor:
        """Concatenate per-parameter tensors (``None`` read as zeros) into one flat vector."""
        parts = [torch.zeros(n, dtype=self.dtype, device=self.device) if t is None else t.reshape(-1)
                 for t, n in zip(ts, self.numels)]
        return torch.cat(parts)

    def flat_params(self) -> torch.Tensor:
        return self.flatten(p.detach() for p in self.params)

    # -- staleness -----------------------------------------------------------------------------
    def fingerprint(self) -> "Fingerprint":
        """What the function's value depends on, read without touching tensor data (no device sync):
        parameters (identity, version counter, storage, dtype, device, requires_grad), the buffers the
        forward pass reads (BatchNorm running statistics only with ``batchnorm="eval"``) and the
        modules' training flags."""
        params = tuple((n, id(p), p._version, p.data_ptr(), p.dtype, p.device, p.requires_grad)
                       for n, p in self.model.named_parameters())
        skip = set(self._bn_buffers) if self.batchnorm == "batch" else set()
        buffers = tuple((n, id(b), b._version, b.data_ptr(), b.dtype, b.device)
                        for n, b in self.model.named_buffers() if n not in skip)
        flags = tuple(m.training for m in self.model.modules())
        return Fingerprint(params, buffers, flags)

    def value_digest(self) -> torch.Tensor:
        """The values the fingerprint cannot see, summarized: per parameter and read buffer, the sum and the
        2-norm of its entries (accumulated in the tensor's dtype, float32 for 16-bit ones: deterministic for
        the same values, and one fast pass each; on the tensors' device). In-place writes through ``p.data``
        (weight clipping, EMA copies, ``.data.mul_``) change values without a version bump."""
        skip = set(self._bn_buffers) if self.batchnorm == "batch" else set()
        tensors = [p.detach() for _, p in self.model.named_parameters()]
        tensors += [b.detach() for n, b in self.model.named_buffers() if n not in skip]
        if not tensors:
            return torch.zeros(0, dtype=torch.float64)
        device = tensors[0].device
        parts = []
        for t in tensors:
            if not t.is_floating_point():
                t = t.to(torch.float64)
            elif t.element_size() < 4:
                t = t.to(torch.float32)
            parts.append(torch.stack([t.sum(), torch.linalg.vector_norm(t)]).to(device=device, dtype=torch.float64))
        return torch.cat(parts)

    # -- evaluation ---------------------------------------------------------------------------
    def deterministic(self) -> contextlib.AbstractContextManager:
        """Dropout off (``eval()``), BatchNorm per ``self.batchnorm``; flags restored on exit."""
        return deterministic_mode(self.model, self.batchnorm)

    def __call__(self, params: Sequence[torch.Tensor], inputs: tuple[Any, ...]) -> torch.Tensor:
        """Model outputs with the selected parameters replaced by ``params`` (call inside ``deterministic``);
        with ``call=``, ``call(model, *inputs)`` evaluated the same way."""
        mapping: dict[str, torch.Tensor] = dict(self._constants)
        mapping.update(zip(self.names, params))
        if self.batchnorm == "batch":
            # BatchNorm in train mode updates its running stats in place: give it copies to update
            buffers = dict(self.model.named_buffers())
            mapping.update({n: buffers[n].clone() for n in self._bn_buffers if n in buffers})
        if self._prefix:
            mapping = {self._prefix + n: t for n, t in mapping.items()}
        return functional_call(self._module, mapping, inputs)


class _Closure(nn.Module):
    """``forward(*inputs) = call(model, *inputs)``: a closure over the model, evaluated with substituted
    parameters by ``functional_call`` (the model is this module's ``model`` submodule)."""

    def __init__(self, model: nn.Module, call: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "call", call)  # not registered: a loss module's own state stays its own

    def forward(self, *inputs: Any) -> Any:
        return self.call(self.model, *inputs)


@dataclass(frozen=True)
class Fingerprint:
    """A cheap summary of a model's state (see :meth:`ModelFunction.fingerprint`)."""

    params: tuple
    buffers: tuple
    flags: tuple


_FIELDS = ("identity", "version", "storage", "dtype", "device", "requires_grad")
_WHAT = {"identity": "was replaced by another tensor", "version": "was modified in place",
         "storage": "now holds other data (.data was assigned)", "dtype": "changed dtype",
         "device": "moved to another device", "requires_grad": "changed requires_grad"}


def describe_change(old: Fingerprint, new: Fingerprint) -> str:
    """The first difference between two fingerprints, in words (for error messages)."""
    for kind, before, after in (("parameter", old.params, new.params), ("buffer", old.buffers, new.buffers)):
        names_before, names_after = [e[0] for e in before], [e[0] for e in after]
        if names_before != names_after:
            gone = sorted(set(names_before) - set(names_after))
            added = sorted(set(names_after) - set(names_before))
            return f"the model's {kind}s changed (removed: {gone[:3]}, added: {added[:3]})"
        for a, b in zip(before, after):
            for field, x, y in zip(_FIELDS, a[1:], b[1:]):
                if x != y:
                    detail = f" ({x} -> {y})" if field in ("dtype", "device", "requires_grad") else ""
                    return f"{kind} {a[0]} {_WHAT[field]}{detail}"
    if old.flags != new.flags:
        return "a module's training flag changed"
    return "no change"


def check_loss(loss: torch.Tensor, where: str) -> None:
    """A loss must be a finite scalar."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar (mean over the batch), got {shape} {where}")
    if not torch.isfinite(loss.detach()).all():
        raise FloatingPointError(f"the loss is {loss.item()} {where}: curvature of a non-finite loss is undefined")


_CLASS_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss, nn.MultiMarginLoss)


def check_targets(loss_fn: Callable, outputs: torch.Tensor, targets: Any) -> None:
    """Refuse target shapes that a loss would silently broadcast (e.g. MSE of (N, C) vs (N,))."""
    if not isinstance(targets, torch.Tensor) or not isinstance(outputs, torch.Tensor):
        return
    if isinstance(loss_fn, _CLASS_LOSSES):
        ok = targets.shape == outputs.shape or (
            targets.ndim == outputs.ndim - 1 and not targets.is_floating_point()
            and targets.shape[0] == outputs.shape[0])
    elif isinstance(loss_fn, nn.modules.loss._Loss):
        ok = targets.shape == outputs.shape
    else:
        ok = targets.ndim == 0 or outputs.ndim == 0 or targets.shape[0] == outputs.shape[0]
    if not ok:
        raise ValueError(f"mismatched target shape: model outputs {tuple(outputs.shape)}, targets "
                         f"{tuple(targets.shape)} for {type(loss_fn).__name__}")


def loss_reduction_weight(loss_fn: Callable, batch_size: int, total: int) -> float:
    """Weight of one batch's loss in the full-data loss: ``n_b / N`` for a mean, 1 for a sum."""
    if getattr(loss_fn, "reduction", "mean") == "sum":
        return 1.0
    if getattr(loss_fn, "reduction", "mean") == "none":
        raise ValueError("loss_fn has reduction='none': it must return a scalar (use 'mean')")
    return batch_size / total
