"""What a lightning_commsgd checkpoint holds, and how a rank finds its own part again.

Between rounds every rank holds a different model, so rank 0's state alone cannot resume a run
exactly. At save time every rank's local state is gathered to rank 0 and written into the one
checkpoint file under :data:`CHECKPOINT_KEY`::

    checkpoint["state_dict"]        # consensus model: the mean over ranks (what inference should load)
    checkpoint["optimizer_states"]  # rank 0's, as Lightning writes it
    checkpoint["lightning_commsgd"] = {
        "format": 1,
        "world_size": p,
        "ranks": [  # one entry per rank, in rank order
            {"state_dict": ..., "optimizer_states": [...], "algorithm": {...}, "ledger": {...}},
        ],
    }

A run resumed with the same world size gives each rank its own entry back; with another world size
every rank starts from the consensus model, rank 0's optimizer state and algorithm counters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_KEY", "consensus_state_dict"]

CHECKPOINT_KEY = "lightning_commsgd"
CHECKPOINT_FORMAT = 1


def consensus_state_dict(state_dicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Average floating-point entries over ranks (accumulated in float64, cast back); every other entry
    is taken from the first (rank 0's) state dict."""
    first = state_dicts[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, Tensor) and torch.is_floating_point(value):
            total = torch.zeros_like(value, dtype=torch.float64)
            for sd in state_dicts:
                total += sd[key].to(torch.float64)
            out[key] = (total / len(state_dicts)).to(value.dtype)
        else:
            out[key] = value
    return out
