"""The planner's recommendation of an averaging period tau and a payload format.

The rule (:data:`RULE`): the target is an epoch within ``slack`` (10%) of the compute floor,
``(1 + slack) x s x t_c``.

1. DDP when it meets the target (the gradients averaged every step: nothing to tune).
2. Otherwise blocking local SGD (parameters and momentum averaged, ``LocalSGDStrategy``) with the *smallest
   tau* that meets the target with some format, and at that tau the *least lossy* format that does
   (fp32, then bf16, int8, int4). Smallest tau first because the period moves the loss more than the payload
   does: in this project's emulated-cluster benchmarks int8 and int4 payloads changed the final loss by no
   more than seed noise (+0.0010 against +0.0011 at tau = 8, 5 seeds), while each doubling of tau trades
   optimisation progress per step for fewer rounds.
3. When no tau up to the largest candidate meets it: the candidate with the shortest predicted epoch,
   reported as missing the target (Overlap Local-SGD, fewer workers or a faster link are then the options).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_commsgd.planning.formats import BF16, FP32, INT4, INT8, PayloadFormat
from lightning_commsgd.planning.model import Link, Prediction, Workload
from lightning_commsgd.planning.strategies import DDP, local_sgd

__all__ = ["DEFAULT_FORMATS", "DEFAULT_TAUS", "RULE", "Recommendation", "recommend"]

DEFAULT_TAUS: tuple[int, ...] = tuple(2**k for k in range(11))  # 1 .. 1024
DEFAULT_FORMATS: tuple[PayloadFormat, ...] = (FP32, BF16, INT8, INT4)
RULE = (
    "target: epoch <= (1 + slack) x compute floor; DDP if it meets it, else blocking local SGD with the "
    "smallest tau that meets it and, at that tau, the least lossy format (fp32 > bf16 > int8 > int4); "
    "if none does, the fastest candidate"
)


@dataclass(frozen=True)
class Recommendation:
    """What :func:`recommend` chose for ``workers`` workers.

    Attributes:
        workers: n.
        strategy: ``"DDP"`` or ``"local SGD"``.
        tau: the averaging period (``None`` for DDP).
        payload: the payload format (``None`` for DDP).
        prediction: the chosen configuration's predicted epoch.
        meets_target: whether the epoch is within the slack of the compute floor.
        slack: the slack of the target (0.10: within 10%).
    """

    workers: int
    strategy: str
    tau: int | None
    payload: PayloadFormat | None
    prediction: Prediction
    meets_target: bool
    slack: float

    def describe(self) -> str:
        """One line: the choice, its predicted epoch and its ratio to the compute floor."""
        p = self.prediction
        payload = self.payload.name if self.payload is not None else "-"
        what = "DDP" if self.tau is None else f"{self.strategy} tau={self.tau} payload={payload}"
        if self.tau is not None and 0 < p.rounds < 1:
            what += f" (one round every {1 / p.rounds:.3g} epochs)"
        ratio = f"{p.epoch_seconds:.4g} s/epoch, {p.slowdown:.3f}x the compute floor"
        ratio += f" ({p.floor_seconds:.4g} s)"
        if self.meets_target:
            return f"n={self.workers}: {what} ({ratio}; within {self.slack:.0%})"
        return (
            f"n={self.workers}: no candidate within {self.slack:.0%} of the compute floor; fastest: {what} "
            f"({ratio}); consider Overlap Local-SGD, fewer workers or a faster link"
        )


def recommend(
    workload: Workload,
    link: Link,
    n: int,
    *,
    taus: Sequence[int] = DEFAULT_TAUS,
    formats: Sequence[PayloadFormat] = DEFAULT_FORMATS,
    slack: float = 0.10,
    state_copies: int = 2,
) -> Recommendation:
    """Recommend tau and a payload format for ``n`` workers by :data:`RULE` (see the module docstring).

    Args:
        workload: P, t_c and the steps per epoch.
        link: B and alpha.
        n: workers.
        taus: candidate periods (tried in increasing order).
        formats: candidate payload formats (tried least lossy first, by ``loss_rank``).
        slack: the target is an epoch within ``(1 + slack)`` of the compute floor.
        state_copies: values local SGD averages per parameter: 2 (parameters and SGD momentum, as
            ``LocalSGDStrategy`` does by default), 1 (``momentum="local"``), 3 (Adam's two moments).

    Raises:
        ValueError: no candidate tau or format, a tau < 1, or a negative slack.
    """
    if not taus or not formats:
        raise ValueError("Give at least one candidate tau and one payload format.")
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in taus):
        raise ValueError(f"Every candidate tau must be an int >= 1, got {list(taus)!r}.")
    if not slack >= 0:
        raise ValueError(f"Arg `slack` must be >= 0, got {slack!r}.")
    ddp = DDP().predict(workload, link, n)
    target = (1 + slack) * ddp.floor_seconds
    if ddp.epoch_seconds <= target:
        return Recommendation(n, "DDP", None, None, ddp, True, slack)
    ordered = sorted(formats, key=lambda f: f.loss_rank)
    candidates = []
    for tau in sorted(set(taus)):
        for fmt in ordered:
            prediction = local_sgd(tau, fmt, state_copies).predict(workload, link, n)
            if prediction.epoch_seconds <= target:
                return Recommendation(n, "local SGD", tau, fmt, prediction, True, slack)
            candidates.append((prediction.epoch_seconds, tau, fmt.loss_rank, fmt, prediction))
    _, tau, _, fmt, prediction = min(candidates, key=lambda c: c[:3])
    if ddp.epoch_seconds < prediction.epoch_seconds:
        return Recommendation(n, "DDP", None, None, ddp, False, slack)
    return Recommendation(n, "local SGD", tau, fmt, prediction, False, slack)
