"""Validation on the consensus model while the replicas differ (``eval_on="consensus"``).

:meth:`ConsensusEvaluation.enter` stashes this rank's replica and puts the algorithm's evaluation model (the
mean of the replicas, one all-reduce, tag ``eval_consensus``) in its place; :meth:`ConsensusEvaluation.exit`
gives every rank its own replica back. A checkpoint saved in between stores the replica
(:meth:`ConsensusEvaluation.replica_state`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from lightning_commsgd.algorithms.protocol import CommAlgorithm, float_state

__all__ = ["ConsensusEvaluation"]


class ConsensusEvaluation:
    """This rank's replica, stashed while the module holds the evaluation model (see the module docstring)."""

    def __init__(self) -> None:
        self._stash: dict[str, Tensor] | None = None

    def enter(self, module: Module, algorithm: CommAlgorithm) -> None:
        """Swap the evaluation model into ``module`` (a collective: every rank), unless the replicas agree."""
        if algorithm.in_sync:
            return
        state = float_state(module)
        self._stash = {k: t.detach().clone() for k, t in state.items()}
        algorithm.average_for_evaluation(list(state.values()))

    def exit(self, module: Module) -> None:
        """Put this rank's own replica back into ``module`` (nothing if :meth:`enter` swapped nothing)."""
        if self._stash is None:
            return
        with torch.no_grad():
            for key, tensor in float_state(module).items():
                tensor.copy_(self._stash[key])
        self._stash = None

    def replica_state(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """``state_dict`` of the module with this rank's own replica in place of the evaluation model."""
        out = dict(state_dict)
        if self._stash is not None:
            out.update({k: v.clone() for k, v in self._stash.items()})
        return out
