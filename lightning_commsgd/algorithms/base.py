"""What every periodic algorithm shares: step counting, the tau schedule, rounds, consensus distance.

A *periodic algorithm* lets each worker take local optimizer steps and, every tau steps, runs one
communication round (:meth:`PeriodicAlgorithm.communicate`): exact averaging, gossip mixing with a
matrix W, elastic averaging... The Cooperative SGD framework A(tau, W, v) of Wang & Joshi covers them
all; this base holds the tau part, so every schedule (``AdaComm``, ...) works with every algorithm.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from lightning_commsgd.algorithms.finite import (
    NonFiniteError,
    all_finite,
    finite_flags,
    flagged_ranks,
    local_nonfinite_message,
    nonfinite_message,
    skipped_message,
)
from lightning_commsgd.algorithms.protocol import CommAlgorithm
from lightning_commsgd.algorithms.replica import ReplicaState
from lightning_commsgd.comm import Communicator
from lightning_commsgd.flat import FlatBuffer
from lightning_commsgd.schedules import ConstantPeriod, PeriodSchedule, RoundInfo

__all__ = ["PERIOD_MEANINGS", "PeriodicAlgorithm", "as_schedule", "check_choice", "validate_period"]


#: What each period or size argument checked by :func:`validate_period` means, for its error messages.
PERIOD_MEANINGS = {
    "tau": "the communication period: optimizer steps between rounds",
    "global_every": "every how many rounds one averages over all ranks; the others stay within a block",
    "group_size": "ranks per averaging block, consecutive global ranks",
}


def validate_period(tau: Any, name: str = "tau", meaning: str | None = None) -> int:
    """Return ``tau`` if it is an integer >= 1 (bools refused), else raise naming the parameter, what it
    means (``meaning``, default: :data:`PERIOD_MEANINGS` of ``name``) and the allowed range."""
    meaning = meaning or PERIOD_MEANINGS.get(name)
    what = f" ({meaning})" if meaning else ""
    if isinstance(tau, bool) or not isinstance(tau, int):
        raise TypeError(f"Arg `{name}` must be an int >= 1{what}, got {tau!r}.")
    if tau < 1:
        raise ValueError(f"Arg `{name}` must be an int >= 1{what}, got {tau}.")
    return tau


def check_choice(value: Any, name: str, allowed: Sequence[str]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else a ValueError naming the argument and the list."""
    if value not in allowed:
        raise ValueError(f"Arg `{name}` must be one of {tuple(allowed)}, got {value!r}.")
    return value


def as_schedule(tau: Any) -> PeriodSchedule:
    """``tau`` as a schedule: an int means :class:`ConstantPeriod`; a schedule is returned as is."""
    if isinstance(tau, PeriodSchedule):
        return tau
    return ConstantPeriod(validate_period(tau))


class PeriodicAlgorithm(CommAlgorithm):
    """Local steps, and a communication round every tau steps.

    Args:
        replica: the tensors of this worker that rounds touch (see :class:`ReplicaState`).
        communicator: counts and carries every collective.
        tau: the period (an int) or a :class:`~lightning_commsgd.schedules.PeriodSchedule`, asked after
            each round; schedules that need the training loss get it through :meth:`record_loss`.

    Attributes:
        step: optimizer steps seen. last_round_step: the step the latest round ended. rounds: rounds run.
        on_nonfinite: what a round does when a replica holds NaN or Inf (``"raise"`` or ``"skip"``, see
            :mod:`lightning_commsgd.algorithms.finite`); checked in every exact-mean round.
        consensus_every: measure the consensus distance ``(1/p) sum_i ||x_i - x_bar||^2`` every this many
            rounds (just before the round changes x_i); ``None`` never.
        last_consensus: ``(step, distance)`` of the latest measurement, or ``None``.
    """

    def __init__(self, replica: ReplicaState, communicator: Communicator, tau: int | PeriodSchedule) -> None:
        self.schedule = as_schedule(tau)
        self.replica = replica
        self.communicator = communicator
        self.step = 0
        self.last_round_step = 0
        self.rounds = 0
        self.consensus_every: int | None = None
        self.last_consensus: tuple[int, float] | None = None
        self._flat: FlatBuffer | None = None
        self.on_nonfinite = "raise"  # see lightning_commsgd.algorithms.finite
        self._loss_sum = 0.0
        self._loss_count = 0

    # -- what subclasses provide --------------------------------------------------------------------
    @abstractmethod
    def communicate(self, tag: str) -> None:
        """One communication round now (on every rank)."""

    @abstractmethod
    def finalize(self) -> None:
        """Bring every replica to the model the algorithm outputs (end of training)."""

    @property
    @abstractmethod
    def in_sync(self) -> bool:
        """True when every replica is known to hold the same model."""

    def extra_state(self) -> dict[str, Any]:
        """Subclass state for checkpoints (e.g. a gossip phase, a centre variable)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:  # noqa: B027  (optional hook)
        """Restore :meth:`extra_state` output."""

    # -- the period ---------------------------------------------------------------------------------
    @property
    def tau(self) -> int:
        """The current period (the schedule's); a new value counts from the latest round."""
        return self.schedule.tau

    @tau.setter
    def tau(self, value: int) -> None:
        self.schedule.tau = validate_period(value)

    @property
    def period(self) -> int:
        return self.schedule.tau

    @property
    def adaptive_period(self) -> bool:
        return not isinstance(self.schedule, ConstantPeriod)

    def metrics(self) -> dict[str, float]:
        """``tau`` and the schedule's own figures (AdaComm: ``adacomm_F0``, ``adacomm_F``)."""
        return {"tau": float(self.tau), **self.schedule.metrics()}

    def record_batch(self, loss: Tensor | float | None = None, samples: int | None = None) -> None:
        """Note a training batch of the coming optimizer step (several with gradient accumulation): its loss
        feeds schedules that adapt to the loss (a no-op for the others)."""
        self.record_loss(loss)

    def record_loss(self, loss: Any) -> None:
        """Note a training loss of the coming optimizer step (several with gradient accumulation), for
        schedules that adapt to the loss; a no-op for the others."""
        if self.schedule.needs_loss and loss is not None:
            self._loss_sum += float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
            self._loss_count += 1

    def _learning_rate(self) -> float | None:
        optimizers = self.replica.optimizers
        return float(optimizers[0].param_groups[0]["lr"]) if optimizers else None

    def after_optimizer_step(self) -> bool:
        """Count one optimizer step; run a round when tau steps passed since the latest one.

        Call it on every rank after every optimizer step, whether or not the step was skipped, so all
        ranks reach the same decision. Returns whether a round ran.
        """
        if not self._count_step():
            return False
        self._run_round()
        return True

    def _count_step(self) -> bool:
        """Count one optimizer step (and tell the schedule); whether a round is due now."""
        self.step += 1
        self.schedule.on_step(self.step, self._learning_rate(), self._loss_sum, self._loss_count)
        self._loss_sum, self._loss_count = 0.0, 0
        return self.step - self.last_round_step >= self.schedule.tau

    def _run_round(self) -> None:
        """The round that :meth:`_count_step` found due, and its bookkeeping."""
        self.communicate("average")
        self.last_round_step = self.step
        self.rounds += 1
        self.schedule.after_round(RoundInfo(self.step, self.rounds, self.communicator))

    # -- helpers for subclasses ---------------------------------------------------------------------------
    def _pack(self, tensors: Sequence[Tensor]) -> Tensor:
        """``tensors`` packed into the (cached) flat buffer: one payload per round."""
        if self._flat is None or not self._flat.matches(tensors):
            self._flat = FlatBuffer(tensors)
        return self._flat.pack(tensors)

    def _unpack(self, tensors: Sequence[Tensor], buffer: Tensor) -> None:
        assert self._flat is not None
        self._flat.unpack(tensors, buffer)

    def _consensus_due(self) -> bool:
        return self.consensus_every is not None and self.rounds % self.consensus_every == 0

    def _record_consensus(self, local_params: Tensor, mean_params: Tensor) -> None:
        """(1/p) sum_i ||x_i - x_bar||^2 from this rank's flat parameters and the mean (one scalar
        all-reduce, tag ``consensus``)."""
        local_sq = float((local_params.double() - mean_params.double()).square().sum())
        (distance,) = self.communicator.all_reduce_scalars([local_sq], "mean", tag="consensus")
        self.last_consensus = (self.step, distance)

    def _exact_mean_(
        self, tensors: Sequence[Tensor], tag: str, communicator: Communicator | None = None
    ) -> Tensor:
        """Replace ``tensors`` by their mean over the ranks of ``communicator`` (default: all; one
        all-reduce), the finite flags riding in the same buffer (see :mod:`.finite`); returns the packed
        mean. Under ``on_nonfinite="skip"`` the mean is over the finite replicas."""
        comm = communicator or self.communicator
        if not comm.is_distributed:
            return self._pack(tensors)
        body, poisoned, finite = self._flagged_sum_(tensors, tag, comm)
        body.div_(comm.world_size - len(poisoned))
        assert self._flat is not None
        self._unpack(tensors, self._flat.buffer)  # the flags' slot, after the tensors, is left out
        self._after_skipped_replica(finite)
        return body

    def _flagged_sum_(
        self, tensors: Sequence[Tensor], tag: str, comm: Communicator
    ) -> tuple[Tensor, list[int], bool]:
        """One all-reduce of the sum of ``tensors`` over the ranks of ``comm`` with the finite flags riding
        behind them (see :mod:`.finite`): (the packed sum, the poisoned group ranks, whether this rank's
        replica was finite). A poisoned replica sends zeros; raises per ``on_nonfinite``. ``tensors`` are
        not changed."""
        p = comm.world_size
        finite = self._replica_finite(tensors)
        flags = finite_flags(finite, comm.rank, p, tensors[0].device)
        buffer = self._pack([*tensors, flags])
        body = buffer[:-p]
        if not finite:
            body.zero_()  # a poisoned replica contributes nothing (and NaN never reaches the network sum)
        comm.all_reduce_(buffer, "sum", tag=tag)
        return body, self._check_flags(buffer[-p:], comm), finite

    def _replica_finite(self, packed: Sequence[Tensor]) -> bool:
        """This rank's replica before a round: the tensors the round sends and every floating-point tensor
        of its optimizers' state (local momentum too)."""
        state = [t for opt in self.replica.optimizers for st in opt.state.values() for t in st.values()]
        return all_finite([*packed, *(t for t in state if isinstance(t, Tensor))])

    def _check_flags(self, summed_flags: Tensor, comm: Communicator) -> list[int]:
        """The group ranks whose replica was not finite; raises per ``on_nonfinite`` (the same on every rank:
        every rank holds the same summed flags). Skipped replicas are counted in the ledger, and the lowest
        finite rank of the round warns."""
        poisoned = flagged_ranks(summed_flags)
        if poisoned and (self.on_nonfinite == "raise" or len(poisoned) == comm.world_size):
            ranks = [comm.global_rank(r) for r in poisoned]
            message = nonfinite_message(ranks, self.step, self.on_nonfinite, comm.world_size)
            raise NonFiniteError(message)
        if poisoned:
            comm.ledger.record_skipped(len(poisoned))
            if comm.rank == min(set(range(comm.world_size)) - set(poisoned)):  # one warning per round
                ranks = [comm.global_rank(r) for r in poisoned]
                reset = getattr(self.replica, "momentum", None) == "local"
                finite = comm.world_size - len(poisoned)
                warnings.warn(skipped_message(ranks, self.step, finite, reset), RuntimeWarning, stacklevel=2)
        return poisoned

    def _refuse_nonfinite(self, tensors: Sequence[Tensor]) -> None:
        """For rounds whose payload has no room for the flags (rounded payloads): a poisoned rank raises
        before sending anything."""
        if not self._replica_finite(tensors):
            raise NonFiniteError(local_nonfinite_message(self.communicator.rank, self.step))

    def _after_skipped_replica(self, finite: bool) -> None:
        """A skipped (poisoned) replica now holds the finite average; optimizer state the round did not
        replace is reset, so that no NaN survives in it."""
        if not finite and self.replica.momentum == "local":
            self.replica.reset_optimizer_state()

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counter, latest round, schedule and subclass state: what a resumed run needs."""
        return {
            "step": self.step,
            "last_round_step": self.last_round_step,
            "rounds": self.rounds,
            "schedule": self.schedule.state_dict(),
            **self.extra_state(),
        }

    def load_resized_state_dict(self, state: dict[str, Any]) -> None:
        """Rank 0's state of a run on another world size: counters and schedule continue, the replicas are
        equal again (the latest round is now), per-rank extras (sample counts) start afresh."""
        state = dict(state)
        state["last_round_step"] = state["step"]
        state["last_global_step"] = state["step"]
        state.pop("samples_since_round", None)
        self.load_state_dict(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output. A constant period stays the one given to the constructor
        (configuration: a user may resume with a different tau on purpose); an adaptive schedule
        restores its state."""
        self.step = int(state["step"])
        self.last_round_step = int(state["last_round_step"])
        self.rounds = int(state["rounds"])
        self.schedule.load_state_dict(state["schedule"])
        self.load_extra_state(state)
