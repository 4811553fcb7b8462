"""What the Trainer and Fabric adapters share, framework-neutral: timeouts, the checkpoint layout, and how a
framework's reduce op maps onto the Communicator's.

Both adapters import this module; it imports no Lightning, so the Fabric adapter does not pull in the
Trainer's (``lightning.pytorch``) through it.

Checkpoint layout: between rounds every rank holds a different model, so rank 0's state alone cannot resume
a run exactly. At save time every rank's local state is gathered to rank 0, which writes one file: the
consensus model (the mean over ranks) where the framework puts the model, and every rank's entry under
:data:`CHECKPOINT_KEY`::

    checkpoint["lightning_commsgd"] = {"format": 1, "world_size": p, "ranks": [entry_0, ..., entry_{p-1}]}

A run resumed with the same world size gives each rank its own entry back; with another world size every
rank starts from the consensus model, rank 0's optimizer state and algorithm counters
(``CommAlgorithm.load_resized_state_dict``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_KEY",
    "AlgorithmSettings",
    "DEFAULT_SYNC_TIMEOUT",
    "MIN_RENDEZVOUS_TIMEOUT",
    "consensus_state_dict",
    "is_world_group",
    "reduce_kind",
    "rendezvous_timeout_for",
    "validate_sync_timeout",
]

CHECKPOINT_KEY = "lightning_commsgd"
CHECKPOINT_FORMAT = 1
DEFAULT_SYNC_TIMEOUT = 600.0
# The least time the ranks get to find each other when the process group forms: processes start seconds
# to minutes apart (imports under load, nodes of a multi-node job), more than a collective may wait.
MIN_RENDEZVOUS_TIMEOUT = 300.0


def validate_sync_timeout(value: Any, name: str = "sync_timeout") -> float:
    """``value`` (``sync_timeout`` or ``rendezvous_timeout``) as a float of seconds in (0, inf), else a
    TypeError / ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Arg `{name}` must be a number of seconds, got {value!r}.")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"Arg `{name}` must be a finite number of seconds > 0, got {value!r}.")
    return float(value)


def rendezvous_timeout_for(sync_timeout: float, rendezvous_timeout: Any) -> float:
    """``rendezvous_timeout`` checked, or (``None``) the larger of ``sync_timeout`` and 300 s."""
    if rendezvous_timeout is None:
        return max(sync_timeout, MIN_RENDEZVOUS_TIMEOUT)
    return validate_sync_timeout(rendezvous_timeout, "rendezvous_timeout")


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


def reduce_kind(reduce_op: Any) -> str | None:
    """A framework's reduce_op (a string or a ``ReduceOp``) as a Communicator op name, ``None`` if unknown."""
    named = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}
    if isinstance(reduce_op, str):
        return named.get(reduce_op.lower())
    ops = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max", dist.ReduceOp.MIN: "min"}
    return next((name for op, name in ops.items() if reduce_op == op), None)


def is_world_group(group: Any) -> bool:
    """Lightning passes the default group as ``None`` or as ``dist.group.WORLD``."""
    return group is None or group is dist.group.WORLD


class AlgorithmSettings:
    """Mixin of the adapters: the algorithm config's settings read as the strategy's
    (``LocalSGDStrategy(tau=8).tau``), from its ``algorithm_config`` attribute."""

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("algorithm_config")
        if config is not None and not name.startswith("_") and name in vars(config):
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
