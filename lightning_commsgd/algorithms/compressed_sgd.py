"""Compressed-gradient SGD baselines: QSGD (Alistarh et al. 2017), MEM-SGD / error feedback (Stich,
Cordonnier, Jaggi 2018; Karimireddy et al. 2019) and DoubleSqueeze (Tang et al. 2019).

Per optimizer step, on every rank i::

    v_i = g_i + m_i                      (m_i = 0 without error feedback)
    send Q(v_i);  m_i <- v_i - Q(v_i)    (the memory only with error feedback)
    aggregate:  v = (1/n) sum_j Q(v_j) + delta
    server compression (DoubleSqueeze):  send Q_s(v);  delta <- v - Q_s(v)   (else Q_s = identity, delta = 0)
    p.grad <- Q_s(v);  the user's optimizer steps, identically on every rank

``server="replicated"``: the Q(v_i) are all-gathered and every rank aggregates (and compresses with Q_s
from a shared random stream); one collective per step. ``server="rank0"``: gathered to rank 0, which
aggregates and broadcasts Q_s(v) (fp32 when there is no server compressor: the parameter-server form).

With an unbiased Q and no error feedback this is QSGD; with top-k and error feedback MEM-SGD; with error
feedback on both sides DoubleSqueeze. The memory holds gradients, not learning-rate-scaled updates: with
plain SGD and a constant learning rate the two coincide (m = m_MEM / lr); with a schedule or momentum it
is the error-feedback form of Karimireddy et al.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_commsgd.algorithms.base import check_choice
from lightning_commsgd.algorithms.compressed import CompressedAlgorithm, check_compressor
from lightning_commsgd.algorithms.dore import SERVER_MODES
from lightning_commsgd.algorithms.protocol import AlgorithmConfig, World
from lightning_commsgd.comm import Communicator
from lightning_commsgd.compression.base import Compressor, Identity
from lightning_commsgd.compression.wire import WireFormat, WireName, as_wire_format

__all__ = ["CompressedGradientSGD", "CompressedSGD"]


class CompressedGradientSGD(CompressedAlgorithm):
    """QSGD / MEM-SGD / DoubleSqueeze on one rank (see the module docstring).

    Args:
        optimizers: the one optimizer (runs on every rank with the same aggregate gradient).
        communicator: carries and counts the payloads (tags ``"compressed_gradient"``, ``"server_gradient"``).
        compressor: Q, the workers' compressor.
        error_feedback: keep the compression error m_i and add it to the next gradient (needed for
            biased compressors such as top-k or sign to converge).
        server_compressor: Q_s, compression of the aggregate with its own error feedback delta
            (DoubleSqueeze); ``None``: the aggregate is used (``rank0``: broadcast) uncompressed.
        server: ``"replicated"`` (default) or ``"rank0"``.
        seed: base of the random streams (rank r draws from ``seed + 1 + r``, Q_s from ``seed``).
        wire: ``"packed"`` or ``"entropy"`` (see :class:`CompressedAlgorithm`).
    """

    def __init__(
        self,
        optimizers: Sequence[Optimizer],
        communicator: Communicator,
        compressor: Compressor,
        *,
        error_feedback: bool = False,
        server_compressor: Compressor | None = None,
        server: Literal["rank0", "replicated"] = "replicated",
        seed: int = 0,
        buffers: Sequence[Tensor] = (),
        wire: WireFormat | str = "packed",
    ) -> None:
        super().__init__(optimizers, communicator, seed, buffers=buffers, wire=wire)
        self.compressor = check_compressor(compressor)
        self.server_compressor = (
            None if server_compressor is None else check_compressor(server_compressor, "server_compressor")
        )
        if server not in SERVER_MODES:
            raise ValueError(f"Arg `server` must be one of {SERVER_MODES}, got {server!r}.")
        self.server = server
        self.error_feedback = bool(error_feedback)
        zeros = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        self.memory: Tensor | None = zeros.clone() if self.error_feedback else None  # m_i
        aggregates = server == "replicated" or self.rank == 0
        self.server_error: Tensor | None = (
            zeros.clone() if (self.server_compressor is not None and aggregates) else None  # delta
        )

    round_tags = ("compressed_gradient", "server_gradient", "final")

    def _tensors(self) -> dict[str, Tensor | None]:
        return {"memory": self.memory, "server_error": self.server_error}

    def after_backward(self) -> None:
        grad = self.flat_grads()
        finite = self.is_finite(grad)
        v = grad + self.memory if (finite and self.memory is not None) else grad
        if not finite:
            v = torch.zeros_like(grad)
        payload = self.compressor.encode(v, self.worker_generator)
        message = self.with_status(self.to_wire(payload, self.compressor), finite)
        if self.server == "replicated":
            messages: list[Tensor] | None = self.all_gather_messages(message, tag="compressed_gradient")
        else:
            messages = self.gather_messages(message, tag="compressed_gradient")
        bad: list[int] = []
        aggregate_payload: Tensor | None = None
        if messages is not None:  # the aggregating rank(s)
            bodies = []
            for r, m in enumerate(messages):
                body, ok = self.split_status(m)
                bodies.append(body)
                if not ok:
                    bad.append(r)
            if not bad:
                aggregate_payload = self._aggregate([self.from_wire(b, self.compressor) for b in bodies])
        if self.server == "rank0":
            server_q = self.server_compressor or Identity()
            size = server_q.payload_nbytes(self.numel)
            down: Tensor | None = None
            if self.rank == 0:
                verdict = torch.zeros(self.world_size, dtype=torch.uint8, device=self.device)
                for r in bad:
                    verdict[r] = 1
                body = (
                    torch.zeros(size, dtype=torch.uint8, device=self.device)
                    if aggregate_payload is None
                    else self.to_wire(aggregate_payload, server_q)
                )
                down = torch.cat([body, verdict])
            down = self.broadcast_message(down, size + self.world_size, tag="server_gradient")
            body, flags = down[: -self.world_size], down[-self.world_size :].tolist()
            bad = [r for r, flag in enumerate(flags) if flag]
            if not bad and self.rank != 0:  # rank 0 keeps the payload it formed; the others decode it
                aggregate_payload = self.from_wire(body, server_q)
        if bad:
            self.raise_non_finite("gradient", bad)
        if self.memory is not None:
            self.memory = v - self.compressor.decode(payload, self.numel)
        assert aggregate_payload is not None
        self.set_grads((self.server_compressor or Identity()).decode(aggregate_payload, self.numel))

    def _aggregate(self, bodies: list[Tensor]) -> Tensor:
        """The payload of Q_s((1/n) sum_j Q(v_j) + delta) (identity without a server compressor);
        advances delta. Every aggregating rank sums in rank order and draws Q_s from the shared stream."""
        total = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        for body in bodies:
            total += self.compressor.decode(body, self.numel)
        v = total / self.world_size
        if self.server_compressor is None:
            return Identity().encode(v)
        assert self.server_error is not None
        v = v + self.server_error
        payload = self.server_compressor.encode(v, self.master_generator)
        self.server_error = v - self.server_compressor.decode(payload, self.numel)
        return payload


class CompressedSGD(AlgorithmConfig):
    """Compressed-gradient SGD baselines: QSGD (Alistarh et al. 2017: unbiased Q, no memory), MEM-SGD
    (Stich et al. 2018: top-k with error feedback) and DoubleSqueeze (Tang et al. 2019: error feedback on
    both sides, ``server_compressor``); see :class:`CompressedGradientSGD`. Every rank applies the same
    aggregate with the user's optimizer.

    Args:
        compressor: Q, a compressor (e.g. ``QSGD(levels=4)`` or ``TopK(0.01)``) or a codec name (``"int8"``,
            ``"int4"``, ``"bf16"``, ``"fp16"``; see :mod:`lightning_commsgd.compression.names`).
        error_feedback: keep each rank's compression error and add it to its next gradient (needed for
            biased compressors: top-k, sign).
        server_compressor: Q_s (a compressor or codec name), compress the aggregate too, with its own error
            feedback (DoubleSqueeze); ``None`` leaves it uncompressed.
        master: where the aggregate is formed: ``"replicated"`` (default: one all-gather a step, every rank
            aggregates) or ``"rank0"`` (a gather to rank 0 and a broadcast of the (compressed) aggregate, the
            parameter-server form).
        seed: base of the compressors' random streams (rank r draws from seed + 1 + r; Q_s from seed).
        wire: how the payloads travel: ``"packed"`` (default: the compressors' fixed-size payloads) or
            ``"entropy"`` (entropy-coded with Zstandard: QSGD-4 codes at 1.8 instead of 4.06 bits per value,
            top-k at 0.55 of its bytes; the same trajectory bit for bit). See
            :mod:`lightning_commsgd.compression.wire`.
    """

    name = "compressed_sgd"
    supports_loss_scaling = False

    def __init__(
        self,
        compressor: Compressor | str,
        error_feedback: bool = False,
        server_compressor: Compressor | str | None = None,
        master: Literal["rank0", "replicated"] = "replicated",
        seed: int = 0,
        wire: WireName | WireFormat = "packed",
    ) -> None:
        self.compressor = check_compressor(compressor)
        self.wire = as_wire_format(wire)
        if not isinstance(error_feedback, bool):
            raise TypeError(f"Arg `error_feedback` must be a bool, got {error_feedback!r}.")
        self.error_feedback = error_feedback
        self.server_compressor = (
            None if server_compressor is None else check_compressor(server_compressor, "server_compressor")
        )
        self.master = check_choice(master, "master", SERVER_MODES)
        self.seed = int(seed)

    def build(
        self, module: nn.Module, optimizers: Sequence[Optimizer], communicator: Communicator, world: World
    ) -> CompressedGradientSGD:
        return CompressedGradientSGD(
            optimizers,
            communicator,
            self.compressor,
            error_feedback=self.error_feedback,
            server_compressor=self.server_compressor,
            server=self.master,  # type: ignore[arg-type]
            seed=self.seed,
            buffers=list(module.buffers()),
            wire=self.wire,
        )
