"""The strategies of the scaling model: each turns (workload, link, n) into a :class:`Prediction` of one
epoch. Which link is the bottleneck is said per strategy (a star: every worker one link of rate B; see
:mod:`lightning_commsgd.planning.model`).

Symbols: n workers, P parameters, t_c compute per step, tau the averaging period, B the link rate, alpha the
latency, S a payload in bytes, s = steps per worker per epoch. The parameter server and compressed SGD with a
master are in :mod:`lightning_commsgd.planning.servers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from lightning_commsgd.planning.formats import FP32, PayloadFormat
from lightning_commsgd.planning.model import (
    Link,
    Prediction,
    Workload,
    lowp_mean,
    ring_allreduce,
)

__all__ = [
    "DDP",
    "GOSSIP_TOPOLOGIES",
    "Averaging",
    "Gossip",
    "StrategyModel",
    "check_int",
    "diloco",
    "gossip_degree",
    "local_sgd",
    "overlap_local_sgd",
    "streaming_diloco",
]

MiB = 1 << 20


class StrategyModel(Protocol):
    """What the planner asks of a strategy: a label and a prediction (``None``: not defined for ``n``,
    e.g. a torus on a non-square number of workers)."""

    @property
    def label(self) -> str: ...

    def predict(self, workload: Workload, link: Link, n: int) -> Prediction | None: ...


def check_int(value: object, name: str, minimum: int = 1) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int >= ``minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Arg `{name}` must be an int >= {minimum}, got {value!r}.")


@dataclass(frozen=True)
class DDP:
    """``DistributedDataParallel``: a ring all-reduce of the fp32 gradients (4P bytes) every step, in
    buckets (torch's default: the first 1 MiB, then 25 MiB each), each bucket ``2 (n-1)`` latency steps:
    per step ``buckets x 2 (n-1) alpha + 2 (n-1)/n 4P / B``. Bottleneck: every worker's link equally.

    Backward overlap (DDP starts a bucket's all-reduce while backward still computes earlier layers) is
    *not* modelled by default: ``overlap`` is the share of t_c that can hide the all-reduce
    (``max(0, comm - overlap t_c)`` per step); 0 matches the CPU/gloo measurements of this project, where
    DDP's train loop was floor + bytes / B within 3%.
    """

    overlap: float = 0.0
    first_bucket_bytes: int = MiB
    bucket_bytes: int = 25 * MiB

    def __post_init__(self) -> None:
        if not 0 <= self.overlap <= 1:
            raise ValueError(f"Arg `overlap` must be in [0, 1], got {self.overlap!r}.")

    @property
    def label(self) -> str:
        return "DDP" if not self.overlap else f"DDP (overlap {self.overlap:g})"

    def buckets(self, params: int) -> int:
        """Gradient buckets of a model of ``params`` fp32 parameters."""
        nbytes = 4 * params
        if nbytes <= self.first_bucket_bytes:
            return 1
        return 1 + math.ceil((nbytes - self.first_bucket_bytes) / self.bucket_bytes)

    def predict(self, workload: Workload, link: Link, n: int) -> Prediction:
        steps = workload.steps(n)
        seconds, sent = ring_allreduce(4.0 * workload.params, n, link)
        seconds += (self.buckets(workload.params) - 1) * 2 * (n - 1) * link.latency
        unhidden = max(0.0, seconds - self.overlap * workload.step_seconds)
        floor = steps * workload.step_seconds
        return Prediction.of_rounds(
            self.label, n, floor, steps, unhidden, sent, "every worker's link (ring all-reduce)", sent
        )


@dataclass(frozen=True)
class Averaging:
    """Periodic averaging (local SGD / PR-SGD-Momentum, DiLoCo, Overlap Local-SGD, Streaming DiLoCo): every
    tau steps the mean of ``state_copies x P`` values (parameters; with ``state_copies=2`` the SGD momentum
    too; 3 for Adam's two moments) in ``payload``, as :func:`~lightning_commsgd.planning.model.lowp_mean`
    sends it (fp32: ring all-reduce; 2 workers: gathered form; n >= 3: reduce-scatter + all-gather). Per
    epoch ``s / tau`` rounds.

    ``fragments`` > 1 (Streaming DiLoCo): each round sends one of ``fragments`` equal parts, ``fragments``
    rounds per tau steps. ``hide_steps`` > 0: the round runs in the background for that many steps of
    compute (Overlap Local-SGD: tau; Streaming DiLoCo: its sync delay), leaving
    ``max(0, round - hide_steps x t_c)`` unhidden. Bottleneck: every worker's link equally.
    """

    tau: int
    payload: PayloadFormat = FP32
    state_copies: int = 2
    hide_steps: int = 0
    fragments: int = 1
    name: str = "local SGD"

    def __post_init__(self) -> None:
        check_int(self.tau, "tau")
        check_int(self.state_copies, "state_copies")
        check_int(self.hide_steps, "hide_steps", 0)
        check_int(self.fragments, "fragments")

    @property
    def label(self) -> str:
        return f"{self.name} tau={self.tau} {self.payload.name}"

    def round_seconds(self, workload: Workload, link: Link, n: int) -> tuple[float, float]:
        """(seconds, bytes each worker sends) of one round (one fragment's, with fragments)."""
        values = math.ceil(self.state_copies * workload.params / self.fragments)
        return lowp_mean(values, self.payload, n, link)

    def predict(self, workload: Workload, link: Link, n: int) -> Prediction:
        steps = workload.steps(n)
        rounds = steps / self.tau * self.fragments
        seconds, sent = self.round_seconds(workload, link, n)
        unhidden = max(0.0, seconds - self.hide_steps * workload.step_seconds)
        floor = steps * workload.step_seconds
        if self.payload.exact:
            form = "ring all-reduce"
        else:
            form = "all-gather" if n == 2 else "reduce-scatter + all-gather"
        return Prediction.of_rounds(
            self.label, n, floor, rounds, unhidden, sent, f"every worker's link ({form})", sent
        )


def local_sgd(tau: int, payload: PayloadFormat = FP32, state_copies: int = 2) -> Averaging:
    """Blocking local SGD (``LocalSGDStrategy``): ``state_copies`` values per parameter averaged every tau
    steps (2: parameters and SGD momentum, the default ``momentum="average"``; 1: parameters only)."""
    return Averaging(tau, payload, state_copies=state_copies)


def diloco(tau: int, payload: PayloadFormat = FP32) -> Averaging:
    """DiLoCo: the pseudo-gradient (P values) averaged every ``tau`` (H) inner steps, blocking."""
    return Averaging(tau, payload, state_copies=1, name="DiLoCo")


def overlap_local_sgd(tau: int, payload: PayloadFormat = FP32) -> Averaging:
    """Overlap Local-SGD: the parameters' round hidden behind the next ``tau`` steps."""
    return Averaging(tau, payload, state_copies=1, hide_steps=tau, name="overlap local SGD")


def streaming_diloco(
    tau: int, payload: PayloadFormat = FP32, fragments: int = 2, sync_delay: int = 2
) -> Averaging:
    """Streaming DiLoCo: ``fragments`` parts each synced every ``tau`` steps, each sync hidden behind
    ``sync_delay`` steps."""
    return Averaging(
        tau, payload, state_copies=1, hide_steps=sync_delay, fragments=fragments, name="streaming DiLoCo"
    )


GOSSIP_TOPOLOGIES = ("ring", "torus", "exponential", "one_peer_exponential", "complete")


def gossip_degree(topology: str, n: int) -> int | None:
    """Messages one worker sends per gossip round (out-degree; the same number arrive) on ``topology`` with
    ``n`` workers, as :func:`lightning_commsgd.topology.make_topology` builds it: ring ``min(2, n-1)``,
    torus 4 (2 on a 2 x 2 grid; ``None`` unless n is a square), exponential ``ceil(log2 n)``, one-peer
    exponential 1, complete ``n-1``."""
    if topology not in GOSSIP_TOPOLOGIES:
        raise ValueError(f"Unknown topology {topology!r}: use one of {GOSSIP_TOPOLOGIES}.")
    if n < 2:
        return 0
    if topology == "ring":
        return min(2, n - 1)
    if topology == "torus":
        side = math.isqrt(n)
        return None if side * side != n else (2 if side == 2 else 4)
    if topology == "exponential":
        return (n - 1).bit_length()
    if topology == "one_peer_exponential":
        return 1
    return n - 1


@dataclass(frozen=True)
class Gossip:
    """Decentralized SGD: every tau steps each worker sends its ``state_copies x P`` values to each of its
    ``degree`` out-neighbours (and receives as many): ``alpha + degree x S / B`` per round, where S is the
    payload of one model. Bottleneck: each worker's own link (degree x S each way); the cost does not grow
    with n on a fixed-degree graph. The final exact average after training is not part of an epoch."""

    topology: str = "ring"
    tau: int = 1
    payload: PayloadFormat = FP32
    state_copies: int = 2

    def __post_init__(self) -> None:
        gossip_degree(self.topology, 2)  # checks the name
        check_int(self.tau, "tau")
        check_int(self.state_copies, "state_copies")

    @property
    def label(self) -> str:
        suffix = "" if self.payload.exact else f" {self.payload.name}"
        return f"gossip {self.topology} tau={self.tau}{suffix}"

    def predict(self, workload: Workload, link: Link, n: int) -> Prediction | None:
        degree = gossip_degree(self.topology, n)
        if degree is None:
            return None
        values = self.state_copies * workload.params
        message = 4.0 * values if self.payload.exact else self.payload.nbytes(values)
        codec = values * (self.payload.encode_seconds + degree * self.payload.decode_seconds)
        seconds = link.latency + link.seconds(degree * message) + codec
        steps = workload.steps(n)
        rounds = steps / self.tau
        floor = steps * workload.step_seconds
        bottleneck = f"each worker's link ({degree} message(s) a round)"
        return Prediction.of_rounds(
            self.label, n, floor, rounds, seconds, degree * message, bottleneck, degree * message
        )
