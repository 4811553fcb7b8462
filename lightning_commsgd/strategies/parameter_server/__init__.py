"""The parameter-server family under the Lightning Trainer: a sibling of the protocol-driven strategies.

These strategies do not run a protocol algorithm on every rank: rank 0 serves a model that workers push
gradients to and pull from (:mod:`lightning_commsgd.algorithms.ps_runtime`). They share only the process
plumbing of :class:`~lightning_commsgd.strategies.process.ProcessGroupStrategy`.
"""

from lightning_commsgd.strategies.parameter_server.strategy import (
    PS_CHECKPOINT_KEY,
    AsyncSGDStrategy,
    KSyncSGDStrategy,
    ParameterServerStrategy,
)

__all__ = ["PS_CHECKPOINT_KEY", "AsyncSGDStrategy", "KSyncSGDStrategy", "ParameterServerStrategy"]
