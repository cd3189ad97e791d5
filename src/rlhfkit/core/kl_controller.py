"""The KL coefficient ``beta`` of the reward ``r - beta * KL``: fixed, or adapted towards a target.

Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2, keep the KL near a target
with a log-space proportional controller:

    e_t    = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta  <- beta * (1 + K_beta * e_t),     K_beta = n_steps / horizon,

where ``KL_t`` is the current KL of whole responses (summed over tokens, averaged over the batch) and
``n_steps`` the number of samples the step consumed (Ziegler et al. use ``horizon = 10000`` samples). The clip
keeps one noisy batch from moving ``beta`` by more than ``20 * n_steps / horizon`` percent. Without a target
``beta`` stays fixed. Plain Python floats; ``state_dict()`` holds the evolving ``value`` only.
"""

from __future__ import annotations

__all__ = ["KLController"]

_MAX_ERROR = 0.2  # Ziegler et al.'s clip on the proportional error


class KLController:
    """``beta``: fixed (``target`` None) or adaptive (``target`` > 0 nats per response, over ``horizon`` samples)."""

    def __init__(self, kl_coef: float, target: float | None = None, horizon: float = 10_000) -> None:
        if not float(kl_coef) >= 0:
            raise ValueError(f"KL coefficient must be >= 0, got {kl_coef}")
        if target is not None and not target > 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(kl_coef)
        self.target = None if target is None else float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """One step after ``n_steps`` samples whose mean response KL was ``current_kl`` (a float or 0-dim tensor);
        nothing when fixed. ``n_steps`` should stay below ``horizon`` (the multiplier then stays in [0.8, 1.2])."""
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        if self.target is None:
            return
        error = min(max(float(current_kl) / self.target - 1.0, -_MAX_ERROR), _MAX_ERROR)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        if not float(state["value"]) >= 0:
            raise ValueError(f"KL coefficient must be >= 0, got {state['value']}")
        self.value = float(state["value"])
