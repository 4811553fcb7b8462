"""Straggler emulation: Dutta et al.'s runtime model (AISTATS 2018: each gradient takes Y ~ Exp(mu) s)."""

from __future__ import annotations

import math

import torch

__all__ = ["ExponentialDelay"]


class ExponentialDelay:
    """Draws the extra seconds Y ~ Exp(mu) a worker waits after computing each gradient.

    Args:
        mu: the rate mu > 0 in 1/seconds (mean delay 1/mu).
        seed: seed shared by the job; each rank draws from its own stream (seed, rank).
        rank: this worker's rank.
    """

    def __init__(self, mu: float, seed: int = 0, rank: int = 0) -> None:
        if not (isinstance(mu, (int, float)) and not isinstance(mu, bool) and mu > 0 and math.isfinite(mu)):
            raise ValueError(f"mu must be a finite rate > 0, got {mu!r}.")
        self.mu = float(mu)
        self.generator = torch.Generator().manual_seed(int(seed) * 100_003 + int(rank))

    def next(self) -> float:
        """The next delay in seconds: -ln(U) / mu with U uniform in (0, 1]."""
        u = 1.0 - float(torch.rand((), generator=self.generator))  # in (0, 1]
        return -math.log(u) / self.mu
