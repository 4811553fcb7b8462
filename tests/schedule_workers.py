"""Worker for the multi-process schedule tests (spawn pickles it by name, so it lives in a module)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from lightning_commsgd import AdaComm, Communicator, PeriodicAverager

__all__ = ["scripted_loss", "schedule_worker"]


def scripted_loss(rank: int, step: int) -> float:
    """A decreasing loss that differs between ranks (so a rank-local decision would disagree)."""
    return (2.0 + rank) * (0.97 - 0.015 * rank) ** step + 0.1 * ((step * (rank + 3)) % 5)


def schedule_worker(rank: int, world_size: int, steps: int, mode: str) -> dict[str, Any]:
    """Run ``steps`` local-SGD steps with AdaComm on scripted losses; return the tau after each step.

    ``mode="steps"``: interval_steps=6. ``mode="seconds"``: interval_s=0.05, and ranks run at different
    speeds (rank r sleeps r ms per step) so their clocks disagree about interval boundaries.
    """
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = AdaComm(tau0=4, interval_steps=6) if mode == "steps" else AdaComm(tau0=4, interval_s=0.05)
    averager = PeriodicAverager(model, [optimizer], Communicator(), tau=schedule)
    taus = []
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:  # a decaying learning rate for the lr-aware factor
            group["lr"] = 0.1 / (1 + 0.05 * step)
        model(torch.ones(2, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        averager.record_loss(torch.tensor(scripted_loss(rank, step)))
        if mode == "seconds":
            time.sleep(0.001 * (rank + 1))
        averager.after_optimizer_step()
        taus.append(averager.tau)
    return {"taus": taus, "ledger": averager.communicator.ledger.as_dict()}
