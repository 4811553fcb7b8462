"""``commsgd plan``: the scaling model on the command line.

    commsgd plan --params 1.3e6 --link 100mbit --latency 0.2ms --step-time 5ms \\
        --workers 2 4 8 16 --samples-per-epoch 50000 --batch-size 32 --tau 8

prints the predicted time per epoch of every strategy for every worker count, and the recommended tau and
payload format (the rule is printed with it). Every value takes human units (``100mbit``, ``1gbit``,
``0.5ms``, ``1.3M``); a bad one ends with a usage line and ``commsgd plan: error: argument --link: ...``
(exit status 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from lightning_commsgd.planning.formats import PAYLOAD_FORMATS, payload_format
from lightning_commsgd.planning.model import Link, Workload
from lightning_commsgd.planning.plan import (
    DEFAULT_FAMILIES,
    DEFAULT_TOPOLOGIES,
    FAMILIES,
    default_strategies,
    format_table,
    plan,
)
from lightning_commsgd.planning.recommend import RULE, recommend
from lightning_commsgd.planning.strategies import GOSSIP_TOPOLOGIES
from lightning_commsgd.planning.units import (
    format_bytes,
    format_rate,
    format_seconds,
    parse_count,
    parse_duration,
    parse_rate,
)

__all__ = ["build_parser", "main"]

MAX_WORKERS = 1 << 20


def _typed(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """An argparse ``type`` from a parser that raises ValueError (argparse then names the flag)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = what  # argparse's fallback message names the type
    return convert


def _int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = parse_count(text) if text.strip() not in ("0", "-0") else 0
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be an integer {bound}, got {text!r}")
        return value

    return _typed(parse, "int")


def _fraction(low: float, high: float, *, open_low: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if not (low < value <= high if open_low else low <= value <= high):
            raise ValueError(f"must be in {'(' if open_low else '['}{low:g}, {high:g}], got {text!r}")
        return value

    return _typed(parse, "float")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="commsgd plan",
        description="The scaling model: predicted time per epoch of every strategy for each worker count, and"
        " a recommended averaging period tau and payload format.",
        epilog="The model, its formulas and what it leaves out: docs/guide.md, 'Planning a run'.",
    )
    model = parser.add_argument_group("model and link")
    model.add_argument(
        "--params", type=_typed(parse_count, "count"), required=True, help="P: 1.3e6, 1.3M, 7B"
    )
    model.add_argument(
        "--link",
        type=_typed(parse_rate, "rate"),
        required=True,
        help="B, each worker's link to the switch: 100mbit, 1gbit, 10gbit, 12MB/s",
    )
    model.add_argument(
        "--latency",
        type=_typed(lambda t: parse_duration(t, allow_zero=True), "duration"),
        default=0.0,
        help="alpha, per message step: 0.2ms, 50us (default 0)",
    )
    model.add_argument(
        "--efficiency",
        type=_fraction(0, 1, open_low=True),
        default=1.0,
        help="share of B carrying payload (default 1.0; about 0.94 for TCP/IP over Ethernet)",
    )
    model.add_argument(
        "--step-time",
        type=_typed(parse_duration, "duration"),
        required=True,
        help="t_c, compute per optimizer step on one worker: 5ms",
    )
    work = parser.add_argument_group(
        "epoch (give --steps-per-epoch, or --samples-per-epoch and --batch-size)"
    )
    work.add_argument("--steps-per-epoch", type=_int_at_least(1), help="steps per worker per epoch, fixed")
    work.add_argument(
        "--samples-per-epoch",
        type=_int_at_least(1),
        help="samples per epoch; steps = ceil(ceil(N / n) / batch)",
    )
    work.add_argument("--batch-size", type=_int_at_least(1), help="samples per step per worker")
    strat = parser.add_argument_group("strategies")
    strat.add_argument(
        "--workers",
        type=_int_at_least(2, MAX_WORKERS),
        nargs="+",
        default=[2, 4, 8, 16, 32],
        help="worker counts n (default 2 4 8 16 32)",
    )
    strat.add_argument(
        "--tau", type=_int_at_least(1), default=8, help="tau of the table's periodic strategies"
    )
    strat.add_argument(
        "--formats",
        nargs="+",
        default=["fp32", "bf16", "int8", "int4"],
        help=f"payload formats: {', '.join(PAYLOAD_FORMATS)} or bits per value (e.g. 3.2)",
    )
    strat.add_argument(
        "--strategies",
        nargs="+",
        choices=FAMILIES,
        default=list(DEFAULT_FAMILIES),
        metavar="FAMILY",
        help=f"families in the table: {', '.join(FAMILIES)} (default: {' '.join(DEFAULT_FAMILIES)})",
    )
    strat.add_argument(
        "--topologies",
        nargs="+",
        choices=GOSSIP_TOPOLOGIES,
        default=list(DEFAULT_TOPOLOGIES),
        metavar="TOPOLOGY",
        help=f"gossip graphs: {', '.join(GOSSIP_TOPOLOGIES)}",
    )
    strat.add_argument(
        "--state-copies",
        type=_int_at_least(1, 8),
        default=2,
        help="values averaged per parameter by local SGD: 1 parameters only, 2 with SGD momentum (default)",
    )
    strat.add_argument(
        "--server-update",
        type=_typed(lambda t: parse_duration(t, allow_zero=True), "duration"),
        default=0.0,
        help="u, the parameter server's (and DORE master's) time per update (default 0)",
    )
    rec = parser.add_argument_group("recommendation")
    rec.add_argument("--slack", type=_fraction(0, 10), default=0.10, help="target: within this of the floor")
    rec.add_argument("--max-tau", type=_int_at_least(1), default=1024, help="largest tau tried (powers of 2)")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.steps_per_epoch is None) == (args.samples_per_epoch is None):
        parser.error("give exactly one of --steps-per-epoch and --samples-per-epoch")
    if args.samples_per_epoch is not None and args.batch_size is None:
        parser.error("--samples-per-epoch needs --batch-size (samples per step per worker)")
    if args.steps_per_epoch is not None and args.batch_size is not None:
        parser.error("--batch-size goes with --samples-per-epoch, not --steps-per-epoch")
    try:
        args.formats = [payload_format(f) for f in args.formats]
    except ValueError as err:
        parser.error(f"argument --formats: {err}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``commsgd plan`` with ``argv`` (without the ``plan`` word); prints the table and the
    recommendation, returns 0. A bad argument exits with status 2 and one error line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    link = Link(args.link, args.latency, args.efficiency)
    workload = Workload(
        params=args.params,
        step_seconds=args.step_time,
        steps_per_epoch=args.steps_per_epoch,
        samples_per_epoch=args.samples_per_epoch,
        batch_size=args.batch_size,
    )
    strategies = default_strategies(
        args.tau,
        formats=args.formats,
        topologies=args.topologies,
        families=args.strategies,
        server_update=args.server_update,
        state_copies=args.state_copies,
    )
    workers = sorted(set(args.workers))
    if args.steps_per_epoch is not None:
        steps = f"{args.steps_per_epoch} steps per worker"
    else:
        steps = f"ceil(ceil({args.samples_per_epoch} / n) / {args.batch_size}) steps per worker"
    print(
        f"commsgd plan: P = {args.params:,} parameters ({format_bytes(4 * args.params)} in fp32), "
        f"B = {format_rate(args.link)} per worker link (payload {format_bytes(link.bytes_per_second)}/s), "
        f"alpha = {format_seconds(args.latency)}, t_c = {format_seconds(args.step_time)} per step, "
        f"{steps} per epoch; periodic strategies at tau = {args.tau}"
    )
    print("Predicted time per epoch (comm s: communication not hidden behind compute; x floor: epoch /")
    print("(steps x t_c); sent/worker: payload bytes one worker sends per epoch):\n")
    print(format_table(plan(workload, link, workers, strategies)))
    taus = [2**k for k in range(args.max_tau.bit_length()) if 2**k <= args.max_tau]
    print(f"\nRecommendation ({RULE}; slack {args.slack:.0%}, tau in 1..{taus[-1]} by powers of 2):")
    for n in workers:
        choice = recommend(
            workload,
            link,
            n,
            taus=taus,
            formats=args.formats,
            slack=args.slack,
            state_copies=args.state_copies,
        )
        print(f"  {choice.describe()}")
    return 0
