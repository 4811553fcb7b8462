"""``commsgd lighthouse``: start the torchft Lighthouse that replica groups meet at, and keep it running
until interrupted (SIGINT / SIGTERM). Prints the address the groups pass as ``lighthouse``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from lightning_commsgd.ft.connect import start_lighthouse

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="commsgd lighthouse", description=__doc__)
    parser.add_argument("--port", type=int, default=29510, help="port to listen on (0: any free one)")
    parser.add_argument("--min-groups", type=int, default=1, help="fewest replica groups in a quorum")
    parser.add_argument(
        "--join-timeout-ms", type=int, default=1000, help="how long a quorum waits for more live groups"
    )
    parser.add_argument(
        "--heartbeat-timeout-ms", type=int, default=5000, help="a group silent this long is left out"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        server = start_lighthouse(
            args.port,
            min_groups=args.min_groups,
            join_timeout_ms=args.join_timeout_ms,
            heartbeat_timeout_ms=args.heartbeat_timeout_ms,
        )
    except ValueError as err:
        print(f"commsgd lighthouse: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"lighthouse listening at {server.address()} (min {args.min_groups} groups)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    print("lighthouse stopped", flush=True)
