"""The Lightning Trainer adapter: one strategy that drives any protocol algorithm, its named forms, and the
parameter-server family.

- :class:`CommunicationStrategy` (``strategies/base.py``): ``CommunicationStrategy(LocalSGD(tau=8))``.
- Named strategies, one per algorithm of :mod:`lightning_commsgd.registry` (``LocalSGDStrategy(tau=8)``,
  ``DiLoCoStrategy``, ...: every entry that is not a preset), made by
  :func:`~lightning_commsgd.named.registered_strategies` from the configs' signatures.
- :mod:`.parameter_server`: ``KSyncSGDStrategy``, ``AsyncSGDStrategy`` (a sibling on the process base).

Importing this package registers every name of the registry with Lightning's ``StrategyRegistry``, so
``Trainer(strategy="local_sgd")`` works.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_commsgd.named import registered_strategies
from lightning_commsgd.registry import ENTRIES
from lightning_commsgd.strategies.base import CommunicationStrategy
from lightning_commsgd.strategies.parameter_server import (
    AsyncSGDStrategy,
    KSyncSGDStrategy,
    ParameterServerStrategy,
)
from lightning_commsgd.strategies.process import ProcessGroupStrategy

# LocalSGDStrategy, DiLoCoStrategy, ...: one per registry entry with an algorithm (lightning_commsgd.registry)
NAMED_STRATEGIES: dict[str, type] = registered_strategies(CommunicationStrategy, __name__)
globals().update(NAMED_STRATEGIES)

__all__ = [
    "AsyncSGDStrategy",
    "CommunicationStrategy",
    "KSyncSGDStrategy",
    "NAMED_STRATEGIES",
    "ParameterServerStrategy",
    "ProcessGroupStrategy",
    "register_strategies",
    *sorted(NAMED_STRATEGIES),
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
