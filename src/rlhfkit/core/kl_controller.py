"""Controllers for the KL coefficient ``beta`` of the reward ``r - beta * KL``.

Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2, adapt ``beta`` to
keep the KL near a target with a log-space proportional controller:

    e_t    = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta  <- beta * (1 + K_beta * e_t),     K_beta = n_steps / horizon,

where ``KL_t`` is the current KL of whole responses (summed over tokens, averaged over the batch) and
``n_steps`` the number of samples the step consumed (TRL passes the batch size times the number of
processes; Ziegler et al. use ``horizon = 10000`` samples). The clip keeps one noisy batch from moving
``beta`` by more than ``20 * n_steps / horizon`` percent.

These are tiny stateful objects of plain Python floats: arithmetic only, no tensors, no I/O.
``state_dict()`` holds the evolving ``value`` only; the target and horizon are configuration and are
rebuilt from it on resume.
"""

from __future__ import annotations

from typing import Protocol

__all__ = [
    "KL_CONTROLLERS",
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "build_kl_controller",
]

# Ziegler et al.'s clip on the proportional error.
_MAX_ERROR = 0.2


class KLController(Protocol):
    """What a trainer needs from a KL controller."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: dict[str, float]) -> None: ...


def _check_coef(kl_coef: float) -> float:
    kl_coef = float(kl_coef)
    if not kl_coef >= 0:
        raise ValueError(f"KL coefficient must be >= 0, got {kl_coef}")
    return kl_coef


class FixedKLController:
    """A constant ``beta``: ``update`` does nothing."""

    def __init__(self, kl_coef: float) -> None:
        self.value = _check_coef(kl_coef)

    @classmethod
    def from_settings(cls, kl_coef: float, target: float | None = None, horizon: float | None = None):
        """Build from the common settings; a fixed coefficient has no target, so those are ignored."""
        return cls(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (the signature matches :class:`AdaptiveKLController` so trainers need not branch)."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = _check_coef(state["value"])


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller, steering the KL of whole responses towards ``target``.

    Args:
        init_kl_coef: initial ``beta`` (>= 0; a ``beta`` of 0 stays 0, as the update is multiplicative).
        target: target KL per response in nats (> 0), e.g. 6 in Ziegler et al.
        horizon: number of samples over which the error is corrected (> 0), e.g. 10000.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if not target > 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = _check_coef(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    @classmethod
    def from_settings(cls, kl_coef: float, target: float | None = None, horizon: float | None = None):
        """Build from the common settings; ``target`` and ``horizon`` are required."""
        if target is None or horizon is None:
            raise ValueError("the adaptive KL controller needs both a target and a horizon")
        return cls(kl_coef, target, horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """One controller step after a batch of ``n_steps`` samples whose mean response KL was ``current_kl``.

        ``current_kl`` may be anything ``float()`` accepts (a 0-dim tensor, e.g. the ``objective/kl``
        metric of :func:`rlhfkit.core.reward_shaping.shape_rewards`). ``n_steps`` is meant to be small
        next to ``horizon``: the multiplier ``1 + e * n_steps / horizon`` stays within ``[0.8, 1.2]``
        only while ``n_steps <= horizon`` (and would turn ``beta`` negative past ``5 * horizon``).
        """
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        error = min(max(float(current_kl) / self.target - 1.0, -_MAX_ERROR), _MAX_ERROR)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = _check_coef(state["value"])


KL_CONTROLLERS: dict[str, type[FixedKLController | AdaptiveKLController]] = {
    "fixed": FixedKLController,
    "adaptive": AdaptiveKLController,
}


def build_kl_controller(
    kind: str, kl_coef: float, target: float | None = None, horizon: float | None = None
) -> KLController:
    """Build a controller by name from the settings a config carries.

    Args:
        kind: a key of :data:`KL_CONTROLLERS` (``"fixed"`` or ``"adaptive"``).
        kl_coef: the (initial) ``beta``.
        target: target response KL; required by ``"adaptive"``, ignored by ``"fixed"``.
        horizon: controller horizon in samples; required by ``"adaptive"``, ignored by ``"fixed"``.
    """
    if kind not in KL_CONTROLLERS:
        raise ValueError(f"unknown KL controller {kind!r}; choose one of {sorted(KL_CONTROLLERS)}")
    return KL_CONTROLLERS[kind].from_settings(kl_coef, target=target, horizon=horizon)
