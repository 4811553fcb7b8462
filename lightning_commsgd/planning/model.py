"""The inputs and the collective costs of the scaling model (alpha-beta model on a star).

The network is a star: every worker (node) has one full-duplex link of rate B to a switch, the switch never
the bottleneck (the emulated cluster of ``benchmarks/emulated_cluster.py`` is exactly that: one rate-limited
veth per node into a bridge). A message of ``m`` bytes from node i to node j costs ``alpha + m / B``: it
leaves through i's link and enters through j's; messages that share a link in the same direction share its
rate. So a collective's time is its number of dependent message steps times alpha (the latency) plus the
bytes the busiest link carries in one direction, over B.

Collectives as the package makes them (gloo; ``lightning_commsgd/comm/lowp.py`` for the low-precision mean):

- ring all-reduce of ``S`` bytes (fp32 all-reduce: DDP's buckets, exact averaging rounds):
  ``2 (n-1) alpha + 2 (n-1)/n S / B``;
- low-precision mean of ``v`` values in a format F: on 2 workers the gathered form (each sends its encoded
  values once, piece by piece, so that encoding and decoding hide behind the link):
  ``alpha + max(F(v) / B, codec)``; on ``n >= 3`` reduce-scatter then all-gather of encoded chunks of
  ``c = ceil(v / n)`` values, each a batch of direct messages to the ``n-1`` peers:
  ``2 alpha + 2 (n-1) F(c) / B + codec`` (the codec's CPU time is not hidden there);
- gossip round: ``alpha + degree x S / B`` (the messages to all out-neighbours leave through the one link);
- gather to a root: ``alpha + (n-1) S / B`` (the root's inbound link); gloo's broadcast is a binomial tree,
  ``ceil(log2 n) (alpha + S / B)``; gloo's all-gather a ring, ``(n-1) (alpha + S / B)``.

Not modelled: TCP/IP headers and protocol overhead (give ``Link(efficiency=...)``, or the measured payload
rate as B), per-message CPU overhead beyond alpha (which makes the all-to-all phases of the low-precision mean
at large n, ``n-1`` messages each, optimistic), stragglers and the variance of step times, contention of the
switch, and congestion control.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_commsgd.planning.formats import PayloadFormat

__all__ = [
    "Link",
    "Prediction",
    "Workload",
    "binomial_broadcast_seconds",
    "gather_seconds",
    "lowp_mean",
    "ring_allgather_seconds",
    "ring_allreduce",
]


def _check(value: object, name: str, *, positive: bool = True, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = isinstance(value, int) or float(value).is_integer()
    if ok:
        ok = value > 0 if positive else value >= 0
    if not ok:
        kind = "an int" if integer else "a finite number"
        raise ValueError(f"Arg `{name}` must be {kind} {'> 0' if positive else '>= 0'}, got {value!r}.")


@dataclass(frozen=True)
class Link:
    """Each worker's link to the switch.

    Args:
        bits_per_second: B, the link rate in bits per second (per direction; full duplex).
        latency: alpha, seconds per dependent message step (one-way start-up of a message).
        efficiency: share of B that carries payload (1.0: B is already the payload rate, e.g. measured;
            about 0.94 for TCP/IP over Ethernet with 1500-byte frames).
    """

    bits_per_second: float
    latency: float = 0.0
    efficiency: float = 1.0

    def __post_init__(self) -> None:
        _check(self.bits_per_second, "bits_per_second")
        _check(self.latency, "latency", positive=False)
        _check(self.efficiency, "efficiency")
        if self.efficiency > 1:
            raise ValueError(f"Arg `efficiency` must be in (0, 1], got {self.efficiency!r}.")

    @property
    def bytes_per_second(self) -> float:
        """Payload bytes per second through the link, B x efficiency / 8."""
        return self.bits_per_second * self.efficiency / 8

    def seconds(self, nbytes: float) -> float:
        """Time to push ``nbytes`` payload bytes through the link (no latency)."""
        return nbytes / self.bytes_per_second


@dataclass(frozen=True)
class Workload:
    """The training job.

    Give either ``steps_per_epoch`` (steps per worker per epoch, whatever the number of workers) or
    ``samples_per_epoch`` and ``batch_size`` (per worker): then the steps shrink with n as under Lightning's
    ``DistributedSampler``, ``ceil(ceil(samples / n) / batch)``.

    Args:
        params: P, the model's parameters (values of one fp32 copy of the model).
        step_seconds: t_c, compute time of one optimizer step on one worker (forward, backward, update).
        steps_per_epoch: optimizer steps per worker per epoch (fixed).
        samples_per_epoch: training samples per epoch (all workers together).
        batch_size: samples per step per worker.
    """

    params: int
    step_seconds: float
    steps_per_epoch: int | None = None
    samples_per_epoch: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        _check(self.params, "params", integer=True)
        _check(self.step_seconds, "step_seconds")
        if (self.steps_per_epoch is None) == (self.samples_per_epoch is None):
            raise ValueError(
                "Give exactly one of `steps_per_epoch` and `samples_per_epoch` (with `batch_size`)."
            )
        if self.steps_per_epoch is not None:
            _check(self.steps_per_epoch, "steps_per_epoch", integer=True)
        else:
            _check(self.samples_per_epoch, "samples_per_epoch", integer=True)
            if self.batch_size is None:
                raise ValueError("`samples_per_epoch` needs `batch_size` (samples per step per worker).")
            _check(self.batch_size, "batch_size", integer=True)

    def steps(self, n: int) -> int:
        """Optimizer steps per worker per epoch with ``n`` workers."""
        if self.steps_per_epoch is not None:
            return int(self.steps_per_epoch)
        assert self.samples_per_epoch is not None and self.batch_size is not None
        return math.ceil(math.ceil(self.samples_per_epoch / n) / self.batch_size)

    def gradients(self, n: int) -> int:
        """Mini-batch gradients per epoch, all workers together (the parameter server's unit of work)."""
        return n * self.steps(n)


@dataclass(frozen=True)
class Prediction:
    """The predicted cost of one epoch of one strategy on ``workers`` workers.

    Attributes:
        strategy: the strategy's label.
        workers: n.
        epoch_seconds: predicted wall-clock of one epoch, ``compute_seconds + comm_seconds``.
        compute_seconds: the compute on the critical path (steps per worker x t_c; the parameter server:
            the updates' compute).
        comm_seconds: communication (and codec / server-update time) not hidden behind compute.
        bytes_per_worker: payload bytes one worker sends per epoch (a non-root worker where roles differ).
        bottleneck: the link that bounds the communication, in words.
        bottleneck_bytes: bytes that link carries per epoch in its busier direction.
        rounds: synchronisation rounds (or updates) per epoch.
        floor_seconds: the compute floor, steps per worker x t_c: the epoch without any communication.
    """

    strategy: str
    workers: int
    epoch_seconds: float
    compute_seconds: float
    comm_seconds: float
    bytes_per_worker: float
    bottleneck: str
    bottleneck_bytes: float
    rounds: float
    floor_seconds: float

    @classmethod
    def of_rounds(
        cls,
        strategy: str,
        workers: int,
        floor: float,
        rounds: float,
        seconds: float,
        sent: float,
        bottleneck: str,
        busiest: float,
    ) -> Prediction:
        """An epoch of ``rounds`` identical rounds on top of the compute ``floor``: each adds ``seconds``
        of unhidden communication, ``sent`` bytes per worker and ``busiest`` bytes on the ``bottleneck``."""
        return cls(
            strategy=strategy,
            workers=workers,
            epoch_seconds=floor + rounds * seconds,
            compute_seconds=floor,
            comm_seconds=rounds * seconds,
            bytes_per_worker=rounds * sent,
            bottleneck=bottleneck,
            bottleneck_bytes=rounds * busiest,
            rounds=float(rounds),
            floor_seconds=floor,
        )

    @property
    def slowdown(self) -> float:
        """Epoch time over the compute floor's (steps per worker x t_c): 1.0 is communication for free."""
        return self.epoch_seconds / self.floor_seconds


def ring_allreduce(nbytes: float, n: int, link: Link) -> tuple[float, float]:
    """(seconds, bytes each worker sends) of a ring all-reduce of ``nbytes``: ``2 (n-1)`` steps of
    ``nbytes / n`` each, ``2 (n-1) alpha + 2 (n-1)/n nbytes / B``."""
    if n < 2:
        return 0.0, 0.0
    sent = 2 * (n - 1) / n * nbytes
    return 2 * (n - 1) * link.latency + link.seconds(sent), sent


def lowp_mean(values: int, fmt: PayloadFormat, n: int, link: Link) -> tuple[float, float]:
    """(seconds, bytes each worker sends) of the mean of ``values`` values over ``n`` workers in ``fmt``,
    as the package sends it (:mod:`lightning_commsgd.comm.lowp`): fp32 (``fmt.exact``) as a ring
    all-reduce; otherwise, on 2 workers, each sends its encoded values once and the codec hides behind the
    link (``alpha + max(F(v)/B, encode v + decode 2v)``); on ``n >= 3`` reduce-scatter and all-gather of
    ``ceil(v/n)``-value chunks to every peer (``2 alpha + 2 (n-1) F(ceil(v/n)) / B`` plus the codec:
    encode ``v (1 + 1/n)``, decode ``2 v``)."""
    if n < 2:
        return 0.0, 0.0
    if fmt.exact:
        return ring_allreduce(4.0 * values, n, link)
    if n == 2:
        sent = fmt.nbytes(values)
        codec = values * (fmt.encode_seconds + 2 * fmt.decode_seconds)
        return link.latency + max(link.seconds(sent), codec), sent
    chunk = math.ceil(values / n)
    sent = 2 * (n - 1) * fmt.nbytes(chunk)
    codec = values * ((1 + 1 / n) * fmt.encode_seconds + 2 * fmt.decode_seconds)
    return 2 * link.latency + link.seconds(sent) + codec, sent


def gather_seconds(nbytes: float, n: int, link: Link) -> float:
    """A gather of ``nbytes`` from every other worker to a root: ``alpha + (n-1) nbytes / B``, the root's
    inbound link."""
    return link.latency + link.seconds((n - 1) * nbytes) if n > 1 else 0.0


def binomial_broadcast_seconds(nbytes: float, n: int, link: Link) -> float:
    """gloo's broadcast (binomial tree): ``ceil(log2 n)`` levels of ``alpha + nbytes / B``."""
    return math.ceil(math.log2(n)) * (link.latency + link.seconds(nbytes)) if n > 1 else 0.0


def ring_allgather_seconds(nbytes: float, n: int, link: Link) -> float:
    """gloo's all-gather (a ring): ``(n-1) (alpha + nbytes / B)``; every link carries ``(n-1) nbytes``."""
    return (n - 1) * (link.latency + link.seconds(nbytes)) if n > 1 else 0.0
