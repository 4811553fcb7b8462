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

from collections.abc import Mapping
from typing import Any

from lightning_commsgd.adapter_support import CHECKPOINT_FORMAT, CHECKPOINT_KEY, consensus_state_dict

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_KEY", "RankStates", "consensus_state_dict"]


class RankStates:
    """Per-rank checkpoint entries: gathered to rank 0 at save, given back to each rank at load.

    A collaborator of the strategies (see the module docstring for the layout). :meth:`gather` runs on every
    rank (one object gather, tag ``checkpoint``); :meth:`own_entry` picks this rank's entry of a loaded
    checkpoint, or rank 0's with ``resized=True`` when the world size changed.
    """

    @staticmethod
    def gather(checkpoint: dict[str, Any], local: dict[str, Any], communicator: Any) -> None:
        """Gather every rank's ``local`` entry to rank 0 and, there, write the consensus model and (for a
        full checkpoint, one with optimizer states) the entries into ``checkpoint``."""
        gathered = communicator.gather_object(local, dst=0, tag="checkpoint")
        if gathered is None:
            return
        checkpoint["state_dict"] = consensus_state_dict([g["state_dict"] for g in gathered])
        if "optimizer_states" in checkpoint:
            checkpoint[CHECKPOINT_KEY] = {
                "format": CHECKPOINT_FORMAT,
                "world_size": len(gathered),
                "ranks": gathered,
            }

    @staticmethod
    def own_entry(
        checkpoint: Mapping[str, Any], world_size: int, rank: int
    ) -> tuple[dict[str, Any], bool] | None:
        """``(entry, resized)``: this rank's entry when the world size is the same, else rank 0's with
        ``resized=True``; ``None`` when the checkpoint has no per-rank entries."""
        extra = checkpoint.get(CHECKPOINT_KEY)
        if extra is None:
            return None
        ranks = extra["ranks"]
        if len(ranks) == world_size:
            return dict(ranks[rank]), False
        return dict(ranks[0]), True

    @staticmethod
    def saved_world_size(checkpoint: Mapping[str, Any]) -> int:
        return len(checkpoint[CHECKPOINT_KEY]["ranks"])
