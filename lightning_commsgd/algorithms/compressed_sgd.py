"""Compressed-gradient SGD baselines: QSGD (Alistarh et al. 2017) and MEM-SGD / error feedback
(Stich, Cordonnier, Jaggi 2018; Karimireddy et al. 2019).

Per optimizer step, on every rank i (replicated: each rank applies the same aggregate)::

    v_i = g_i + m_i            (m_i = 0 without error feedback)
    send Q(v_i)                (one all-gather of fixed-size payloads)
    m_i <- v_i - Q(v_i)        (error feedback only)
    p.grad <- (1/n) sum_j Q(v_j);  the user's optimizer steps

With an unbiased Q and no error feedback this is QSGD; with top-k and error feedback it is MEM-SGD. The
memory here holds gradients, not learning-rate-scaled updates: with plain SGD and a constant learning rate
the two coincide (m = m_MEM / lr); with a schedule or momentum it is the error-feedback form of
Karimireddy et al.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_commsgd.algorithms.compressed import CompressedAlgorithm, check_compressor
from lightning_commsgd.comm import Communicator
from lightning_commsgd.compression.base import Compressor

__all__ = ["CompressedGradientSGD"]


class CompressedGradientSGD(CompressedAlgorithm):
    """QSGD / MEM-SGD on one rank (see the module docstring).

    Args:
        optimizers: the one optimizer (runs on every rank with the same aggregate gradient).
        communicator: carries and counts the payloads (tag ``"compressed_gradient"``).
        compressor: Q.
        error_feedback: keep the compression error m_i and add it to the next gradient (needed for
            biased compressors such as top-k or sign to converge).
        seed: base of the random streams (rank r draws from ``seed + 1 + r``).
    """

    def __init__(
        self,
        optimizers: Sequence[Optimizer],
        communicator: Communicator,
        compressor: Compressor,
        *,
        error_feedback: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(optimizers, communicator, seed)
        self.compressor = check_compressor(compressor)
        self.error_feedback = bool(error_feedback)
        self.memory: Tensor | None = (
            torch.zeros(self.numel, dtype=torch.float32, device=self.device) if self.error_feedback else None
        )

    def _tensors(self) -> dict[str, Tensor | None]:
        return {"memory": self.memory}

    def after_backward(self) -> None:
        grad = self.flat_grads()
        finite = self.is_finite(grad)
        v = grad + self.memory if (finite and self.memory is not None) else grad
        if not finite:
            v = torch.zeros_like(grad)
        payload = self.compressor.encode(v, self.worker_generator)
        messages = self.communicator.all_gather(self.with_status(payload, finite), tag="compressed_gradient")
        bodies, bad = [], []
        for r, message in enumerate(messages):
            body, ok = self.split_status(message)
            bodies.append(body)
            if not ok:
                bad.append(r)
        if bad:
            self.raise_non_finite("gradient", bad)
        if self.memory is not None:
            self.memory = v - self.compressor.decode(payload, self.numel)
        aggregate = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        for body in bodies:  # rank order: every rank sums identically
            aggregate += self.compressor.decode(body, self.numel)
        self.set_grads(aggregate / self.world_size)
