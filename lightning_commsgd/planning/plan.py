"""The planner's front: predictions for a list of strategies and worker counts, and a text table of them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lightning_commsgd.planning.formats import FP32, PayloadFormat
from lightning_commsgd.planning.model import Link, Prediction, Workload
from lightning_commsgd.planning.recommend import DEFAULT_FORMATS
from lightning_commsgd.planning.servers import ParameterServer, dore
from lightning_commsgd.planning.strategies import (
    DDP,
    Gossip,
    StrategyModel,
    diloco,
    local_sgd,
    overlap_local_sgd,
    streaming_diloco,
)
from lightning_commsgd.planning.units import format_bytes

__all__ = ["DEFAULT_FAMILIES", "DEFAULT_TOPOLOGIES", "FAMILIES", "default_strategies", "format_table", "plan"]

#: strategy families the planner knows, by their command-line name
FAMILIES = ("ddp", "local_sgd", "overlap", "diloco", "streaming_diloco", "gossip", "ps", "dore")
DEFAULT_FAMILIES = ("ddp", "local_sgd", "overlap", "gossip", "ps", "dore")
DEFAULT_TOPOLOGIES = ("ring", "torus", "exponential", "complete")


def default_strategies(
    tau: int = 8,
    *,
    formats: Sequence[PayloadFormat] = DEFAULT_FORMATS,
    topologies: Sequence[str] = DEFAULT_TOPOLOGIES,
    families: Sequence[str] = DEFAULT_FAMILIES,
    server_update: float = 0.0,
    state_copies: int = 2,
) -> list[StrategyModel]:
    """The strategies of the planner's table: DDP; local SGD and Overlap Local-SGD at ``tau`` in each of
    ``formats``; DiLoCo (fp32) and Streaming DiLoCo (2 fragments, sync delay 2) at ``tau`` when asked;
    gossip on each of ``topologies`` at ``tau``; the parameter server, sync and async, with
    ``server_update`` seconds per update; DORE (2-bit both ways, master on rank 0). ``families`` picks
    among them (:data:`FAMILIES`)."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"Unknown strategy families {unknown}: choose from {list(FAMILIES)}.")
    out: list[StrategyModel] = []
    for family in families:
        if family == "ddp":
            out.append(DDP())
        elif family == "local_sgd":
            out += [local_sgd(tau, fmt, state_copies) for fmt in formats]
        elif family == "overlap":
            out += [overlap_local_sgd(tau, fmt) for fmt in formats]
        elif family == "diloco":
            out.append(diloco(tau, FP32))
        elif family == "streaming_diloco":
            out += [streaming_diloco(tau, fmt) for fmt in formats]
        elif family == "gossip":
            out += [Gossip(topology, tau) for topology in topologies]
        elif family == "ps":
            out += [ParameterServer("sync", update_seconds=server_update)]
            out += [ParameterServer("async", update_seconds=server_update)]
        else:
            out.append(dore(update_seconds=server_update))
    return out


def plan(
    workload: Workload, link: Link, workers: Iterable[int], strategies: Sequence[StrategyModel] | None = None
) -> list[Prediction]:
    """Predict one epoch of every strategy (default: :func:`default_strategies`) for every worker count,
    in the order of ``workers`` then ``strategies``; a strategy not defined for a worker count (a torus on
    a non-square count, K-sync with k > n) is left out."""
    strategies = default_strategies() if strategies is None else strategies
    out = []
    for n in workers:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"Every worker count must be an int >= 2, got {n!r}.")
        for strategy in strategies:
            prediction = strategy.predict(workload, link, n)
            if prediction is not None:
                out.append(prediction)
    return out


def format_table(predictions: Sequence[Prediction]) -> str:
    """A fixed-width text table, one row per prediction, a blank line between worker counts."""
    headers = ["n", "strategy", "epoch s", "compute s", "comm s", "x floor", "sent/worker", "bottleneck"]
    rows: list[list[str] | None] = []
    previous = None
    for p in predictions:
        if previous is not None and p.workers != previous:
            rows.append(None)
        previous = p.workers
        rows.append(
            [
                str(p.workers),
                p.strategy,
                f"{p.epoch_seconds:.4g}",
                f"{p.compute_seconds:.4g}",
                f"{p.comm_seconds:.4g}",
                f"{p.slowdown:.2f}",
                format_bytes(p.bytes_per_worker),
                p.bottleneck,
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows if r)) for i, h in enumerate(headers)]
    right = {0, 2, 3, 4, 5, 6}

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += ["" if r is None else line(r) for r in rows]
    return "\n".join(out)
