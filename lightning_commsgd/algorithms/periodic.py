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

Heterogeneous mini-batches (RI-SGD's extension, Haddadpour et al. 2019): with ``weights="samples"`` the
round computes ``x <- sum_j n_j x_j / sum_j n_j`` (and the same for u and the buffers), n_j being the
samples worker j processed since the latest round (reported through :meth:`record_samples`). The count
travels as one extra element of the same buffer: still one all-reduce per round.

Hierarchical local SGD (Lin et al., ICLR 2020 "Don't use large mini-batches, use local SGD"; torch's
``HierarchicalModelAverager``): with ``group_size=g`` and ``global_every=H``, a round averages within
blocks of g consecutive ranks (one node), and every H-th round averages over all ranks. Intra-node links
are fast; only one round in H crosses the slow inter-node network.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_commsgd.algorithms.base import PeriodicAlgorithm, as_schedule, check_choice, validate_period
from lightning_commsgd.algorithms.finite import NONFINITE_POLICIES, finite_flags
from lightning_commsgd.algorithms.protocol import AlgorithmConfig, World
from lightning_commsgd.algorithms.replica import MOMENTUM_MODES, MomentumMode, ReplicaState, check_averageable
from lightning_commsgd.comm import Communicator
from lightning_commsgd.compression.base import Compressor
from lightning_commsgd.payload import averaging_compressor
from lightning_commsgd.schedules import PeriodSchedule

__all__ = [
    "WEIGHT_MODES",
    "LocalSGD",
    "PeriodicAverager",
    "as_schedule",
    "validate_momentum_mode",
    "validate_period",
]

WEIGHT_MODES: tuple[str, ...] = ("uniform", "samples")


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
        weights: ``"uniform"`` (default: the plain mean, (1/p) sum_j x_j) or ``"samples"`` (each worker
            weighted by the samples n_j it processed since the latest round, for per-worker batch sizes
            B_j: sum_j n_j x_j / sum_j n_j; report them with :meth:`record_samples`). The weight travels
            in fp32 with the payload, so a bf16/fp16 model's round is sent in fp32 in this mode.
        compressor: Q, ``None`` (default: the buffer's own dtype, exact mean), a codec name (``"bf16"`` /
            ``"fp16"``, ``"int8"``, ``"int4"``) or an unbiased compressor (see
            :mod:`lightning_commsgd.payload`): each rank sends its change since the latest consensus, d_i =
            x_i - x_anchor, through it; the mean of the d_i is accumulated in fp32
            (:meth:`Communicator.all_reduce_mean_lowp_`) and x <- x_anchor + mean (so only the *change*, not x
            itself, is rounded: a relative error of about 2^-8 (bf16) or 2^-11 (fp16) of the change per round;
            int8 / int4 round stochastically, unbiased, within 1/127 / 1/7 of each block's largest change).
            Half (16 bits), about a quarter (int8) or a seventh (int4) of the bytes of an fp32 all-reduce;
            costs one fp32 copy of the averaged tensors (the anchor, checkpointed). Non-negative state (Adam's
            ``exp_avg_sq`` / ``max_exp_avg_sq``, BatchNorm's ``running_var``) travels as its values in bf16
            instead, which keeps it positive with relative precision (a block-quantized change rounds small
            second moments to 0 and Adam then divides by its eps; see :mod:`lightning_commsgd.payload`).
        group_size: g, ranks per block for hierarchical averaging (consecutive ranks, e.g. one node); must
            divide the world size. ``None`` (default): flat averaging.
        global_every: H, every H-th round averages over all ranks; the others average within the block
            of ``group_size`` ranks (tag ``"average_local"``). 1 (default): every round is global.
        on_nonfinite: a replica with NaN or Inf before a round: ``"raise"`` (default; every rank raises
            :class:`~lightning_commsgd.algorithms.finite.NonFiniteError` in that round, naming the
            ranks and the step) or ``"skip"`` (the round averages the finite replicas only and the poisoned
            ones continue from that average); the flags ride in the round's buffer, 4 p bytes more. With a
            ``compressor`` the flags cannot ride in the rounded payload: a poisoned rank raises before
            sending (the others then stop at that round with a ``RankFailureError`` naming it), and
            ``"skip"`` is refused.

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
        weights: str = "uniform",
        compressor: str | Compressor | None = None,
        group_size: int | None = None,
        global_every: int = 1,
        on_nonfinite: str = "raise",
    ) -> None:
        self.momentum = validate_momentum_mode(momentum)
        nonfinite = check_choice(on_nonfinite, "on_nonfinite", NONFINITE_POLICIES)
        self.global_every = validate_period(global_every, "global_every")
        if group_size is not None:
            validate_period(group_size, "group_size")
        self.hierarchical = group_size is not None and self.global_every > 1
        self.compressor = averaging_compressor(compressor)
        if self.hierarchical and self.compressor is not None:
            raise ValueError("Arg `compressor` does not combine with hierarchical averaging (group_size).")
        self.weights = check_choice(weights, "weights", WEIGHT_MODES)
        if self.compressor is not None and self.weights != "uniform":
            raise ValueError('Arg `compressor` works with weights="uniform" only.')
        if self.compressor is not None and nonfinite == "skip":
            raise ValueError(
                'Arg `on_nonfinite="skip"` needs exact rounds: the finite flags cannot ride in a '
                f"payload compressed by {self.compressor!r}; use on_nonfinite='raise'."
            )
        self.samples_since_round = 0
        super().__init__(ReplicaState(module, optimizers, self.momentum, average_buffers), communicator, tau)
        self.on_nonfinite = nonfinite
        # compressor: the consensus before the first round is x_0 (equal on every rank), zero optimizer
        # state and the initial signed buffers; kept only in that mode (a copy of the model)
        self._initial = (
            (
                [t.detach().clone() for t in self.replica.params],
                [b.detach().clone() for b in self.replica.buffers],
            )
            if self.compressor is not None
            else ([], [])
        )
        self.anchor: torch.Tensor | None = None  # fp32 consensus of the latest round (compressed rounds only)
        # collective: every rank builds its block's communicator here
        self.group_communicator = communicator.split(group_size) if self.hierarchical else communicator
        self.last_global_step = 0
        self._force_global = False

    round_tags = ("average", "average_local", "final")

    @property
    def counts_samples(self) -> bool:
        return self.weights == "samples"

    def record_batch(self, loss: torch.Tensor | float | None = None, samples: int | None = None) -> None:
        self.record_loss(loss)
        if samples is not None:
            self.record_samples(samples)

    def record_samples(self, count: int) -> None:
        """Count ``count`` training samples processed by this worker (its weight at the next round under
        ``weights="samples"``; ignored otherwise). Call it once per batch, before the optimizer step."""
        if self.weights == "samples":
            if count < 0:
                raise ValueError(f"Arg `count` must be >= 0 samples, got {count}.")
            self.samples_since_round += int(count)

    @property
    def in_sync(self) -> bool:
        """True when no local step was taken since the latest global round (all replicas are equal)."""
        return self.step == self.last_global_step

    def average(self, tag: str = "average") -> None:
        """A round outside the schedule, now: x_i (and u_i, buffers per the options) <- their mean over
        all workers (one all-reduce, global also when hierarchical); the next scheduled round counts from
        here."""
        self._force_global = True
        try:
            self.communicate(tag)
        finally:
            self._force_global = False
        self.last_round_step = self.step
        self.rounds += 1

    def _is_global_round(self) -> bool:
        """Every round is global unless hierarchical: then every ``global_every``-th, and any round
        outside the schedule (``average``, ``finalize``)."""
        return not self.hierarchical or self._force_global or (self.rounds + 1) % self.global_every == 0

    def communicate(self, tag: str) -> None:
        signed, nonnegative = self.replica.averaged_sections()
        tensors = [*signed, *nonnegative]
        is_global = self._is_global_round()
        comm = self.communicator if is_global else self.group_communicator
        if not is_global:
            tag = "average_local"
        if comm.is_distributed and tensors:
            head = self.replica.param_numel
            measure = is_global and self._consensus_due()
            local_params = self._pack(tensors)[:head].clone() if measure else None
            if self.weights == "samples":
                mean = self._weighted_mean_(tensors, tag, comm)
            elif self.compressor is not None:
                mean = self._low_precision_mean_(tensors, tag, sum(t.numel() for t in nonnegative))
            else:
                mean = self._exact_mean_(tensors, tag, comm)
            if local_params is not None:
                self._record_consensus(local_params, mean[:head])
        if is_global:
            self.last_global_step = self.step
        self.samples_since_round = 0
        if self.momentum == "zero":
            self.replica.reset_optimizer_state()

    def _weighted_mean_(self, tensors: list[torch.Tensor], tag: str, comm: Communicator) -> torch.Tensor:
        """``tensors`` <- sum_j n_j t_j / sum_j n_j over ranks, n_j riding in the buffer after the data and
        the finite flags after n_j (a skipped poisoned replica sends n_j = 0)."""
        p = comm.world_size
        device = tensors[0].device
        finite = self._replica_finite(tensors)
        samples = float(self.samples_since_round) if finite else 0.0
        weight = torch.tensor(samples, dtype=torch.float32, device=device)
        flags = finite_flags(finite, comm.rank, p, device)
        buffer = self._pack([*tensors, weight, flags])
        body = buffer[: -p - 1]
        if finite:
            body.mul_(buffer[-p - 1])
        else:
            body.zero_()
        comm.all_reduce_(buffer, "sum", tag=tag)
        self._check_flags(buffer[-p:], comm)
        total = float(buffer[-p - 1])
        if total <= 0:
            # every rank sees the same total, so every rank raises; the replicas are still untouched
            raise RuntimeError(
                'weights="samples": no rank recorded any sample since the latest round; call '
                "record_samples(n) for every batch (the Lightning strategies do)."
            )
        body.div_(total)
        self._unpack([*tensors, weight, flags], buffer)
        self._after_skipped_replica(finite)
        return body

    def _low_precision_mean_(self, tensors: list[torch.Tensor], tag: str, nonnegative: int) -> torch.Tensor:
        """Signed values: x <- x_anchor + mean_i(x_i - x_anchor), the changes sent through ``compressor``;
        non-negative ones (second moments, running variances: the last ``nonnegative`` values of
        ``tensors``): v <- mean_i(v_i), the values sent in bf16
        (:data:`~lightning_commsgd.payload.NONNEGATIVE_PAYLOAD`). Summed in fp32."""
        self._refuse_nonfinite(tensors)  # see on_nonfinite: the flags cannot ride in a rounded payload
        buffer = self._pack(tensors)
        if self.anchor is None or self.anchor.numel() != buffer.numel():
            self.anchor = self._initial_anchor(buffer, nonnegative)
        # the anchor's non-negative section is kept at 0, so those values travel as they are
        delta = buffer.to(torch.float32) - self.anchor
        self.communicator.all_reduce_mean_lowp_(
            delta, self.compressor, tag=tag, seed=self.step, nonnegative=nonnegative
        )
        self.anchor += delta
        buffer.copy_(self.anchor)
        self.anchor[self.anchor.numel() - nonnegative :].zero_()
        self._unpack(tensors, buffer)
        return buffer

    def _initial_anchor(self, buffer: torch.Tensor, nonnegative: int) -> torch.Tensor:
        """The consensus before any round, in the buffer's layout: x_0, zero signed optimizer state, the
        signed buffers, then zeros for the non-negative section (sent as values, not changes)."""
        params, buffers = self._initial
        flat = [t.reshape(-1).float() for t in params]
        head = sum(t.numel() for t in flat)
        tail = sum(b.numel() for b in buffers)
        zeros = torch.zeros(buffer.numel() - nonnegative - head - tail, dtype=torch.float32)
        return torch.cat(
            [*flat, zeros.to(buffer.device), *(b.reshape(-1).float() for b in buffers)]
            + [torch.zeros(nonnegative, dtype=torch.float32, device=buffer.device)]
        ).to(buffer.device)

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "samples_since_round": self.samples_since_round,
            "last_global_step": self.last_global_step,
        }
        if self.anchor is not None:
            state["anchor"] = self.anchor.detach().cpu().clone()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.samples_since_round = int(state.get("samples_since_round", 0))
        self.last_global_step = int(state.get("last_global_step", self.last_round_step))
        anchor = state.get("anchor")
        self.anchor = None if anchor is None else anchor.to(self.replica.params[0].device)

    def finalize(self) -> None:
        """A last round so that every replica equals the consensus model (end of training)."""
        if not self.in_sync:
            self.average(tag="final")


class LocalSGD(AlgorithmConfig):
    """Local SGD: each worker steps its own replica; every ``tau`` optimizer steps all replicas are
    replaced by their average (one all-reduce of one flat buffer). No gradient is ever all-reduced.
    Stich (ICLR 2019); PR-SGD-Momentum, Yu, Jin, Yang (ICML 2019); hierarchical: Lin et al. (ICLR 2020).

    Args:
        tau: communication period tau (H in Stich, I in Yu et al.): optimizer steps between rounds, an int
            >= 1, or a :mod:`~lightning_commsgd.schedules` schedule (``AdaComm``, ``PostLocalSGD``,
            ``IncreasingPeriod``) asked after every round; each run works on a copy. Counts calls of the
            optimizer step on every rank, including steps the closure skipped, so all ranks agree; with
            gradient accumulation it counts optimizer steps, not batches.
        momentum: what happens to the optimizer state u_i at a round: ``"average"`` (default,
            PR-SGD-Momentum: u_i <- mean_j u_j in the same buffer, doubling the bytes of a round for SGD with
            momentum; for Adam/AdamW both moments are averaged), ``"local"`` (never touched, torch's
            ``PeriodicModelAverager`` behaviour, any optimizer), ``"zero"`` (state reset after each round,
            any optimizer).
        average_buffers: average floating-point module buffers (BatchNorm running statistics) at each
            round; integer buffers are equal on all ranks and left alone.
        replica_weights: ``"uniform"`` (default, the plain mean) or ``"samples"``: each replica (and its
            optimizer state and buffers) weighted by the samples n_j its rank processed since the latest
            round, x <- sum_j n_j x_j / sum_j n_j (RI-SGD's heterogeneous mini-batch extension; use with
            per-rank batch sizes). The count rides in the averaged buffer (4 more bytes).
        compressor: Q, what each rank's change since the latest round travels through, accumulated in fp32:
            ``None`` (exact fp32 mean), a codec name (``"bf16"`` / ``"fp16"``, ``"int8"``, ``"int4"``) or an
            unbiased :class:`~lightning_commsgd.compression.Compressor` (see :class:`PeriodicAverager` and
            :mod:`lightning_commsgd.payload`).
        global_every: H, hierarchical local SGD: every H-th round averages over all ranks, the others only
            within a block of ``group_size`` ranks; 1 (default) is flat.
        group_size: g, ranks per block (consecutive global ranks); default: the devices per node, so the
            frequent rounds stay on a node's fast links. Must divide the world size.
        on_nonfinite: NaN or Inf in any rank's parameters, optimizer state or buffers before a round:
            ``"raise"`` (default: every rank raises ``NonFiniteError`` in that round, naming the ranks and
            the step) or ``"skip"`` (average the finite replicas only; the poisoned ones continue from that
            average). See :mod:`lightning_commsgd.algorithms.finite`.

    Raises:
        TypeError: ``tau`` not an int or schedule; before the first collective, ``momentum="average"`` with an
            optimizer whose state layout is unknown (e.g. RMSprop), naming it and the alternatives.
        ValueError: out-of-range or unknown values, naming the argument and the allowed values.
    """

    name = "local_sgd"

    def __init__(
        self,
        tau: int | PeriodSchedule = 8,
        momentum: MomentumMode = "average",
        average_buffers: bool = True,
        replica_weights: str = "uniform",
        compressor: str | Compressor | None = None,
        global_every: int = 1,
        group_size: int | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        self.tau = tau if isinstance(tau, PeriodSchedule) else as_schedule(tau).tau
        self.momentum = validate_momentum_mode(momentum)
        self.average_buffers = bool(average_buffers)
        self.replica_weights = check_choice(replica_weights, "replica_weights", WEIGHT_MODES)
        self.compressor = averaging_compressor(compressor)
        if self.compressor is not None and self.replica_weights != "uniform":
            raise ValueError('Arg `compressor` works with replica_weights="uniform" only.')
        self.global_every = validate_period(global_every, "global_every")
        self.group_size = None if group_size is None else validate_period(group_size, "group_size")
        if self.global_every > 1 and self.compressor is not None:
            raise ValueError(
                "Arg `compressor` does not combine with hierarchical averaging (global_every > 1)."
            )
        self.on_nonfinite = check_choice(on_nonfinite, "on_nonfinite", NONFINITE_POLICIES)
        if self.compressor is not None and self.on_nonfinite == "skip":
            raise ValueError('Arg `on_nonfinite="skip"` needs exact rounds (compressor=None).')

    def block_size(self, world: World) -> int:
        """Ranks per hierarchical block: ``group_size``, else the devices of one node."""
        return self.group_size or world.devices_per_node

    def check_world(self, world: World) -> None:
        if self.global_every > 1 and world.size % self.block_size(world):
            raise ValueError(
                f"Arg `group_size` ({self.block_size(world)}) must divide the world size ({world.size})."
            )

    def check_optimizers(self, optimizers: Sequence[Optimizer]) -> None:
        if self.momentum == "average":
            check_averageable(optimizers)  # e.g. RMSprop: TypeError naming it and the alternatives

    def build(
        self, module: nn.Module, optimizers: Sequence[Optimizer], communicator: Communicator, world: World
    ) -> PeriodicAverager:
        return PeriodicAverager(
            module,
            optimizers,
            communicator,
            tau=copy.deepcopy(self.tau),  # a fresh schedule per run; a resume restores its state
            momentum=self.momentum,
            average_buffers=self.average_buffers,
            weights=self.replica_weights,
            compressor=self.compressor,
            group_size=self.block_size(world) if self.global_every > 1 else None,
            global_every=self.global_every,
            on_nonfinite=self.on_nonfinite,
        )
