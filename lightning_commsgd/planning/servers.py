"""The server-based strategies of the scaling model: a parameter server (a dedicated node) and compressed
SGD with a master on rank 0; in both the bottleneck is one link, the server's or rank 0's, whose load grows
with n (see :mod:`lightning_commsgd.planning.model` for the network and the symbols)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lightning_commsgd.planning.formats import FP32, INT2, PayloadFormat
from lightning_commsgd.planning.model import (
    Link,
    Prediction,
    Workload,
    binomial_broadcast_seconds,
    gather_seconds,
    ring_allgather_seconds,
)
from lightning_commsgd.planning.strategies import check_int

__all__ = ["CompressedSGD", "ParameterServer", "dore"]


@dataclass(frozen=True)
class ParameterServer:
    """A dedicated parameter server (one more node, with its own link of rate B) and n workers; fp32
    gradients (S = 4P bytes) up, the fp32 model down; ``update_seconds`` (u) to apply one update.

    - ``mode="sync"`` with ``k`` (K-sync; sync SGD when k = n, the default): every worker pushes, the server
      waits for k gradients, updates, and sends the model to all n workers. The server's link carries n
      payloads in and n out per update, one after the other: an update takes
      ``t_c + 2 alpha + n S / B + u + n S / B``, growing linearly with n (the bottleneck: the server's link),
      and uses k gradients. Step times are deterministic here, so K-sync's gain (not waiting for
      stragglers) is not modelled: with k < n the same update carries fewer gradients.
    - ``mode="async"`` (K-async; async SGD when k = 1) and ``mode="batch"`` (K-batch-async): every gradient
      crosses the server's link once in and a model once out (full duplex: in parallel), an update every k
      gradients. Per gradient ``max((t_c + 2 alpha + 2 S / B + u) / n, S / B, u / k)``: the workers' own
      loop shared by n (``batch``: without u, the push is answered at once), or the server's link, or its
      update rate, whichever is slowest. No queueing delays.
    """

    mode: Literal["sync", "async", "batch"] = "sync"
    k: int | None = None
    update_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("sync", "async", "batch"):
            raise ValueError(f"Arg `mode` must be 'sync', 'async' or 'batch', got {self.mode!r}.")
        if self.k is not None:
            check_int(self.k, "k")
        if not (self.update_seconds >= 0 and math.isfinite(self.update_seconds)):
            raise ValueError(f"Arg `update_seconds` must be >= 0, got {self.update_seconds!r}.")

    @property
    def label(self) -> str:
        if self.mode == "batch":
            return f"K-batch-async PS k={self.k or 1}"
        if self.k is None:
            return f"{self.mode} PS"
        return f"K-{self.mode} PS k={self.k}"

    def predict(self, workload: Workload, link: Link, n: int) -> Prediction | None:
        k = self.k if self.k is not None else (n if self.mode == "sync" else 1)
        if k > n:
            return None
        size = 4.0 * workload.params
        t_c, alpha, u = workload.step_seconds, link.latency, self.update_seconds
        gradients, steps = workload.gradients(n), workload.steps(n)
        floor = steps * t_c
        if self.mode == "sync":
            updates = gradients / k
            cycle = t_c + 2 * alpha + 2 * link.seconds(n * size) + u
            return Prediction(
                strategy=self.label,
                workers=n,
                epoch_seconds=updates * cycle,
                compute_seconds=updates * t_c,
                comm_seconds=updates * (cycle - t_c),
                bytes_per_worker=updates * size,
                bottleneck="the server's link (n payloads in, then n out)",
                bottleneck_bytes=updates * n * size,
                rounds=updates,
                floor_seconds=floor,
            )
        loop = t_c + 2 * alpha + 2 * link.seconds(size) + (u if self.mode == "async" else 0.0)
        per_gradient = max(loop / n, link.seconds(size), u / k)
        if per_gradient == loop / n:
            bottleneck, busiest = "each worker's own loop (the server keeps up)", gradients / n * size
        elif per_gradient == link.seconds(size):
            bottleneck, busiest = "the server's link (every gradient in, a model out)", gradients * size
        else:
            bottleneck, busiest = "the server's update rate", gradients * size
        epoch = gradients * per_gradient
        return Prediction(
            strategy=self.label,
            workers=n,
            epoch_seconds=epoch,
            compute_seconds=floor,
            comm_seconds=max(0.0, epoch - floor),
            bytes_per_worker=gradients / n * size,
            bottleneck=bottleneck,
            bottleneck_bytes=busiest,
            rounds=gradients / k,
            floor_seconds=floor,
        )


@dataclass(frozen=True)
class CompressedSGD:
    """Compressed-gradient SGD every step (QSGD, MEM-SGD, DoubleSqueeze; DORE with :func:`dore`), the
    gradient's P values in ``up``, the aggregate (or DORE's model residual) in ``down``.

    ``master="rank0"``: gathered to rank 0 (its inbound link carries n-1 payloads: the bottleneck), then
    gloo's binomial-tree broadcast (ceil(log2 n) payloads out of rank 0, one per level):
    ``alpha + (n-1) S_up / B + u + ceil(log2 n) (alpha + S_down / B)`` per step, plus the codecs (workers
    encode P, rank 0 decodes (n-1) P and encodes P, workers decode P). ``master="replicated"``: one ring
    all-gather of the compressed gradients, ``(n-1) (alpha + S_up / B)``, every rank decodes (n-1) P.
    """

    up: PayloadFormat
    down: PayloadFormat = FP32
    master: Literal["rank0", "replicated"] = "rank0"
    update_seconds: float = 0.0
    name: str = "compressed SGD"

    def __post_init__(self) -> None:
        if self.master not in ("rank0", "replicated"):
            raise ValueError(f"Arg `master` must be 'rank0' or 'replicated', got {self.master!r}.")
        if not (self.update_seconds >= 0 and math.isfinite(self.update_seconds)):
            raise ValueError(f"Arg `update_seconds` must be >= 0, got {self.update_seconds!r}.")

    @property
    def label(self) -> str:
        down = "" if self.master == "replicated" else f"/{self.down.name}"
        return f"{self.name} {self.up.name}{down} ({self.master})"

    def predict(self, workload: Workload, link: Link, n: int) -> Prediction:
        p, steps = workload.params, workload.steps(n)
        up = 4.0 * p if self.up.exact else self.up.nbytes(p)
        down = 4.0 * p if self.down.exact else self.down.nbytes(p)
        if self.master == "rank0":
            seconds = gather_seconds(up, n, link) + self.update_seconds
            seconds += binomial_broadcast_seconds(down, n, link)
            seconds += p * (self.up.encode_seconds + (n - 1) * self.up.decode_seconds)
            seconds += p * (self.down.encode_seconds + self.down.decode_seconds)
            bottleneck, busiest = "rank 0's inbound link (n-1 payloads)", (n - 1) * up
        else:
            seconds = ring_allgather_seconds(up, n, link) + self.update_seconds
            seconds += p * (self.up.encode_seconds + (n - 1) * self.up.decode_seconds)
            bottleneck, busiest = "every worker's link (ring all-gather)", (n - 1) * up
        floor = steps * workload.step_seconds
        sent = up if self.master == "rank0" else (n - 1) * up
        return Prediction.of_rounds(self.label, n, floor, steps, seconds, sent, bottleneck, busiest)


def dore(
    payload: PayloadFormat = INT2,
    master: Literal["rank0", "replicated"] = "rank0",
    update_seconds: float = 0.0,
) -> CompressedSGD:
    """DORE: compressed gradient residuals up and compressed model residuals down, both in ``payload``
    (the paper's 2-bit inf-norm quantizer by default); ``update_seconds``: the master's step."""
    return CompressedSGD(payload, payload, master=master, update_seconds=update_seconds, name="DORE")
