"""The Lightning Fabric adapter: one strategy that drives any protocol algorithm, and its named forms.

- :class:`CommunicationStrategy` (``fabric/strategy.py``):
  ``Fabric(strategy=CommunicationStrategy(LocalSGD(tau=8)))``.
- Named strategies, one per algorithm of :mod:`lightning_commsgd.registry` (``LocalSGDStrategy(tau=8)``,
  ``DiLoCoStrategy``, ...: every entry that is not a preset), made by
  :func:`~lightning_commsgd.named.registered_strategies` from the configs' signatures.

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
from lightning_commsgd.named import registered_strategies
from lightning_commsgd.registry import ENTRIES

# LocalSGDStrategy, DiLoCoStrategy, ...: one per registry entry with an algorithm (lightning_commsgd.registry)
NAMED_STRATEGIES: dict[str, type] = registered_strategies(CommunicationStrategy, __name__)
globals().update(NAMED_STRATEGIES)

__all__ = [
    "CommunicationStrategy",
    "NAMED_STRATEGIES",
    "consensus_state_dict",
    "register_strategies",
    *sorted(NAMED_STRATEGIES),
]


def register_strategies(registry: Any = STRATEGY_REGISTRY) -> None:
    """Register every name of :data:`lightning_commsgd.registry.ENTRIES` that has an algorithm with Fabric's
    strategy registry (idempotent: names already there are left alone)."""
    for name, entry in ENTRIES.items():
        if entry.algorithm is None or name in registry:
            continue
        cls = NAMED_STRATEGIES[entry.class_name]
        registry.register(name, cls, description=entry.description, **entry.presets())


register_strategies()
