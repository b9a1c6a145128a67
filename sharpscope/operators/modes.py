"""How an operator's products are formed: the user's request (:data:`HvpMode`) kept apart from the runtime state
(:data:`ProductMode`), and the auto selector and fallback ladder as a state machine over the declared states.

Transitions (``request`` -> state; docs/operators-semantics.md):

* first product: ``"auto"`` -> ``"cached"``; a fixed request is its own state;
* ``"cached"`` whose graphs exceed the memory budget -> ``"measuring"`` (auto) or ``"reverse"`` (requested);
* ``"measuring"`` -> ``"reverse"`` or ``"forward"`` after a warm-up pair and a timed pair of products;
* an op without the derivative: the math attention kernel (same state), then the other of reverse/forward,
  then ``"finite-difference"`` (auto only), then the error;
* a wrong second derivative (the derivative check, the symmetry test) under auto -> ``"finite-difference"``;
* a rebuild on a new model: back to the request (``"finite-difference"`` when a check switched it).
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Literal, get_args

HvpMode = Literal["auto", "reverse", "forward", "cached", "finite-difference"]
ProductMode = Literal["cached", "measuring", "reverse", "forward", "finite-difference"]
FD = "finite-difference"
MODES: tuple[str, ...] = get_args(HvpMode)
STATES: tuple[str, ...] = get_args(ProductMode)
TRIAL = ("reverse", "forward", "reverse", "forward")  # measuring: a warm-up pair, then a timed pair


class ModeLadder:
    """The HVP-mode state of one operator: ``request`` (what the user asked), ``state`` (how products run now;
    None before the first product) and the fallback flags. ``who`` names the operator in warnings."""

    def __init__(self, request: HvpMode, who: str) -> None:
        if request not in MODES:
            raise ValueError(f"hvp_mode must be one of {MODES}, got {request!r}")
        self.request, self.who = request, who
        self.state: ProductMode | None = None
        self.trial_times: list[float] = []
        self.math_sdpa = False      # the math attention kernel (first rung)
        self.switched_mode = False  # reverse <-> forward (second rung)

    @property
    def reported(self) -> str:
        """The state, or the request before the first product (``op.hvp_mode``)."""
        return self.state if self.state is not None else self.request

    def _set(self, state: ProductMode) -> None:
        assert state in STATES, state
        self.state = state

    def start(self) -> ProductMode:
        """Before a product: resolve the request on the first one."""
        if self.state is None:
            self._set("cached" if self.request == "auto" else self.request)
        return self.state

    def cache_refused(self) -> None:
        """The cached graphs exceed the budget: time the two modes (auto) or recompute graphs (``"cached"``)."""
        self._set("measuring" if self.request == "auto" else "reverse")

    def trial_mode(self) -> str:
        """The mode of the next measured product."""
        return TRIAL[len(self.trial_times)]

    def record_trial(self, seconds: float) -> None:
        """One measured product's time; after the timed pair the faster mode is kept."""
        self.trial_times.append(seconds)
        if len(self.trial_times) == len(TRIAL):
            reverse, forward = self.trial_times[-2:]
            self._set("reverse" if reverse <= forward else "forward")

    def running(self) -> str:
        """The differentiation mode the current product uses (the trial's while measuring)."""
        return self.trial_mode() if self.state == "measuring" else self.reported

    def last_mode(self) -> str:
        """The mode the last product used (the last trial's while measuring)."""
        return TRIAL[len(self.trial_times) - 1] if self.state == "measuring" else self.reported

    def fall_back(self, err: Exception) -> None:
        """One rung down on an unsupported derivative: math attention, the other mode, finite differences
        (auto only); re-raises ``err`` below the last rung."""
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if not self.math_sdpa:
            self.math_sdpa = True
            warnings.warn(f"{self.who}: an op lacks the derivative needed ({reason}); "
                          "retrying with the math attention kernel", RuntimeWarning, stacklevel=5)
            return
        if not self.switched_mode:
            self.switched_mode = True
            self._set("reverse" if self.running() == "forward" else "forward")
            warnings.warn(f"{self.who}: derivative still unsupported ({reason}); "
                          f"switching to hvp_mode={self.state!r}", RuntimeWarning, stacklevel=5)
            return
        if self.request == "auto" and self.state != FD:
            self.switch_to_fd(f"torch has no second derivative for an op: {reason}")
            return
        raise err

    def switch_to_fd(self, reason: str) -> None:
        """Products by finite differences from now on, with a one-line warning."""
        self._set(FD)
        warnings.warn(f"{self.who}: {reason}; switching to hvp_mode='finite-difference' (first "
                      "derivatives only)", RuntimeWarning, stacklevel=6)

    def reset(self, switched: bool) -> None:
        """A rebuild on a new model: back to the request (finite differences when a check switched: a verdict
        on the ops, which a new model keeps); the timing starts again."""
        self.state = FD if switched else None
        self.trial_times = []

    def context(self):
        """The evaluation context of the current rung (the math attention kernel after the first)."""
        if self.math_sdpa:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            return sdpa_kernel([SDPBackend.MATH])
        return nullcontext()
