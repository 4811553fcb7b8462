"""DiLoCo and local SGD between replica groups that fail and rejoin (rounds through :mod:`.quorum`).

Every H inner steps each live group sends its pseudo-gradient Delta_g = x^(t-1) - x_g, and the outer
optimizer steps the anchor with the mean over the groups that *contributed* to the round::

    x^(t) = OuterOpt(x^(t-1), (1/|C_t|) sum_{g in C_t} Delta_g)

C_t is the set of groups that were live in round t and already held the run's state before it. A group that
died is not in C_t (the survivors go on without a restart); a group that dies inside a round makes the
round's commit fail, and the survivors run the round again from their unchanged state with a new quorum. A
group that (re)starts while the others are past their first round takes a live peer's whole state when the
next quorum forms (heals: anchor, outer and inner optimizer state, model, step and schedule, and any state
the adapter registers, such as the sampler position), takes part in that round with weight 0, and lands
the same outer step: from then on it is in lockstep with the others. Local SGD is the same with outer SGD
lr 1, no momentum (:func:`averaging_outer_optimizer`).

If no quorum forms (the Lighthouse is lost, or fewer groups than the minimum are live), the group keeps
training locally: the round is missed, the anchor stays, and the next round carries the steps since the last
one. After ``max_missed_rounds`` missed rounds in a row the group stops with
:class:`~lightning_commsgd.ft.quorum.QuorumUnavailableError`.

Each contributing group's weight rides in the round's buffer (one extra value), so the mean is exact
whatever torchft counts as a participant.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_commsgd.algorithms.diloco import (
    OuterOptimizerFactory,
    OuterStepAverager,
    SchedulerFactory,
    _InFlight,
)
from lightning_commsgd.algorithms.replica import ReplicaState
from lightning_commsgd.comm import Communicator
from lightning_commsgd.flat import FlatBuffer
from lightning_commsgd.ft.quorum import Membership, QuorumRounds, QuorumUnavailableError, ReplicaGroupError
from lightning_commsgd.schedules import PeriodSchedule, RoundInfo

__all__ = ["GroupOuterStep", "averaging_outer_optimizer", "fingerprint_mismatch"]

_log = logging.getLogger(__name__)

#: the key the group's state is registered under with the torchft manager
STATE_KEY = "lightning_commsgd"
# fingerprint fields are hashed to 20 bits: n x h^2 stays exact in float64 for up to 2^12 groups
_HASH_BITS = 20


def averaging_outer_optimizer(params: Any) -> Optimizer:
    """Outer SGD, lr 1, no momentum: the outer step is plain model averaging (local SGD)."""
    return torch.optim.SGD(params, lr=1.0)


def _hash(text: str) -> int:
    return zlib.crc32(text.encode()) & ((1 << _HASH_BITS) - 1)


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors anywhere in ``value`` (nested dicts, lists, tuples)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def check_group_options(
    round_attempts: Any, max_missed_rounds: Any, start_groups: Any, start_timeout: Any
) -> None:
    """ValueError naming the first of :class:`GroupOuterStep`'s group options out of range (called by it and,
    before any process exists, by :class:`~lightning_commsgd.ft.config.ReplicaGroups`)."""
    for name, value, low in (
        ("round_attempts", round_attempts, 1),
        ("max_missed_rounds", max_missed_rounds, 0),
        ("start_groups", start_groups, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"Arg `{name}` must be an int >= {low}, got {value!r}.")
    timeout_ok = isinstance(start_timeout, (int, float)) and not isinstance(start_timeout, bool)
    if not timeout_ok or start_timeout < 0:
        raise ValueError(f"Arg `start_timeout` must be a number of seconds >= 0, got {start_timeout!r}.")


def fingerprint_mismatch(mine: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """The fingerprint fields on which two groups differ (missing fields count as different)."""
    keys = sorted(set(mine) | set(theirs))
    return [k for k in keys if mine.get(k) != theirs.get(k)]


class _ScheduleRoundMissed(Exception):
    """A schedule's agreement round between groups found no quorum: the schedule decides at a later round."""


class _SchedulerScalars:
    """What a period schedule (AdaComm) agrees through between groups: ``all_reduce_scalars`` sums its values
    over the group's processes, then over the groups of a quorum round of its own (a group that healed in the
    latest round adds nothing: it holds its peer's numbers); ``world_size`` is then the processes summed."""

    def __init__(self, algorithm: GroupOuterStep) -> None:
        self._algorithm = algorithm
        self.world_size = algorithm.communicator.world_size

    def all_reduce_scalars(self, values: Sequence[float], op: str = "sum", *, tag: str) -> list[float]:
        if op != "sum":
            raise ValueError(f"A schedule between replica groups agrees on sums only, got {op!r}.")
        algorithm = self._algorithm
        inner = algorithm.communicator
        own = [*values, 1.0]  # the 1 counts this process
        if inner.is_distributed:
            own = inner.all_reduce_scalars(own, "sum", tag=tag)
        weight = 0.0 if algorithm._healed_in_last_round else 1.0
        total = algorithm._sum_over_groups(torch.tensor(own, dtype=torch.float64) * weight, tag=tag)
        self.world_size = max(1, round(float(total[-1])))
        return [float(v) for v in total[:-1]]


class GroupOuterStep(OuterStepAverager):
    """One replica group's side of DiLoCo / local SGD between groups (see the module docstring).

    Args:
        module: this group's model replica x_g.
        optimizers: the inner optimizers.
        communicator: the communicator *inside* the group (world size 1 for a one-process group).
        rounds: the rounds between groups (a :class:`~lightning_commsgd.ft.quorum.QuorumRounds`).
        tau: H, inner steps between outer steps (an int or a schedule).
        outer_optimizer: builds the outer optimizer from the anchor's tensors (DiLoCo's default: SGD lr 0.7,
            momentum 0.9, Nesterov; :func:`averaging_outer_optimizer` for local SGD).
        round_attempts: attempts of one round (a group dying inside it fails an attempt) before the group
            raises :class:`~lightning_commsgd.ft.quorum.ReplicaGroupError`.
        max_missed_rounds: rounds in a row without a quorum the group trains through locally before it
            stops (0: stop at the first).
        start_groups: groups the job launches: at the start, :meth:`join` waits up to ``start_timeout``
            seconds for that many in one quorum, so that they start together (a group later than that heals
            from the others when it comes).
        start_timeout: see ``start_groups``.
        outer_lr_scheduler: builds an LR scheduler for the outer optimizer, stepped after every outer step.
        group: this group's index in [0, start_groups): every round then tells which groups took part
            (:attr:`live_groups`, one value per group in the round's buffer), and a change is logged with the
            data the live groups hold (:attr:`coverage`). ``None``: not tracked.
        defer_rounds: :meth:`after_optimizer_step` only counts the step, and :meth:`run_due_round` runs a
            round it found due: for adapters whose state is consistent only between batches (the Lightning
            Trainer's loop is mid-batch inside the optimizer step; a peer healing from this group takes that
            state).
        momentum: the inner optimizer state at a round: ``"local"`` (kept, DiLoCo's), ``"zero"`` (reset) or
            ``"average"`` (PR-SGD-Momentum: every group takes the contributors' mean of it; SGD's momentum
            buffers, Adam's moments).
        fragments, sync_delay, local_weight: Streaming DiLoCo's F, d and w (see
            :class:`~lightning_commsgd.algorithms.diloco.StreamingDiLoCo`): each fragment's round is a quorum
            round of its own, at its offset of H; its mean lands d steps later, merged with weight w.
        average_buffers, backup_device: as for :class:`~lightning_commsgd.algorithms.diloco.DiLoCo`.
    """

    round_tags = ("outer_step", "final", "ft_fingerprint", "ft_heal")

    def __init__(
        self,
        module: nn.Module,
        optimizers: Sequence[Optimizer],
        communicator: Communicator,
        rounds: QuorumRounds,
        *,
        tau: int | PeriodSchedule = 500,
        outer_optimizer: OuterOptimizerFactory | None = None,
        outer_lr_scheduler: SchedulerFactory | None = None,
        round_attempts: int = 3,
        max_missed_rounds: int = 3,
        start_groups: int = 1,
        start_timeout: float = 60.0,
        momentum: str = "local",
        average_buffers: bool = True,
        backup_device: str | torch.device | None = None,
        fragments: int | list[list[str]] = 1,
        sync_delay: int = 0,
        local_weight: float = 0.0,
        defer_rounds: bool = False,
        group: int | None = None,
    ) -> None:
        check_group_options(round_attempts, max_missed_rounds, start_groups, start_timeout)
        kwargs: dict[str, Any] = {} if outer_optimizer is None else {"outer_optimizer": outer_optimizer}
        # "average" (PR-SGD-Momentum): the inner optimizer state rides in the round and every group takes the
        # contributors' mean; the outer step itself keeps the state ("local")
        averaged_state = ReplicaState(module, optimizers, "average", False) if momentum == "average" else None
        if averaged_state is not None and (fragments != 1 or sync_delay):
            raise ValueError('Arg `momentum="average"` works with one fragment and sync_delay=0 only.')
        super().__init__(
            module,
            optimizers,
            communicator,
            tau=tau,
            outer_lr_scheduler=outer_lr_scheduler,
            momentum="local" if momentum == "average" else momentum,
            fragments=fragments,
            sync_delay=sync_delay,
            local_weight=local_weight,
            average_buffers=average_buffers,
            backup_device=backup_device,
            **kwargs,
        )
        self.module = module
        self._averaged_state = averaged_state
        self._state_flat: FlatBuffer | None = None
        self._arrived_state: tuple[list[Tensor], Tensor] | None = None  # the mean state, with the round
        self.rounds_between_groups = rounds
        self.round_attempts = round_attempts
        self.max_missed_rounds = max_missed_rounds
        self.start_groups, self.start_timeout = start_groups, float(start_timeout)
        self._grad_flat: FlatBuffer | None = None  # the gradients' buffer inside a group of several processes
        self._healed_in_last_round = False
        self._schedule_scalars = _SchedulerScalars(self)  # how a schedule (AdaComm) agrees between groups
        self.defer_rounds = bool(defer_rounds)
        self._round_due = False  # defer_rounds: a round counted due, not run yet
        #: the quorum :meth:`start` joined (``healed``: this group took a live peer's state)
        self.membership: Membership | None = None
        #: this group's index (it fills its slot of the rounds' presence vector), ``None``: not reported
        self.group = group
        if group is not None and not 0 <= group < start_groups:
            raise ValueError(f"Arg `group` must lie in [0, start_groups={start_groups}), got {group!r}.")
        #: the groups of the latest round (contributing or healing), by index
        self.live_groups: tuple[int, ...] = ()
        #: set by an adapter whose data placement is redundant (RI-SGD): missing groups -> (the fraction of
        #: the training data the live groups hold, the shards none of them holds completely; ``None`` from it:
        #: not known yet)
        self.coverage: Callable[[list[int]], tuple[float, list[int]] | None] | None = None
        self.data_coverage: float | None = None
        self.lost_shards: list[int] = []
        self.missed_rounds = 0  # in a row
        self.last_contributors = 0
        #: (step, contributing groups, whether this group contributed) of every completed round
        self.round_history: list[tuple[int, int, bool]] = []
        #: the group's :class:`~lightning_commsgd.ft.connect.GroupConnection` when this object owns it
        #: (:func:`~lightning_commsgd.ft.connect_replica_group`): it keeps the group's key-value store, which
        #: the other groups connect to, alive as long as the algorithm
        self.connection: Any = None
        self._pending: Membership | None = None  # a quorum begun by join(), used by the next round
        # "start" while join() gathers the groups, then "train"; a group that heals takes its peer's
        self._phase = "start"
        self._peer_phase = "start"
        self._extra_state: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {}
        self.fingerprint = self._fingerprint()

    # -- inside the group: DDP's gradient mean, so that the group's processes hold one replica ------------
    @property
    def exchanges_gradients(self) -> bool:  # type: ignore[override]
        """A group of several processes averages their gradients every step (one all-reduce inside the group,
        tag ``group_gradients``); between groups only the rounds travel."""
        return self.communicator.is_distributed

    def after_backward(self) -> None:
        if not self.communicator.is_distributed:
            return
        params = [p for p in self.module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self._grad_flat is None or not self._grad_flat.matches(grads):
            self._grad_flat = FlatBuffer(grads)
        with torch.no_grad():
            buffer = self.communicator.all_reduce_(self._grad_flat.pack(grads), "mean", tag="group_gradients")
            for p, view in zip(params, self._grad_flat.views(buffer)):
                if p.grad is None:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)

    # -- what identifies a run: groups that differ here must not average -----------------------------
    def _fingerprint(self) -> dict[str, str]:
        named = list(self.module.named_parameters())
        outer = self.outer_optimizers[0]
        return {
            "model": ";".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in named),
            "tau": f"{type(self.schedule).__name__}:{self.tau}",
            "outer_optimizer": f"{type(outer).__name__}:{sorted(outer.defaults.items())}",
            "inner_optimizers": ",".join(type(o).__name__ for o in self.replica.optimizers),
            "momentum": "average" if self._averaged_state is not None else str(self.replica.momentum),
            # what shapes a round's buffer: groups that differ here would all-reduce buffers of other sizes
            "streaming": f"F={len(self.fragments)},d={self.sync_delay},w={self.local_weight}",
            "buffers": str(len(self.fragments[0].tensors) - len(self.fragments[0].params)),
            "processes_per_group": str(self.communicator.world_size),
            "tracked_groups": "none" if self.group is None else f"of {self.start_groups}",
        }

    def register_extra_state(self, name: str, save: Callable[[], Any], load: Callable[[Any], None]) -> None:
        """State the adapter owns that a healing group must take from its peer (e.g. the sampler position):
        ``save()`` on the live peer, ``load(value)`` on the group that heals."""
        if name in self._extra_state:
            raise ValueError(f"Extra state {name!r} is registered already.")
        self._extra_state[name] = (save, load)

    # -- the state a group heals from ----------------------------------------------------------------
    def group_state(self) -> dict[str, Any]:
        """Everything a healing group takes from this one (copies: the peer goes on training meanwhile)."""
        with torch.no_grad():
            state = {
                "phase": self._phase,
                "fingerprint": dict(self.fingerprint),
                "algorithm": self.state_dict(),
                "module": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
                "optimizers": [copy.deepcopy(opt.state_dict()) for opt in self.replica.optimizers],
                "extra": {name: save() for name, (save, _) in self._extra_state.items()},
            }
        # torchft sends it over HTTP: its tensors' bytes go in the ledger (tag ft_heal), like any round's
        self.communicator.ledger.record("ft_heal", sent=_tensor_bytes(state), received=0, seconds=0.0)
        return state

    def load_group_state(self, state: dict[str, Any]) -> None:
        """Take a live peer's :meth:`group_state` (called by the torchft manager while a quorum forms)."""
        mismatch = fingerprint_mismatch(self.fingerprint, state["fingerprint"])
        if mismatch:
            theirs = state["fingerprint"]
            details = "; ".join(
                f"{k}: this group {self.fingerprint.get(k)!r}, the live groups {theirs.get(k)!r}"
                for k in mismatch
            )
            raise ReplicaGroupError(f"This group cannot join: its configuration differs ({details}).")
        self.load_state_dict(state["algorithm"])
        self.module.load_state_dict(state["module"])
        for opt, saved in zip(self.replica.optimizers, state["optimizers"]):
            opt.load_state_dict(saved)
        self._peer_phase = state["phase"]
        for name, (_, load) in self._extra_state.items():
            load(state["extra"][name])
        self.communicator.ledger.record("ft_heal", sent=0, received=_tensor_bytes(state), seconds=0.0)
        self.rounds_between_groups.note_healed()

    def register_with(self, manager: Any) -> None:
        """Register :meth:`group_state` / :meth:`load_group_state` with the torchft manager (healing)."""
        manager.register_state_dict_fn(STATE_KEY, self.load_group_state, self.group_state)

    # -- joining -------------------------------------------------------------------------------------
    def join(self) -> Membership:
        """Before this group's first step: meet the other groups.

        In a fresh job the groups check that they run the same configuration, and wait (up to
        ``start_timeout``) until ``start_groups`` of them are in one quorum, so that they start together. A
        group that (re)starts while the others train heals from a live peer, takes part in their round with
        weight 0 and lands its outer step: from then on it is in lockstep with them.

        Returns the quorum it joined; ``healed`` is True only for a group that joined a running job.
        """
        rounds = self.rounds_between_groups
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                membership = rounds.begin()
            except QuorumUnavailableError as err:
                raise QuorumUnavailableError(f"Replica group could not join at start: {err}") from err
            if membership.healed and self._peer_phase == "train":
                self._pending = membership
                self._round_due = False  # the peer's round, which this group takes part in now
                self._rounds_at_this_step()
                break
            waiting = membership.groups < self.start_groups and time.monotonic() < deadline
            if self.communicator.is_distributed:  # one decision per group: its processes' clocks differ
                (votes,) = self.communicator.all_reduce_scalars([float(waiting)], "sum", tag="ft_start")
                waiting = votes > 0
            if not self._check_fingerprints(waiting):  # no group waits for more any longer
                # a group that came while the others were still starting took their x_0: a fresh start
                membership = dataclasses.replace(membership, healed=False)
                break
            time.sleep(0.05)
        self._phase = "train"
        return membership

    def _check_fingerprints(self, waiting: bool) -> bool:
        """One small all-reduce: for each fingerprint field, the sums of h, h^2 and 1 over the groups (the
        groups agree on a field iff n sum h^2 = (sum h)^2), and how many groups still wait for more. Returns
        whether any does (then every group of the quorum meets again)."""
        keys = sorted(self.fingerprint)
        hashes = [float(_hash(self.fingerprint[k])) for k in keys]
        rows = [[h, h * h] for h in hashes] + [[1.0, float(waiting)]]
        stats = torch.tensor(rows, dtype=torch.float64)
        rounds = self.rounds_between_groups
        rounds.sum_(stats, tag="ft_fingerprint")
        if not rounds.commit():
            raise ReplicaGroupError(
                "The replica groups' first round failed (a group died while the job started)."
            )
        n = float(stats[-1, 0])
        differ = [k for k, (total, squares) in zip(keys, stats[:-1].tolist()) if n * squares != total * total]
        if differ:
            raise ReplicaGroupError(
                f"The replica groups run different configurations: {', '.join(differ)} differ between groups "
                f"(this group: {', '.join(f'{k}={self.fingerprint[k]!r}' for k in differ)})."
            )
        return float(stats[-1, 1]) > 0

    def start(self) -> None:
        """:meth:`join` (the protocol's hook before the first step); the quorum is :attr:`membership`."""
        self.membership = self.join()

    # -- a round between groups ----------------------------------------------------------------------
    def after_optimizer_step(self) -> bool:
        if not self.defer_rounds:
            return super().after_optimizer_step()
        self._fresh = [False] * len(self.fragments)
        if self.streaming:  # counted now; what lands or leaves at this step does so at the batch's end
            self.step += 1
            self.schedule.on_step(self.step, self._learning_rate(), self._loss_sum, self._loss_count)
            self._loss_sum, self._loss_count = 0.0, 0
            self._round_due = True
        else:
            self._round_due = self._count_step()
        return False

    def run_due_round(self) -> bool:
        """With ``defer_rounds``: the round the latest :meth:`after_optimizer_step` found due, if any (call it
        at the end of the batch). Returns whether one ran."""
        if not self._round_due:
            return False
        self._round_due = False
        return self._rounds_at_this_step()

    def _run_round(self) -> None:
        """The outer step, then the schedule's decision, which agrees between groups through
        :class:`_SchedulerScalars` (AdaComm's losses; the others need nothing): every group rounds at the same
        steps. Without a quorum for it the schedule keeps its tau and decides at a later round."""
        self.communicate("average")
        self.last_round_step = self.step
        self.rounds += 1
        try:
            info = RoundInfo(self.step, self.rounds, self._schedule_scalars)  # type: ignore[arg-type]
            self.schedule.after_round(info)
        except _ScheduleRoundMissed as missed:
            _log.warning("The schedule keeps tau=%d at step %d: %s", self.schedule.tau, self.step, missed)

    def _sum_over_groups(self, buffer: Tensor, *, tag: str) -> Tensor:
        """``buffer`` summed over the groups of a quorum round of its own (retried like a round)."""
        rounds = self.rounds_between_groups
        for _ in range(self.round_attempts):
            try:
                rounds.begin()
            except QuorumUnavailableError as err:
                raise _ScheduleRoundMissed(str(err)) from err
            total = buffer.clone()
            rounds.sum_(total, tag=tag)
            if rounds.commit():
                return total
        raise ReplicaGroupError(
            f"The schedule's round at step {self.step} failed {self.round_attempts} times in a row (groups "
            "kept failing inside it); raise `round_attempts` if groups restart this often."
        )

    def _rounds_at_this_step(self) -> bool:
        """What the schedule has at the current step: Streaming DiLoCo's landing and fragment sync, or the
        whole model's outer step."""
        if self.streaming:
            return self._streaming_rounds()
        self._run_round()
        return True

    def communicate(self, tag: str) -> None:
        """One outer step of the whole model (one fragment) with the groups of the next quorum."""
        self._send(0, tag=tag, apply_step=self.step)
        self._land(tag=tag)

    def _send(self, f: int, *, tag: str, apply_step: int, seed_offset: int = 0) -> None:
        """Fragment f's round with the groups of the next quorum: the mean of the contributors'
        pseudo-gradients (and inner optimizer state, PR-SGD-Momentum) is in flight until ``apply_step``. A
        missed quorum leaves nothing in flight: the fragment keeps its local value and its anchor, and its
        next round carries the steps since."""
        tag = "final" if tag == "final" else "outer_step"
        fragment = self.fragments[f]
        self._refuse_nonfinite(fragment.tensors)
        n = fragment.param_numel
        state = self._averaged_state.optimizer_tensors() if self._averaged_state is not None else []
        with torch.no_grad():
            message = self._pack_fragment(f).clone()
            message[:n] = self.anchors[f].to(self.device) - message[:n]
            size = message.numel()  # the fragment's part; the optimizer state to average follows it
            if state:
                if self._state_flat is None or not self._state_flat.matches(state):
                    self._state_flat = FlatBuffer(state, dtype=torch.float32)
                message = torch.cat([message, self._state_flat.pack(state)])
        try:
            mean = self._mean_over_groups(message, tag=tag)
        except QuorumUnavailableError as err:
            self._missed_round(err)
            return
        self.missed_rounds = 0
        self._arrived_state = (state, mean[size:]) if state else None
        self.in_flight = _InFlight(f, apply_step, lambda: mean[:size])

    def _land(self, *, tag: str, local_weight: float | None = None) -> None:
        if self.in_flight is None:  # the round was missed: nothing arrives
            return
        super()._land(tag=tag, local_weight=local_weight)
        if self._arrived_state is not None:
            state, mean = self._arrived_state
            self._arrived_state = None
            assert self._state_flat is not None
            with torch.no_grad():
                self._state_flat.unpack(state, mean)

    def _missed_round(self, err: QuorumUnavailableError) -> None:
        """No quorum: train on locally, or stop past ``max_missed_rounds`` in a row."""
        self.missed_rounds += 1
        if self.missed_rounds > self.max_missed_rounds:
            raise QuorumUnavailableError(
                f"Replica group stops at step {self.step}: {self.missed_rounds} rounds in a row without "
                f"a quorum (max_missed_rounds={self.max_missed_rounds}); it trained on locally since its "
                f"last round at step {self.round_history[-1][0] if self.round_history else 0}. {err}"
            ) from err
        _log.warning(
            "No quorum of replica groups at step %d: training on locally (%d of at most %d missed rounds "
            "in a row). %s",
            self.step,
            self.missed_rounds,
            self.max_missed_rounds,
            err,
        )

    def _mean_over_groups(self, message: Tensor, *, tag: str) -> Tensor:
        """The mean of the contributing groups' messages. In a group of p processes (which hold one replica),
        process r carries slice r of the message between groups, and the group all-gathers the slices' means:
        each process sends 1/p of the message between groups."""
        inner = self.communicator
        if not inner.is_distributed:
            return self._slice_mean_over_groups(message, tag=tag)
        n, p = message.numel(), inner.world_size
        chunk = -(-n // p)
        padded = torch.cat([message, message.new_zeros(chunk * p - n)]) if chunk * p != n else message
        mine = padded[inner.rank * chunk : (inner.rank + 1) * chunk].clone()
        mean = self._slice_mean_over_groups(mine, tag=tag)
        return torch.cat(inner.all_gather(mean, tag="group_gather"))[:n]

    def _slice_mean_over_groups(self, message: Tensor, *, tag: str) -> Tensor:
        """The mean of the contributing groups' ``message``: weight 1 each, 0 for a group that healed in this
        round (it holds its peer's state, so its message would count the peer twice)."""
        rounds = self.rounds_between_groups
        healed = False
        size = message.numel()
        # which groups are in the round: one slot per group index, set by its own group (G values)
        presence = message.new_zeros(self.start_groups if self.group is not None else 0)
        if self.group is not None:
            presence[self.group] = 1.0
        for _ in range(self.round_attempts):
            membership, self._pending = self._pending or rounds.begin(), None
            healed = healed or membership.healed
            weight = 0.0 if healed else 1.0
            buffer = torch.cat([message * weight, message.new_full((1,), weight), presence])
            rounds.sum_(buffer, tag=tag)
            if rounds.commit():
                contributors = float(buffer[size])
                if contributors < 0.5:
                    raise ReplicaGroupError(f"No replica group contributed to the round at step {self.step}.")
                self.last_contributors = round(contributors)
                self._healed_in_last_round = healed
                self.round_history.append((self.step, self.last_contributors, not healed))
                if self.group is not None:
                    live = tuple(int(g) for g in torch.nonzero(buffer[size + 1 :] > 0.5).flatten().tolist())
                    self._note_live_groups(live)
                return buffer[:size].div_(contributors)
        raise ReplicaGroupError(
            f"The round at step {self.step} failed {self.round_attempts} times in a row (groups kept failing "
            "inside it); raise `round_attempts` if groups restart this often."
        )

    def _note_live_groups(self, live: tuple[int, ...]) -> None:
        """The groups of the latest round; when they change, what the data placement still covers is
        logged (and kept for :meth:`metrics`)."""
        if live == self.live_groups:
            return
        self.live_groups = live
        missing = [g for g in range(self.start_groups) if g not in live]
        line = f"Replica groups at step {self.step}: {len(live)} of {self.start_groups} live"
        line += f" (missing: {', '.join(map(str, missing))})" if missing else ""
        covered = self.coverage(missing) if self.coverage is not None else None
        if covered is not None:
            self.data_coverage, self.lost_shards = covered
            lost = "no shard lost"
            if self.lost_shards:
                shards = ", ".join(map(str, self.lost_shards))
                lost = f"lost shards (no live group holds them whole): {shards}"
            line += f"; the live groups hold {self.data_coverage:.1%} of the training data, {lost}"
        (_log.warning if missing else _log.info)(line)

    def close(self) -> None:
        """Leave the groups: shut this group's torchft manager down (its servers and threads)."""
        self.rounds_between_groups.close()

    def finalize(self) -> None:
        """A round still due runs; then the fragment in flight lands and every fragment with steps since its
        latest round takes one more (tag ``final``), merged with weight 0."""
        self.run_due_round()
        super().finalize()

    def metrics(self) -> dict[str, float]:
        return {
            **super().metrics(),
            **self.rounds_between_groups.metrics(),
            "ft_contributors": float(self.last_contributors),
            "ft_missed_rounds": float(self.missed_rounds),
            **({"ft_live_groups": float(len(self.live_groups))} if self.group is not None else {}),
            **(
                {"ft_data_coverage": self.data_coverage, "ft_lost_shards": float(len(self.lost_shards))}
                if self.data_coverage is not None
                else {}
            ),
        }
