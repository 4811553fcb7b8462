"""Communication-period schedules: what tau is, round after round.

A schedule owns the current period ``tau``. The algorithm (e.g.
:class:`~lightning_commsgd.algorithms.periodic.PeriodicAverager`) tells it about every optimizer step
(:meth:`PeriodSchedule.on_step`, local, no communication) and asks it after every round
(:meth:`PeriodSchedule.after_round`, called on every rank; a schedule that needs global information
agrees on it through the communicator there, so every rank always uses the same tau). The new tau
counts from that round: the next round ends ``tau`` steps later.

- :class:`ConstantPeriod` - what an int means.
- :class:`AdaComm` - Wang & Joshi, "Adaptive Communication Strategies to Achieve the Best
  Error-Runtime Trade-off in Local-Update SGD" (SysML 2019): tau shrinks with the training loss.
- :class:`PostLocalSGD` - Lin et al., "Don't Use Large Mini-Batches, Use Local SGD" (ICLR 2020):
  tau = 1 until a switch step, then local.
- :class:`IncreasingPeriod` - Stich, "Local SGD Converges Fast and Communicates Little" (ICLR 2019):
  the doubling trick, tau grows geometrically up to a cap.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from lightning_commsgd.comm import Communicator

__all__ = ["AdaComm", "ConstantPeriod", "IncreasingPeriod", "PeriodSchedule", "PostLocalSGD", "RoundInfo"]


_TAU = "the communication period: optimizer steps between rounds"


def _check_int(value: Any, name: str, minimum: int, meaning: str) -> int:
    """``value`` if it is an int >= ``minimum`` (bools refused), else an error naming the argument, what it
    means and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Arg `{name}` must be an int >= {minimum} ({meaning}), got {value!r}.")
    if value < minimum:
        raise ValueError(f"Arg `{name}` must be an int >= {minimum} ({meaning}), got {value}.")
    return value


def _check_optional_int(value: Any, name: str, minimum: int, meaning: str) -> int | None:
    return None if value is None else _check_int(value, name, minimum, f"{meaning}; or None")


@dataclass(frozen=True)
class RoundInfo:
    """What a schedule learns at the end of a round.

    Attributes:
        step: optimizer steps done; the round ended with this step.
        rounds: rounds done, this one included.
        communicator: for schedules that must agree on something (same calls on every rank).
    """

    step: int
    rounds: int
    communicator: Communicator


class PeriodSchedule(ABC):
    """Decides the communication period tau; see the module docstring for the protocol.

    Attributes:
        tau: the current period (an int >= 1).
        needs_loss: whether :meth:`on_step` wants the training losses (the strategy skips the work
            of collecting them otherwise).
    """

    needs_loss: bool = False

    def __init__(self, tau: int) -> None:
        self.tau = _check_int(tau, "tau", 1, _TAU)

    def on_step(self, step: int, lr: float | None, loss_sum: float, loss_count: int) -> None:  # noqa: B027
        """Called after every optimizer step ``step`` (1-indexed) with the learning rate it used and the
        sum and number of training losses recorded for it on this rank. Local: never communicates."""

    @abstractmethod
    def after_round(self, info: RoundInfo) -> None:
        """Called on every rank after every round; may update :attr:`tau`."""

    def metrics(self) -> dict[str, float]:
        """Values worth logging (e.g. AdaComm's F_l), keyed without prefix."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the same tau sequence."""
        return {"tau": self.tau}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.tau = int(state["tau"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tau={self.tau})"


class ConstantPeriod(PeriodSchedule):
    """tau never changes (what ``tau=<int>`` means).

    Args:
        tau: the period, optimizer steps between rounds.
    """

    def after_round(self, info: RoundInfo) -> None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the constructor's tau is configuration, and a user may resume with a
        different one on purpose."""


class PostLocalSGD(PeriodSchedule):
    """Post-local SGD (Lin et al. 2020): every step a round (tau = 1, mini-batch SGD with averaged
    momentum) until ``switch_step``, then tau = ``tau`` (local SGD).

    Args:
        switch_step: the first round at or after this many optimizer steps switches to local updates.
        tau: the local period H after the switch.
    """

    def __init__(self, switch_step: int, tau: int) -> None:
        self.switch_step = _check_int(
            switch_step, "switch_step", 0, "optimizer steps before local SGD starts"
        )
        self.local_tau = _check_int(tau, "tau", 1, _TAU)
        super().__init__(1 if self.switch_step > 0 else self.local_tau)

    def after_round(self, info: RoundInfo) -> None:
        self.tau = self.local_tau if info.step >= self.switch_step else 1

    def __repr__(self) -> str:
        return f"PostLocalSGD(switch_step={self.switch_step}, tau={self.local_tau})"


class IncreasingPeriod(PeriodSchedule):
    """Stich's doubling trick: tau starts at ``tau0`` and is multiplied by ``factor`` every
    ``every_rounds`` rounds or every ``every_steps`` steps (exactly one of the two), up to ``max_tau``.

    Args:
        tau0: the first period.
        every_rounds: grow after this many rounds at the current tau.
        every_steps: tau = tau0 * factor ** floor(step / every_steps), decided at rounds.
        factor: growth factor (int >= 2).
        max_tau: cap; ``None`` for none.
    """

    def __init__(
        self,
        tau0: int = 1,
        every_rounds: int | None = None,
        every_steps: int | None = None,
        factor: int = 2,
        max_tau: int | None = None,
    ) -> None:
        super().__init__(_check_int(tau0, "tau0", 1, "the first communication period, in optimizer steps"))
        self.tau0 = tau0
        self.every_rounds = _check_optional_int(
            every_rounds, "every_rounds", 1, "rounds at one period before it grows"
        )
        self.every_steps = _check_optional_int(
            every_steps, "every_steps", 1, "optimizer steps between growths of the period"
        )
        if (self.every_rounds is None) == (self.every_steps is None):
            raise ValueError("IncreasingPeriod needs exactly one of `every_rounds` and `every_steps`.")
        self.factor = _check_int(factor, "factor", 2, "the growth factor of the period")
        self.max_tau = _check_optional_int(max_tau, "max_tau", 1, "the largest communication period")
        if self.max_tau is not None and self.max_tau < tau0:
            raise ValueError(f"Arg `max_tau` ({self.max_tau}) must be >= `tau0` ({tau0}).")
        self._rounds_at_tau = 0

    def after_round(self, info: RoundInfo) -> None:
        if self.every_steps is not None:
            tau = self.tau0 * self.factor ** (info.step // self.every_steps)
        else:
            self._rounds_at_tau += 1
            tau = self.tau
            if self._rounds_at_tau >= self.every_rounds:  # type: ignore[operator]
                tau, self._rounds_at_tau = tau * self.factor, 0
        self.tau = tau if self.max_tau is None else min(tau, self.max_tau)

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau, "rounds_at_tau": self._rounds_at_tau}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau = int(state["tau"])
        self._rounds_at_tau = int(state["rounds_at_tau"])


class AdaComm(PeriodSchedule):
    """AdaComm (Wang & Joshi, SysML 2019): large tau while the loss is high, smaller as it falls.

    At the start of interval l: ``tau_l = ceil(sqrt((eta_0 / eta_l) * F_l / F_0) * tau0)``, clamped to
    ``[min_tau, max_tau]`` (the ``eta_0 / eta_l`` factor only when ``lr_aware``). F is the training loss
    that ``training_step`` returned, averaged over all workers and over the steps of the previous
    interval (sums and counts all-reduced in float64, so every rank computes the same tau).

    Step mode (``interval_steps=T0``, reproducible; the contract of the tests): interval l covers steps
    ``(l T0, (l+1) T0]``. After the round ending step s, if ``L = floor(s / T0)`` is larger than at the
    previous decision, tau is decided from interval L-1 (F_0 is interval 0's mean, so the first decision,
    at L = 1, has F = F_0); intervals between are skipped. eta is the first param group's learning rate
    at that step, eta_0 its value at step 1.

    Wall-clock mode (``interval_s``, the paper's choice): every round all-reduces three float64s (the
    ranks' mean elapsed time, and the loss sum and count since the previous decision) and decides when
    the mean elapsed time crossed the next multiple of ``interval_s``; F is then the mean over the steps
    since the previous decision. Not reproducible across runs, by nature.

    Args:
        tau0: tau_0, the initial period (the paper tunes it; larger is cheaper).
        interval_s: T_0 in wall-clock seconds.
        interval_steps: T_0 in optimizer steps. Give exactly one of ``interval_s``/``interval_steps``.
        lr_aware: include the ``eta_0 / eta_l`` factor (the paper's variant for decaying learning rates).
        min_tau: lower clamp (>= 1; tau is never 0).
        max_tau: upper clamp, ``None`` for none.

    Raises:
        ValueError: at a decision, when F_0 or F_l is NaN/Inf, F_0 <= 0, or no loss was recorded in the
            interval (``training_step`` must return the loss); all ranks raise it together.
    """

    needs_loss = True

    def __init__(
        self,
        tau0: int = 16,
        interval_s: float | None = None,
        interval_steps: int | None = None,
        lr_aware: bool = True,
        min_tau: int = 1,
        max_tau: int | None = None,
    ) -> None:
        super().__init__(_check_int(tau0, "tau0", 1, "the first communication period, in optimizer steps"))
        self.tau0 = tau0
        if (interval_s is None) == (interval_steps is None):
            raise ValueError("AdaComm needs exactly one of `interval_s` (seconds) and `interval_steps`.")
        if interval_s is not None and (
            isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not interval_s > 0
        ):
            raise ValueError(f"Arg `interval_s` must be a number > 0, got {interval_s!r}.")
        if interval_s is not None and not math.isfinite(interval_s):
            raise ValueError(f"Arg `interval_s` must be finite, got {interval_s!r}.")
        self.interval_s = None if interval_s is None else float(interval_s)
        self.interval_steps = _check_optional_int(
            interval_steps, "interval_steps", 1, "optimizer steps per AdaComm interval T_0"
        )
        self.lr_aware = bool(lr_aware)
        self.min_tau = _check_int(min_tau, "min_tau", 1, "the smallest communication period")
        self.max_tau = _check_optional_int(max_tau, "max_tau", 1, "the largest communication period")
        if self.max_tau is not None and self.min_tau > self.max_tau:
            raise ValueError(f"Arg `min_tau` ({self.min_tau}) must be <= `max_tau` ({self.max_tau}).")
        self.tau = self._clamp(tau0)
        # step-mode losses: interval index -> [sum, count]; wall-clock mode uses key -1 (since decision)
        self._losses: dict[int, list[float]] = {}
        self._decided_interval = 0
        self._eta0: float | None = None
        self._eta: float | None = None
        self._f0: float | None = None
        self._f: float | None = None
        self._elapsed_before = 0.0  # seconds of earlier (resumed) runs, wall-clock mode
        self._start: float | None = None

    def _clamp(self, tau: int) -> int:
        tau = max(tau, self.min_tau)
        return tau if self.max_tau is None else min(tau, self.max_tau)

    def on_step(self, step: int, lr: float | None, loss_sum: float, loss_count: int) -> None:
        if self._start is None:
            self._start = time.monotonic()
        if self.lr_aware:
            if lr is None:
                raise ValueError("AdaComm(lr_aware=True) needs an optimizer to read the learning rate from.")
            if step == 1:
                self._eta0 = float(lr)
            self._eta = float(lr)
        key = (step - 1) // self.interval_steps if self.interval_steps is not None else -1
        bucket = self._losses.setdefault(key, [0.0, 0])
        bucket[0] += float(loss_sum)
        bucket[1] += int(loss_count)

    def after_round(self, info: RoundInfo) -> None:
        if self.interval_steps is not None:
            interval = info.step // self.interval_steps
            if interval <= self._decided_interval:
                return
            if self._f0 is None:
                self._f0 = self._agreed_mean(info.communicator, 0, "interval 0")
            f = self._agreed_mean(info.communicator, interval - 1, f"interval {interval - 1}")
            self._losses = {k: v for k, v in self._losses.items() if k >= interval}
        else:
            assert self.interval_s is not None and self._start is not None
            elapsed = self._elapsed_before + time.monotonic() - self._start
            loss_sum, loss_count = self._losses.get(-1, [0.0, 0])
            total_elapsed, total_sum, total_count = info.communicator.all_reduce_scalars(
                [elapsed, loss_sum, float(loss_count)], "sum", tag="schedule"
            )
            interval = int(total_elapsed / info.communicator.world_size // self.interval_s)
            if interval <= self._decided_interval:
                return
            f = self._checked_mean(total_sum, total_count, "the interval since the last decision")
            if self._f0 is None:
                self._f0 = f
            self._losses = {}
        self._decided_interval = interval
        self._decide(f)

    def _agreed_mean(self, communicator: Communicator, interval: int, what: str) -> float:
        loss_sum, loss_count = self._losses.get(interval, [0.0, 0])
        total_sum, total_count = communicator.all_reduce_scalars(
            [loss_sum, float(loss_count)], "sum", tag="schedule"
        )
        return self._checked_mean(total_sum, total_count, what)

    @staticmethod
    def _checked_mean(total_sum: float, total_count: float, what: str) -> float:
        if total_count <= 0:
            raise ValueError(
                f"AdaComm recorded no training loss in {what}: training_step must return the loss "
                "(a tensor or a dict with 'loss')."
            )
        mean = total_sum / total_count
        if not math.isfinite(mean):
            raise ValueError(f"AdaComm: the training loss averaged over {what} is {mean}; training diverged.")
        return mean

    def _decide(self, f: float) -> None:
        assert self._f0 is not None
        if self._f0 <= 0:
            raise ValueError(
                f"AdaComm needs a positive initial training loss F_0 (tau scales with sqrt(F/F_0)), got "
                f"{self._f0}. Use a constant tau or another schedule for losses that can be <= 0."
            )
        ratio = f / self._f0
        if self.lr_aware:
            assert self._eta0 is not None and self._eta is not None
            if not self._eta > 0:
                raise ValueError(f"AdaComm(lr_aware=True) needs a positive learning rate, got {self._eta}.")
            ratio *= self._eta0 / self._eta
        self._f = f
        # 1e-9: sqrt(1) * tau0 must give tau0, not tau0 + 1 through rounding
        self.tau = self._clamp(math.ceil(math.sqrt(max(ratio, 0.0)) * self.tau0 - 1e-9))

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._f0 is not None:
            out["adacomm_F0"] = self._f0
        if self._f is not None:
            out["adacomm_F"] = self._f
        return out

    def state_dict(self) -> dict[str, Any]:
        elapsed = self._elapsed_before + (time.monotonic() - self._start if self._start is not None else 0.0)
        return {
            "tau": self.tau,
            "losses": {k: list(v) for k, v in self._losses.items()},
            "decided_interval": self._decided_interval,
            "eta0": self._eta0,
            "eta": self._eta,
            "f0": self._f0,
            "f": self._f,
            "elapsed_s": elapsed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau = int(state["tau"])
        self._losses = {int(k): [float(v[0]), int(v[1])] for k, v in state["losses"].items()}
        self._decided_interval = int(state["decided_interval"])
        self._eta0, self._eta, self._f0, self._f = state["eta0"], state["eta"], state["f0"], state["f"]
        self._elapsed_before = float(state["elapsed_s"])
        self._start = None

    def __repr__(self) -> str:
        if self.interval_s is not None:
            interval = f"interval_s={self.interval_s}"
        else:
            interval = f"interval_steps={self.interval_steps}"
        return f"AdaComm(tau0={self.tau0}, {interval}, lr_aware={self.lr_aware}, tau={self.tau})"
