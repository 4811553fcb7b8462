"""The Lightning Fabric adapter: one strategy that drives any protocol algorithm, and its named forms.

- :class:`CommunicationStrategy` (``fabric/strategy.py``):
  ``Fabric(strategy=CommunicationStrategy(LocalSGD(tau=8)))``.
- Named strategies, one per algorithm of :mod:`lightning_commsgd.registry` (``LocalSGDStrategy(tau=8)``,
  ``DecentralizedSGDStrategy``, ``ElasticAveragingStrategy``, ``OverlapLocalSGDStrategy``,
  ``DoubleResidualStrategy``, ``DianaStrategy``, ``CompressedSGDStrategy``), made by
  :func:`~lightning_commsgd.named.named_strategy`.

Importing this package registers every registry name that has an algorithm (presets included: ``qsgd``,
``mem_sgd``, ``gossip_ring``, ...) with Fabric's ``STRATEGY_REGISTRY``, so ``Fabric(strategy="local_sgd")``
works. The parameter-server strategies (``ksync_sgd``, ``async_sgd``) are Trainer-only: their server
drives the Trainer's loop (see :mod:`lightning_commsgd.strategies.parameter_server`).

Nothing here imports the Trainer (``lightning.pytorch``) or :mod:`lightning_commsgd.strategies`.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.strategies import STRATEGY_REGISTRY

from lightning_commsgd.fabric.strategy import CommunicationStrategy, consensus_state_dict
from lightning_commsgd.named import registered_strategy
from lightning_commsgd.registry import ENTRIES

LocalSGDStrategy = registered_strategy("local_sgd", CommunicationStrategy, __name__)
DecentralizedSGDStrategy = registered_strategy("decentralized_sgd", CommunicationStrategy, __name__)
ElasticAveragingStrategy = registered_strategy("elastic_averaging", CommunicationStrategy, __name__)
OverlapLocalSGDStrategy = registered_strategy("overlap_local_sgd", CommunicationStrategy, __name__)
DoubleResidualStrategy = registered_strategy("dore", CommunicationStrategy, __name__)
DianaStrategy = registered_strategy("diana", CommunicationStrategy, __name__)
CompressedSGDStrategy = registered_strategy("compressed_sgd", CommunicationStrategy, __name__)

__all__ = [
    "CommunicationStrategy",
    "CompressedSGDStrategy",
    "DecentralizedSGDStrategy",
    "DianaStrategy",
    "DoubleResidualStrategy",
    "ElasticAveragingStrategy",
    "LocalSGDStrategy",
    "OverlapLocalSGDStrategy",
    "consensus_state_dict",
    "register_strategies",
]


def register_strategies(registry: Any = STRATEGY_REGISTRY) -> None:
    """Register every name of :data:`lightning_commsgd.registry.ENTRIES` that has an algorithm with Fabric's
    strategy registry (idempotent: names already there are left alone)."""
    classes = globals()
    for name, entry in ENTRIES.items():
        if entry.algorithm is None or name in registry:
            continue
        registry.register(name, classes[entry.class_name], description=entry.description, **entry.presets())


register_strategies()
