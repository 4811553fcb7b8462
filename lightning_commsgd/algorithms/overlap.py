"""Overlap Local-SGD (Wang, Liang, Joshi, ICASSP 2020): the averaging all-reduce runs while the next tau
local steps compute, and each worker is pulled towards the average when it arrives.

Each worker keeps an anchor model z (x_0 at the start). At every round k (every tau optimizer steps)::

    z <- the average started at round k-1 (wait for it; it has had tau local steps to arrive)
    x_i <- (1 - alpha) x_i + alpha z                       (pull towards the anchor)
    v_i <- beta v_i + (z - x_i) / lr;  send z - lr v_i      (anchor momentum; beta = 0 sends x_i)
    start averaging what was sent: the next anchor, used at round k+1

so no worker ever waits for a collective unless the link is slower than tau local steps. With beta = 0
the next anchor is the average of the pulled models. The optimizer's own state (momentum) stays local, as
in the paper. The trajectory does not depend on timing: the average started at round k is applied exactly
at round k+1 (which makes the method testable against a simulation, and resumable: a checkpoint waits for
the average in flight and stores it).

``correction="cocod"`` applies the average as CoCoD-SGD does (Shen et al., IJCAI 2019; a baseline in the
Overlap Local-SGD authors' code): when the average z_k of the models sent at round k arrives (round k+1),
each worker swaps its own round-k model for it and keeps the local progress made since,
x_i <- x_i + (z_k - x_i^(k)), then sends the corrected model. The pull drags the mean model back towards a
one-round-old anchor (with beta = 0 it discards alpha of each round's progress); this correction leaves
the mean model exactly where the local steps took it, so it converges like blocking local SGD while the
average travels in the background. alpha and beta do not apply to it.

With a ``compressor`` (``"bf16"``/``"fp16"``/``"int8"``/``"int4"`` or an unbiased compressor object) each
worker sends its change since the anchor, d_i = sent_i - z, through it
(:meth:`Communicator.all_reduce_mean_lowp_`, fp32 accumulation, on a helper thread over a second process
group; :mod:`lightning_commsgd.payload`) and the next anchor is z + mean_i(d_i): half (16 bits), about a
quarter (int8) or a seventh (int4) of the bytes, so the average hides behind fewer local steps. Only the
change is rounded (relative error about 2^-8 of ||d|| for bf16, 2^-11 for fp16; int8 and
int4 round stochastically, unbiased, within 1/127 resp. 1/7 of each block's largest change), and every rank
decodes the same messages, so the anchors stay equal across ranks. Fit's last average sends the changes since
the anchor in the same format. Non-negative buffers (BatchNorm's ``running_var``) travel as their values in
bf16 instead (see :mod:`lightning_commsgd.payload`), so a rounded change can never make a variance negative.

The optimizer's state stays local (``momentum="local"``, the paper) or is reset after every round
(``momentum="zero"``). Averaging it (PR-SGD-Momentum's ``"average"``) is refused: the average arrives one
round late and is folded into a replica that has moved on, by the pull or by CoCoD's correction; for Adam's
second moments the correction x + (z_k - x^(k)) can turn negative, and no paper defines the rule. Use
:class:`~lightning_commsgd.algorithms.PeriodicAverager` (blocking) for averaged optimizer state.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_commsgd.algorithms.base import PeriodicAlgorithm, as_schedule
from lightning_commsgd.algorithms.finite import finite_flags
from lightning_commsgd.algorithms.protocol import AlgorithmConfig, World
from lightning_commsgd.algorithms.replica import ReplicaState
from lightning_commsgd.comm import Communicator, PendingLowpMean, PendingMean
from lightning_commsgd.compression.base import Compressor
from lightning_commsgd.payload import averaging_compressor
from lightning_commsgd.schedules import PeriodSchedule

__all__ = [
    "CORRECTIONS",
    "OVERLAP_MOMENTUM_MODES",
    "OverlapAverager",
    "OverlapLocalSGD",
    "validate_correction",
    "validate_overlap_momentum",
    "validate_pull",
]

CORRECTIONS: tuple[str, ...] = ("pull", "cocod")
#: what happens to the optimizer state at a round (see the module docstring for why not "average")
OVERLAP_MOMENTUM_MODES: tuple[str, ...] = ("local", "zero")


def validate_overlap_momentum(momentum: Any) -> str:
    """``momentum`` if it is one of :data:`OVERLAP_MOMENTUM_MODES`, else a ValueError saying why."""
    if momentum == "average":
        raise ValueError(
            "Arg `momentum` of Overlap Local-SGD must be 'local' (default, the paper) or 'zero', got "
            "'average': its average arrives one round late and is folded into a replica that has moved on, "
            "which gives optimizer state no defined meaning (Adam's second moments could turn negative). "
            "Use LocalSGDStrategy(momentum='average') for PR-SGD-Momentum."
        )
    if momentum not in OVERLAP_MOMENTUM_MODES:
        raise ValueError(f"Arg `momentum` must be one of {OVERLAP_MOMENTUM_MODES}, got {momentum!r}.")
    return str(momentum)


def validate_correction(correction: Any, beta: float) -> str:
    """``correction`` if it is one of :data:`CORRECTIONS` (``cocod`` only with beta = 0), else ValueError."""
    if correction not in CORRECTIONS:
        raise ValueError(f"Arg `correction` must be one of {CORRECTIONS}, got {correction!r}.")
    if correction == "cocod" and beta:
        raise ValueError('Arg `anchor_momentum` must be 0 with correction="cocod" (it applies to "pull").')
    return str(correction)


def validate_pull(
    alpha: Any, beta: Any, names: tuple[str, str] = ("alpha", "beta")
) -> tuple[float, float]:
    """alpha (pull strength) in (0, 1), beta (anchor momentum) in [0, 1); ValueError naming the argument as
    the caller calls it (``names``: the algorithm's ``alpha``/``beta``, the strategy's ``alpha``/
    ``anchor_momentum``).

    Both ends of alpha's range are refused: at alpha = 0 the arrived average never reaches a replica, so
    the replicas never synchronise (independent training, every round's bytes wasted); at alpha = 1 every
    worker would be set to the anchor and send it back (with or without anchor momentum, whose velocity then
    stays 0), so each round's local progress would be discarded and the model would never change (the
    reference implementation behaves the same)."""
    alpha_name, beta_name = names
    for name, value in ((alpha_name, alpha), (beta_name, beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"Arg `{name}` must be a finite number, got {value!r}.")
    if not 0 < alpha < 1:
        raise ValueError(
            f"Arg `{alpha_name}` (the pull towards the arrived average: x <- (1 - {alpha_name}) x + "
            f"{alpha_name} z) must lie strictly between 0 and 1, got {alpha}: at 0 the replicas would never "
            "synchronise, at 1 every round's local progress would be discarded."
        )
    if not 0 <= beta < 1:
        raise ValueError(f"Arg `{beta_name}` (the anchor momentum) must lie in [0, 1), got {beta}.")
    return float(alpha), float(beta)


class OverlapAverager(PeriodicAlgorithm):
    """Overlap Local-SGD on one rank (see the module docstring).

    Args:
        module: the replica x_i (parameters; floating buffers too with ``average_buffers``).
        optimizers: its optimizers (their state stays local).
        communicator: carries the background all-reduce (tag ``"overlap_average"``).
        tau: local steps between rounds (an int or a schedule).
        alpha: pull strength alpha in (0, 1) (1 would send the anchor back unchanged: no progress).
        beta: anchor momentum beta in [0, 1) (the paper's momentum variant; 0: plain).
        average_buffers: treat floating buffers (BatchNorm statistics) like parameters.
        compressor: Q, ``None`` (fp32 average), a codec name (``"bf16"`` / ``"fp16"``, ``"int8"``, ``"int4"``)
            or an unbiased compressor: the change since the anchor travels through it, accumulated in fp32
            (see the module docstring).
        correction: how the arrived average is applied: ``"pull"`` (the paper's x <- (1-alpha) x + alpha z)
            or ``"cocod"`` (x <- x + z - x^(k): swap the sent model for the average, keep the progress since).
        momentum: the optimizer state at a round: ``"local"`` (default, the paper: never touched) or
            ``"zero"`` (reset after every round); ``"average"`` is refused (see the module docstring).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizers: Sequence[Optimizer],
        communicator: Communicator,
        *,
        tau: int | PeriodSchedule = 8,
        alpha: float = 0.5,
        beta: float = 0.0,
        average_buffers: bool = True,
        compressor: str | Compressor | None = None,
        correction: str = "pull",
        momentum: str = "local",
    ) -> None:
        self.alpha, self.beta = validate_pull(alpha, beta)
        self.correction = validate_correction(correction, self.beta)
        self.compressor = averaging_compressor(compressor)
        self.momentum = validate_overlap_momentum(momentum)
        super().__init__(ReplicaState(module, optimizers, self.momentum, average_buffers), communicator, tau)
        tensors = self.replica.averaged_tensors()
        # running variances: the packed tail, sent as values (not changes) in a rounded payload
        self._nonnegative = sum(t.numel() for t in self.replica.averaged_sections()[1])
        self.anchor: Tensor = self._pack(tensors).to(torch.float32).clone()  # z_0 = x_0
        self.velocity: Tensor | None = torch.zeros_like(self.anchor) if self.beta else None
        self._pending: PendingMean | PendingLowpMean | _Arrived | None = None
        self._snapshot: Tensor | None = None  # cocod: this worker's model as sent at the latest round
        self.synced_at_step = 0  # the step of the latest exact (blocking) average

    round_tags = ("overlap_average", "final")

    @property
    def in_sync(self) -> bool:
        return self.step == self.synced_at_step

    def _learning_rate(self) -> float:
        lr = super()._learning_rate()
        return lr if lr else 1.0

    def _arrived_anchor(self) -> bool:
        """Wait for the average in flight (if any) and make it the anchor; True when one arrived."""
        if self._pending is None:
            return False
        arrived = self._pending.wait()
        self._pending = None
        # 16-bit payloads carry the mean change since the anchor, fp32 ones the mean itself and the finite
        # flags (divided by p with it): a replica that was poisoned when it sent raises on every rank here
        if self.compressor is not None:
            split = arrived.numel() - self._nonnegative  # the non-negative tail arrives as values
            self.anchor[:split].add_(arrived[:split])  # in place: a round allocates nothing model-sized here
            self.anchor[split:].copy_(arrived[split:])
        else:
            p = self.communicator.world_size
            self._check_flags(arrived[-p:] * p, self.communicator)
            self.anchor = arrived[:-p]
        return True

    def _apply_arrival(self, x: Tensor) -> None:
        """Wait for the average in flight and apply it to ``x`` (this worker's packed model) as
        ``correction`` says."""
        arrived = self._arrived_anchor()
        if self.correction == "pull":
            x.mul_(1 - self.alpha).add_(self.anchor, alpha=self.alpha)
        elif arrived:
            assert self._snapshot is not None
            x.add_(self.anchor - self._snapshot)

    def communicate(self, tag: str) -> None:
        tensors = self.replica.averaged_tensors()
        x = self._pack(tensors).to(torch.float32)
        self._apply_arrival(x)
        if self.correction == "cocod":
            self._snapshot = x.clone()
        if self.velocity is not None:
            lr = self._learning_rate()
            # the same arithmetic as (anchor - x) / lr and anchor - lr v, in one scratch buffer
            scratch = torch.sub(self.anchor, x).div_(lr)
            self.velocity.mul_(self.beta).add_(scratch)
            outgoing = torch.sub(self.anchor, torch.mul(self.velocity, lr, out=scratch), out=scratch)
        else:
            outgoing = x.clone()
        self._unpack(tensors, x)
        if self.compressor is not None:
            self._refuse_nonfinite([x])
            split = outgoing.numel() - self._nonnegative
            outgoing[:split] -= self.anchor[:split]
            self._pending = self.communicator.all_reduce_mean_lowp_async(
                outgoing,
                self.compressor,
                tag="overlap_average",
                seed=self.step,
                nonnegative=self._nonnegative,
            )
        else:
            comm = self.communicator
            finite = self._replica_finite([x])
            flags = finite_flags(finite, comm.rank, comm.world_size, outgoing.device)
            outgoing = torch.cat([outgoing if finite else torch.zeros_like(outgoing), flags])
            self._pending = comm.all_reduce_mean_async(outgoing, tag="overlap_average")
        if self.momentum == "zero":
            self.replica.reset_optimizer_state()

    # the final average's stochastic rounding: a stream no round uses (rounds are seeded by their step)
    FINAL_SEED_OFFSET = 1 << 40

    def finalize(self) -> None:
        """The average in flight lands, then one blocking average of the replicas as they are: every
        replica equal. (Neither correction is applied first: the mean follows anyway, and cocod's correction
        has mean zero.) Exact in fp32; with a ``compressor``, each replica's change since the anchor travels
        through it like a round's, so the last average costs what a round does."""
        self._arrived_anchor()
        if self.in_sync:
            return
        tensors = self.replica.averaged_tensors()
        if self.compressor is not None:
            self._refuse_nonfinite(tensors)
            packed = self._pack(tensors)
            split = packed.numel() - self._nonnegative
            delta = packed.to(torch.float32)
            delta[:split] -= self.anchor[:split]
            seed = self.step + self.FINAL_SEED_OFFSET
            self.communicator.all_reduce_mean_lowp_(
                delta, self.compressor, tag="final", seed=seed, nonnegative=self._nonnegative
            )
            delta[:split] += self.anchor[:split]
            packed.copy_(delta)
            self._unpack(tensors, packed)
        else:
            self._exact_mean_(tensors, tag="final")
        self.synced_at_step = self.step

    def extra_state(self) -> dict[str, Any]:
        # a checkpoint waits for the average in flight: its value is part of the trajectory
        if self._pending is not None:
            self._pending.wait()
        return {
            "anchor": self.anchor.detach().cpu().clone(),
            "velocity": None if self.velocity is None else self.velocity.detach().cpu().clone(),
            # the arrived average (or mean change) of the latest round, not yet applied
            "in_flight": None if self._pending is None else self._pending.wait().detach().cpu().clone(),
            "synced_at_step": self.synced_at_step,
            "snapshot": None if self._snapshot is None else self._snapshot.detach().cpu().clone(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        device = self.anchor.device
        self.anchor = state["anchor"].to(device).clone()  # updated in place by rounds: never the caller's
        self.velocity = None if state["velocity"] is None else state["velocity"].to(device)
        in_flight = state.get("in_flight")
        # the average was complete when saved (the mean, or the mean change with a compressor): it arrives
        # at once at the next round
        self._pending = None if in_flight is None else _Arrived(in_flight.to(device))
        self.synced_at_step = int(state.get("synced_at_step", 0))
        snapshot = state.get("snapshot")
        self._snapshot = None if snapshot is None else snapshot.to(device)


class _Arrived:
    """An average restored from a checkpoint: already complete."""

    def __init__(self, value: Tensor) -> None:
        self.buffer = value

    def wait(self) -> Tensor:
        return self.buffer


class OverlapLocalSGD(AlgorithmConfig):
    """Overlap Local-SGD (Wang, Liang, Joshi, ICASSP 2020): every ``tau`` steps each worker is pulled towards
    the anchor (the average started one round earlier, which had ``tau`` local steps to arrive) and starts
    the next average in the background; no rank waits for the network unless it is slower than ``tau``
    local steps. The trajectory does not depend on timing; at the end one blocking average leaves every rank
    with the same model. See :class:`OverlapAverager`.

    Args:
        tau: local steps between rounds (an int >= 1 or a schedule).
        alpha: the pull towards the anchor z, in (0, 1): x_i <- (1 - alpha) x_i + alpha z. Default 0.5.
        anchor_momentum: beta in [0, 1), the paper's momentum variant on the anchor; 0 (default) averages
            the pulled models.
        average_buffers: BatchNorm statistics ride with the parameters.
        compressor: Q, ``None`` (default, fp32), a codec name (``"bf16"`` / ``"fp16"``, ``"int8"``,
            ``"int4"``) or an unbiased :class:`~lightning_commsgd.compression.Compressor`: each rank's change
            since the anchor travels through it, summed in fp32 (see
            :mod:`lightning_commsgd.payload`); the messages run on a helper thread over a second process
            group, hidden behind the next tau local steps.
        correction: ``"pull"`` (default, the paper) or ``"cocod"``: apply the arrived average as CoCoD-SGD
            does, x <- x + (z_k - x^(k)); alpha and anchor_momentum are then unused (anchor_momentum must
            be 0).
        momentum: the optimizer state at a round: ``"local"`` (default, the paper) or ``"zero"`` (reset
            after every round). ``"average"`` is refused: the average arrives a round late and would be
            folded into a replica that moved on; use :class:`~lightning_commsgd.algorithms.LocalSGD` for
            PR-SGD-Momentum.
    """

    name = "overlap_local_sgd"

    def __init__(
        self,
        tau: int | PeriodSchedule = 8,
        alpha: float = 0.5,
        anchor_momentum: float = 0.0,
        average_buffers: bool = True,
        compressor: str | Compressor | None = None,
        correction: str = "pull",
        momentum: str = "local",
    ) -> None:
        self.tau = tau if isinstance(tau, PeriodSchedule) else as_schedule(tau).tau
        names = ("alpha", "anchor_momentum")
        self.alpha, self.anchor_momentum = validate_pull(alpha, anchor_momentum, names=names)
        self.average_buffers = bool(average_buffers)
        self.compressor = averaging_compressor(compressor)
        self.correction = validate_correction(correction, self.anchor_momentum)
        self.momentum = validate_overlap_momentum(momentum)

    def build(
        self, module: nn.Module, optimizers: Sequence[Optimizer], communicator: Communicator, world: World
    ) -> OverlapAverager:
        return OverlapAverager(
            module,
            optimizers,
            communicator,
            tau=copy.deepcopy(self.tau),
            alpha=self.alpha,
            beta=self.anchor_momentum,
            average_buffers=self.average_buffers,
            compressor=self.compressor,
            correction=self.correction,
            momentum=self.momentum,
        )
