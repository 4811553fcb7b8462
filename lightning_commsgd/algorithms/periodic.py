"""Local SGD / PR-SGD-Momentum: every tau optimizer steps, replace each worker's replica by the mean.

Stich (ICLR 2019) and Yu, Jin, Yang (ICML 2019): all workers start from the same x_0; each runs
``x_i <- x_i - eta g_i`` (through the user's optimizer); when tau divides the step count,
``x_i <- (1/p) sum_j x_j`` and, in PR-SGD-Momentum, ``u_i <- (1/p) sum_j u_j`` as well. Both travel in
one flat buffer: one all-reduce per round. No Lightning import: usable from a plain PyTorch loop::

    averager = PeriodicAverager(model, [optimizer], Communicator(), tau=8)
    for batch in loader:
        loss_fn(model(batch)).backward(); optimizer.step(); optimizer.zero_grad()
        averager.after_optimizer_step()
    averager.finalize()  # consensus model at the end
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_commsgd.algorithms.base import PeriodicAlgorithm, as_schedule, check_choice, validate_period
from lightning_commsgd.algorithms.replica import MOMENTUM_MODES, MomentumMode, ReplicaState
from lightning_commsgd.comm import Communicator
from lightning_commsgd.schedules import PeriodSchedule

__all__ = ["PeriodicAverager", "as_schedule", "validate_momentum_mode", "validate_period"]


def validate_momentum_mode(momentum: Any) -> MomentumMode:
    """Return ``momentum`` if it names a known momentum mode, else raise a ValueError listing them."""
    return check_choice(momentum, "momentum", MOMENTUM_MODES)


class PeriodicAverager(PeriodicAlgorithm):
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

    The consensus distance (see :class:`PeriodicAlgorithm`) costs one scalar all-reduce here: the mean
    is the round's own result.
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
        self.momentum = validate_momentum_mode(momentum)
        super().__init__(ReplicaState(module, optimizers, self.momentum, average_buffers), communicator, tau)

    @property
    def in_sync(self) -> bool:
        """True when no local step was taken since the latest round (all replicas are equal)."""
        return self.step == self.last_round_step

    def average(self, tag: str = "average") -> None:
        """A round outside the schedule, now: x_i (and u_i, buffers per the options) <- their mean over
        workers (one all-reduce); the next scheduled round counts from here."""
        self.communicate(tag)
        self.last_round_step = self.step
        self.rounds += 1

    def communicate(self, tag: str) -> None:
        tensors = self.replica.averaged_tensors()
        if self.communicator.is_distributed and tensors:
            head = self.replica.param_numel
            local_params = self._pack(tensors)[:head].clone() if self._consensus_due() else None
            mean = self._exact_mean_(tensors, tag)
            if local_params is not None:
                self._record_consensus(local_params, mean[:head])
        if self.momentum == "zero":
            self.replica.reset_optimizer_state()

    def finalize(self) -> None:
        """A last round so that every replica equals the consensus model (end of training)."""
        if not self.in_sync:
            self.average(tag="final")
