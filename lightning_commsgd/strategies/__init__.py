"""The Lightning Trainer adapter: one strategy that drives any protocol algorithm, its named forms, and the
parameter-server family.

- :class:`CommunicationStrategy` (``strategies/base.py``): ``CommunicationStrategy(LocalSGD(tau=8))``.
- Named strategies, one per algorithm of :mod:`lightning_commsgd.registry` (``LocalSGDStrategy(tau=8)``, ...),
  made by :func:`~lightning_commsgd.named.named_strategy`.
- :mod:`.parameter_server`: ``KSyncSGDStrategy``, ``AsyncSGDStrategy`` (a sibling on the process base).

Importing this package registers every name of the registry with Lightning's ``StrategyRegistry``, so
``Trainer(strategy="local_sgd")`` works.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_commsgd.named import registered_strategy
from lightning_commsgd.registry import ENTRIES
from lightning_commsgd.strategies.base import CommunicationStrategy
from lightning_commsgd.strategies.parameter_server import (
    AsyncSGDStrategy,
    KSyncSGDStrategy,
    ParameterServerStrategy,
)
from lightning_commsgd.strategies.process import ProcessGroupStrategy

LocalSGDStrategy = registered_strategy("local_sgd", CommunicationStrategy, __name__)
DecentralizedSGDStrategy = registered_strategy("decentralized_sgd", CommunicationStrategy, __name__)
ElasticAveragingStrategy = registered_strategy("elastic_averaging", CommunicationStrategy, __name__)
OverlapLocalSGDStrategy = registered_strategy("overlap_local_sgd", CommunicationStrategy, __name__)
DoubleResidualStrategy = registered_strategy("dore", CommunicationStrategy, __name__)
DianaStrategy = registered_strategy("diana", CommunicationStrategy, __name__)
CompressedSGDStrategy = registered_strategy("compressed_sgd", CommunicationStrategy, __name__)

__all__ = [
    "AsyncSGDStrategy",
    "CommunicationStrategy",
    "CompressedSGDStrategy",
    "DecentralizedSGDStrategy",
    "DianaStrategy",
    "DoubleResidualStrategy",
    "ElasticAveragingStrategy",
    "KSyncSGDStrategy",
    "LocalSGDStrategy",
    "OverlapLocalSGDStrategy",
    "ParameterServerStrategy",
    "ProcessGroupStrategy",
    "register_strategies",
]


def register_strategies() -> None:
    """Register every name of :data:`lightning_commsgd.registry.ENTRIES` with Lightning (idempotent)."""
    classes = globals()
    for name, entry in ENTRIES.items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(
                name, classes[entry.class_name], description=entry.description, **entry.presets()
            )


register_strategies()
