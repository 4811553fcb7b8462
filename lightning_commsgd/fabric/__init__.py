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
from lightning_commsgd.named import named_strategy
from lightning_commsgd.registry import ENTRIES


def _named(name: str) -> type:
    """The Fabric adapter of registry entry ``name`` (its class name, its algorithm's arguments)."""
    entry = ENTRIES[name]
    assert entry.algorithm is not None
    return named_strategy(entry.algorithm, CommunicationStrategy, entry.class_name, __name__, name)


LocalSGDStrategy = _named("local_sgd")
DecentralizedSGDStrategy = _named("decentralized_sgd")
ElasticAveragingStrategy = _named("elastic_averaging")
OverlapLocalSGDStrategy = _named("overlap_local_sgd")
DoubleResidualStrategy = _named("dore")
DianaStrategy = _named("diana")
CompressedSGDStrategy = _named("compressed_sgd")

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
