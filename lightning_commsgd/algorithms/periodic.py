"""Local SGD / PR-SGD-Momentum: every tau optimizer steps, replace each worker's replica by the mean.

Stich (ICLR 2019) and Yu, Jin, Yang (ICML 2019): all workers start from the same x_0; each runs
``x_i <- x_i - eta g_i`` (through the user's optimizer); when tau divides the step count,
``x_i <- (1/p) sum_j x_j`` and, in PR-SGD-Momentum, ``u_i <- (1/p) sum_j u_j`` as well. Both travel in
one flat buffer: one all-reduce per round. No Lightning import: usable from a plain PyTorch loop::

    averager = PeriodicAverager(model, [optimizer], Communicator(), tau=8)
    for batch in loader:
        loss_fn(model(batch)).backward(); optimizer.step(); optimizer.zero_grad()
        averager.after_optimizer_step()
    averager.average(tag="final")  # consensus model at the end
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_commsgd.algorithms.replica import MOMENTUM_MODES, MomentumMode, ReplicaState
from lightning_commsgd.comm import Communicator
from lightning_commsgd.flat import FlatBuffer
from lightning_commsgd.schedules import ConstantPeriod, PeriodSchedule, RoundInfo

__all__ = ["PeriodicAverager", "validate_period"]


def validate_period(tau: Any, name: str = "tau") -> int:
    """Return ``tau`` if it is an integer >= 1 (bools refused), else raise naming the parameter."""
    if isinstance(tau, bool) or not isinstance(tau, int):
        raise TypeError(f"Arg `{name}` must be an int >= 1 (the communication period), got {tau!r}.")
    if tau < 1:
        raise ValueError(f"Arg `{name}` must be >= 1 (the communication period), got {tau}.")
    return tau


def as_schedule(tau: Any) -> PeriodSchedule:
    """``tau`` as a schedule: an int means :class:`ConstantPeriod`; a schedule is returned as is."""
    if isinstance(tau, PeriodSchedule):
        return tau
    return ConstantPeriod(validate_period(tau))


def validate_momentum_mode(momentum: Any) -> MomentumMode:
    """Return ``momentum`` if it names a known momentum mode, else raise a ValueError listing them."""
    if momentum not in MOMENTUM_MODES:
        raise ValueError(f"Arg `momentum` must be one of {MOMENTUM_MODES}, got {momentum!r}.")
    return momentum


class PeriodicAverager:
    """Periodic model averaging with PR-SGD-Momentum's momentum handling.

    Args:
        module: the model replica x_i of this worker (parameters and floating buffers).
        optimizers: the optimizers stepping ``module``; their state is u_i.
        communicator: counts and carries the all-reduce.
        tau: communication period tau (paper: tau in Wang & Joshi, H in Stich, I in Yu et al.): a round
            ends every tau calls of :meth:`after_optimizer_step`. 1 averages after every step. An int, or
            a :class:`~lightning_commsgd.schedules.PeriodSchedule` (e.g. ``AdaComm``) asked after each
            round; schedules that need the training loss get it from :meth:`record_loss`.
        momentum: ``"average"`` (PR-SGD-Momentum, default), ``"local"`` (torch's
            ``PeriodicModelAverager`` behaviour) or ``"zero"`` (restart: state reset after each round).
        average_buffers: average floating-point buffers (BatchNorm running statistics) too.

    Attributes:
        consensus_every: measure the consensus distance ``(1/p) sum_i ||x_i - x_bar||^2`` every this many
            rounds (just before the average replaces x_i); ``None`` never. Costs one scalar all-reduce.
        last_consensus: ``(step, distance)`` of the latest measurement, or ``None``.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizers: Sequence[Optimizer],
        communicator: Communicator,
        *,
        tau: int | PeriodSchedule = 8,
        momentum: MomentumMode = "average",
        average_buffers: bool = True,
    ) -> None:
        self.schedule = as_schedule(tau)
        self.momentum = validate_momentum_mode(momentum)
        self.communicator = communicator
        self.replica = ReplicaState(module, optimizers, self.momentum, average_buffers)
        self.step = 0
        self.last_round_step = 0
        self.rounds = 0
        self.consensus_every: int | None = None
        self.last_consensus: tuple[int, float] | None = None
        self._flat: FlatBuffer | None = None
        self._loss_sum = 0.0
        self._loss_count = 0

    @property
    def tau(self) -> int:
        """The current period (the schedule's); a new value counts from the latest round."""
        return self.schedule.tau

    @tau.setter
    def tau(self, value: int) -> None:
        self.schedule.tau = validate_period(value)

    def record_loss(self, loss: Any) -> None:
        """Note a training loss of the coming optimizer step (several with gradient accumulation), for
        schedules that adapt to the loss; a no-op for the others."""
        if self.schedule.needs_loss and loss is not None:
            self._loss_sum += float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
            self._loss_count += 1

    def _learning_rate(self) -> float | None:
        optimizers = self.replica.optimizers
        return float(optimizers[0].param_groups[0]["lr"]) if optimizers else None

    @property
    def in_sync(self) -> bool:
        """True when no local step was taken since the latest round (all replicas are equal)."""
        return self.step == self.last_round_step

    def after_optimizer_step(self) -> bool:
        """Count one optimizer step; run a round when tau steps passed since the latest one.

        Call it on every rank after every optimizer step, whether or not the step was skipped, so all
        ranks reach the same decision. Returns whether a round ran.
        """
        self.step += 1
        self.schedule.on_step(self.step, self._learning_rate(), self._loss_sum, self._loss_count)
        self._loss_sum, self._loss_count = 0.0, 0
        if self.step - self.last_round_step >= self.schedule.tau:
            self.average()
            self.schedule.after_round(RoundInfo(self.step, self.rounds, self.communicator))
            return True
        return False

    def average(self, tag: str = "average") -> None:
        """One round now: x_i (and u_i, buffers per the options) <- their mean over workers."""
        tensors = self.replica.averaged_tensors()
        if self.communicator.is_distributed and tensors:
            if self._flat is None or not self._flat.matches(tensors):
                self._flat = FlatBuffer(tensors)
            buffer = self._flat.pack(tensors)
            measure = self.consensus_every is not None and self.rounds % self.consensus_every == 0
            local_params = buffer[: self.replica.param_numel].clone() if measure else None
            self.communicator.all_reduce_(buffer, "mean", tag=tag)
            if local_params is not None:
                self._record_consensus(local_params)
            self._flat.unpack(tensors)
        if self.momentum == "zero":
            self.replica.reset_optimizer_state()
        self.last_round_step = self.step
        self.rounds += 1

    def finalize(self) -> None:
        """A last round so that every replica equals the consensus model (end of training)."""
        if not self.in_sync:
            self.average(tag="final")

    def _record_consensus(self, local_params: torch.Tensor) -> None:
        assert self._flat is not None
        mean_params = self._flat.buffer[: self.replica.param_numel]
        local_sq = float((local_params.double() - mean_params.double()).square().sum())
        (distance,) = self.communicator.all_reduce_scalars([local_sq], "mean", tag="consensus")
        self.last_consensus = (self.step, distance)

    def state_dict(self) -> dict[str, Any]:
        """Step counter, latest round and schedule: what a resumed run needs to keep the same rounds."""
        return {
            "step": self.step,
            "last_round_step": self.last_round_step,
            "rounds": self.rounds,
            "schedule": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output. A constant period stays the one given to the constructor
        (configuration: a user may resume with a different tau on purpose); an adaptive schedule
        restores its state."""
        self.step = int(state["step"])
        self.last_round_step = int(state["last_round_step"])
        self.rounds = int(state["rounds"])
        self.schedule.load_state_dict(state["schedule"])
