"""Where work runs: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when this torch has it), checked."""
from __future__ import annotations

import torch

__all__ = ["resolve_device", "DEVICE_CHOICES"]

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The device ``spec`` names, or a one-line ValueError: a device that does not exist, or CUDA asked
    for from a torch built without it. ``None`` and ``"cpu"`` are the CPU; ``"auto"`` is the current
    CUDA device when there is one, else the CPU."""
    if spec is None:
        return torch.device("cpu")
    text = str(spec)
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {text!r}: use {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device {text!r} is not supported here: use {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        built = "without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda} but sees no GPU"
        raise ValueError(f"device {text!r} asked for, but this torch ({torch.__version__}) is built {built}: "
                         "use --device cpu (or auto), or install a CUDA build of torch")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {text!r} does not exist: this machine has {count} CUDA device(s) "
                         f"(cuda:0..cuda:{count - 1})")
    return device
