"""What the Trainer's training and optimizer steps hand to the algorithm.

:func:`record_batch` passes each training batch's loss (and size) on. For a gradient-exchanging algorithm
(DORE, DIANA, compressed SGD), Lightning's precision plugin calls ``optimizer.step(closure)``, the closure
running forward and backward; the exchange must run at the end of that closure (``after_backward``), and
the update only where the algorithm says this rank runs it now (``should_step``). :func:`exchange_then_step`
gives the optimizer and closure that do so, for the strategy to hand to Lightning instead of the user's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from torch.optim import Optimizer

from lightning_commsgd.algorithms.protocol import CommAlgorithm

__all__ = ["DeferredStep", "exchange_then_step", "record_batch"]


def record_batch(algorithm: CommAlgorithm, output: Any, batch: Any) -> None:
    """``algorithm.record_batch`` of one ``training_step``: its loss (``output`` or ``output["loss"]``) and,
    where the algorithm weighs replicas by their samples, the size of ``batch``."""
    loss = output.get("loss") if isinstance(output, Mapping) else output
    samples = extract_batch_size(batch) if algorithm.counts_samples else None
    algorithm.record_batch(loss if isinstance(loss, Tensor) else None, samples)


class DeferredStep:
    """Stands in for the optimizer inside Lightning's precision plugin: ``step(closure)`` runs the closure
    (forward, backward, exchange), then steps the real optimizer only where the algorithm says this rank runs
    the update now. Everything else is the real optimizer's."""

    def __init__(self, optimizer: Optimizer, algorithm: CommAlgorithm) -> None:
        self._optimizer, self._algorithm = optimizer, algorithm

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        result = closure() if closure is not None else None
        if self._algorithm.should_step:
            self._optimizer.step(**kwargs)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)


def exchange_then_step(
    optimizer: Optimizer, closure: Callable[[], Any], algorithm: CommAlgorithm
) -> tuple[DeferredStep, Callable[[], Any]]:
    """``(optimizer, closure)`` for Lightning: the closure ends with the algorithm's ``after_backward()``,
    and the optimizer (a :class:`DeferredStep`) steps only where ``should_step``."""

    def closure_then_exchange() -> Any:
        result = closure()
        algorithm.after_backward()
        return result

    return DeferredStep(optimizer, algorithm), closure_then_exchange
