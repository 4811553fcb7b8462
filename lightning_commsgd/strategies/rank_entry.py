"""This rank's entry of a checkpoint under the Trainer: what it holds at save, what it gives back at resume.

The file's layout is :mod:`.checkpointing`'s. An entry holds the rank's own replica (``state_dict``, on the
CPU), its optimizer states, the algorithm's state, the ledger and the training sampler's position. Resumed
on the same world size, every rank takes its own entry back and the run continues exactly; on another,
every rank starts from the consensus model with rank 0's optimizer state, and the algorithm restores rank
0's state resized.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_commsgd.comm import Communicator
from lightning_commsgd.strategies.algorithm_run import AlgorithmRun
from lightning_commsgd.strategies.checkpointing import RankStates
from lightning_commsgd.strategies.data_placement import TrainingData
from lightning_commsgd.strategies.evaluation import ConsensusEvaluation

__all__ = ["RankEntry"]


class RankEntry:
    """This rank's part of the checkpoints of a fit (see the module docstring).

    Args:
        run: the algorithm, whose state is saved and restored.
        data: the training data, whose sampler position is saved and restored.
        evaluation: consensus validation; a checkpoint saved during it stores this rank's own replica.
    """

    def __init__(self, run: AlgorithmRun, data: TrainingData, evaluation: ConsensusEvaluation) -> None:
        self.run, self.data, self.evaluation = run, data, evaluation

    def local(
        self, checkpoint: Mapping[str, Any], communicator: Communicator, batches_consumed: int
    ) -> dict[str, Any]:
        """This rank's entry of ``checkpoint`` (Lightning's, of this rank's module and optimizers), after
        ``batches_consumed`` batches of the epoch."""
        assert self.run.algorithm is not None
        state_dict = self.evaluation.replica_state(checkpoint["state_dict"])
        local: dict[str, Any] = {
            "state_dict": {
                k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in state_dict.items()
            },
            "algorithm": self.run.algorithm.state_dict(),
            "ledger": communicator.ledger.state_dict(),
        }
        if "optimizer_states" in checkpoint:
            local["optimizer_states"] = checkpoint["optimizer_states"]
        sampler = self.data.state(batches_consumed)
        if sampler is not None:
            local["sampler"] = sampler
        return local

    def save(self, checkpoint: dict[str, Any], communicator: Communicator, batches_consumed: int) -> None:
        """Gather every rank's :meth:`local` entry into ``checkpoint`` on rank 0 (every rank calls it)."""
        RankStates.gather(checkpoint, self.local(checkpoint, communicator, batches_consumed), communicator)

    def resume(
        self,
        checkpoint: dict[str, Any],
        path: Any,
        world_size: int,
        rank: int,
        communicator: Communicator | None,
    ) -> dict[str, Any]:
        """The checkpoint this rank resumes from (read from ``path``), its ledger, sampler position and
        algorithm state restored; a checkpoint without per-rank entries is returned as it is."""
        found = RankStates.own_entry(checkpoint, world_size, rank)
        if found is None:
            return checkpoint
        mine, resized = found
        if resized:
            rank_zero_warn(
                f"{path} was written by {RankStates.saved_world_size(checkpoint)} ranks and is "
                f"resumed on {world_size}: every rank starts from the consensus model with rank 0's "
                "optimizer state (not the exact trajectory)."
            )
            # RI-SGD after losing workers: the survivors continue the interrupted epoch at the same batch
            # (their shard streams depend on (seed, epoch, shard) only, not on the world size).
        else:
            checkpoint = {
                **checkpoint,
                "state_dict": mine["state_dict"],
                "optimizer_states": mine["optimizer_states"],
            }
            if communicator is not None:
                communicator.ledger.load_state_dict(mine["ledger"])
        self.data.load(mine.get("sampler"))
        self.run.restore(mine["algorithm"], resized)
        return checkpoint
