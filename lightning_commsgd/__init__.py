"""lightning_commsgd: communication-efficient distributed SGD as PyTorch Lightning strategies.

Importing the package registers the strategy names with Lightning's ``StrategyRegistry``, so
``Trainer(strategy="local_sgd")`` works.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_commsgd.algorithms import PeriodicAverager
from lightning_commsgd.callbacks import CommunicationMonitor
from lightning_commsgd.comm import Communicator
from lightning_commsgd.ledger import CommLedger
from lightning_commsgd.schedules import (
    AdaComm,
    ConstantPeriod,
    IncreasingPeriod,
    PeriodSchedule,
    PostLocalSGD,
)
from lightning_commsgd.strategies import CommunicationStrategy, LocalSGDStrategy

__all__ = [
    "AdaComm",
    "CommLedger",
    "CommunicationMonitor",
    "CommunicationStrategy",
    "Communicator",
    "ConstantPeriod",
    "IncreasingPeriod",
    "LocalSGDStrategy",
    "PeriodSchedule",
    "PeriodicAverager",
    "PostLocalSGD",
    "register_strategies",
]

__version__ = "0.1.0"


def register_strategies() -> None:
    """Register this package's strategy names with Lightning (idempotent; done on import)."""
    entries = {
        "local_sgd": (LocalSGDStrategy, "Local SGD, averaging params + momentum every 8 steps", {"tau": 8}),
    }
    for name, (cls, description, init_params) in entries.items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, cls, description=description, **init_params)


register_strategies()
