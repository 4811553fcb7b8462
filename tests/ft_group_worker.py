"""One replica group (one process) of a fault-tolerance test: a plain PyTorch loop under
:class:`lightning_commsgd.ft.GroupOuterStep`, with optional self-inflicted deaths.

The run is deterministic given its membership history (see ``ft_simulation.py``, which replays it):
  * model: Sequential(Linear(8, 16), Tanh, Linear(16, 4)) after torch.manual_seed(0), on every group;
  * data: group g at optimizer step s (0-based, the run's step, which a healed group takes from its peer)
    trains on x, y = randn(16, 8), randn(16, 4) from Generator().manual_seed(1000 g + s); MSE loss;
  * inner: SGD(lr 0.1, momentum 0.9); outer: DiLoCo's SGD(lr 0.7, momentum 0.9, Nesterov) or plain
    averaging (--outer average).

Writes (torch.save) to --out: the final parameters, every round's (step, contributors, contributed), the
state after every round (parameters, anchor, inner momentum, counters) and, for a group that healed, the
group it took its state from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_commsgd import AdaComm  # noqa: E402
from lightning_commsgd.ft import (  # noqa: E402
    GroupOuterStep,
    ReplicaGroupSettings,
    averaging_outer_optimizer,
    connect_replica_group,
)


def build_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def batch(group: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * group + step)
    return torch.randn(16, 8, generator=generator), torch.randn(16, 4, generator=generator)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, algorithm: GroupOuterStep) -> dict:
    momentum = [
        optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters() if p in optimizer.state
    ]
    return {
        "step": algorithm.step,
        "rounds": algorithm.rounds,
        "params": [p.detach().clone() for p in model.parameters()],
        "anchor": algorithm.anchors[0].clone(),
        "momentum": momentum,
        "outer": [s["momentum_buffer"].clone() for s in algorithm.outer_optimizers[0].state.values()],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--group", type=int, required=True)
    ap.add_argument("--lighthouse", required=True)
    ap.add_argument("--min-groups", type=int, default=1)
    ap.add_argument("--start-groups", type=int, default=1, help="groups the job starts with (join waits)")
    ap.add_argument("--tau", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--outer", choices=["diloco", "average"], default="diloco")
    ap.add_argument("--momentum", choices=["local", "average"], default="local", help="inner state, rounds")
    ap.add_argument("--adacomm", type=int, default=None, help="tau = AdaComm(tau0=TAU, interval_steps=N)")
    ap.add_argument("--fragments", type=int, default=1, help="Streaming DiLoCo's F")
    ap.add_argument("--sync-delay", type=int, default=0, help="Streaming DiLoCo's d")
    ap.add_argument("--local-weight", type=float, default=0.0, help="Streaming DiLoCo's w")
    ap.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step (slow groups down)")
    ap.add_argument("--die-at-step", type=int, default=None, help="SIGKILL itself after this optimizer step")
    ap.add_argument(
        "--die-in-round", type=int, default=None, help="SIGKILL itself inside this round (1-based)"
    )
    ap.add_argument("--hidden", type=int, default=16, help="width (another value: a different model)")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--quorum-timeout", type=float, default=60.0)
    ap.add_argument("--max-missed-rounds", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    model = build_model()
    if args.hidden != 16:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    settings = ReplicaGroupSettings(
        lighthouse=args.lighthouse,
        group=args.group,
        min_groups=args.min_groups,
        timeout=args.timeout,
        quorum_timeout=args.quorum_timeout,
    )
    tau = (
        args.tau
        if args.adacomm is None
        else AdaComm(tau0=args.tau, interval_steps=args.adacomm, lr_aware=False)
    )
    algorithm = connect_replica_group(
        model,
        [optimizer],
        settings,
        tau=tau,
        outer_optimizer=averaging_outer_optimizer if args.outer == "average" else None,
        max_missed_rounds=args.max_missed_rounds,
        momentum=args.momentum,
        fragments=args.fragments,
        sync_delay=args.sync_delay,
        local_weight=args.local_weight,
        start_groups=args.start_groups,
        start_timeout=args.quorum_timeout,
    )
    rounds, communicator = algorithm.rounds_between_groups, algorithm.communicator
    record: dict = {"group": args.group, "healed_from": None, "after_round": []}
    algorithm.register_extra_state(
        "origin", save=lambda: args.group, load=lambda source: record.__setitem__("healed_from", source)
    )

    if args.die_in_round is not None:  # die after the round's quorum formed, before its all-reduce
        real_sum = rounds.sum_

        def dying_sum(buffer: torch.Tensor, *, tag: str) -> torch.Tensor:
            if tag == "outer_step" and algorithm.rounds + 1 == args.die_in_round:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_sum(buffer, tag=tag)

        rounds.sum_ = dying_sum  # type: ignore[method-assign]

    start = time.perf_counter()
    losses: list[float] = []  # every step's training loss
    periods: list[tuple[int, int]] = []  # (step, tau decided) after every round
    membership = algorithm.join()
    record["joined"] = {"healed": membership.healed, "step": algorithm.step, "groups": membership.groups}
    if membership.healed:
        record["after_round"].append(snapshot(model, optimizer, algorithm))
    while algorithm.step < args.steps:
        x, y = batch(args.group, algorithm.step)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        algorithm.record_batch(loss)  # for AdaComm (--adacomm); ignored by the constant period
        optimizer.step()
        if args.die_at_step is not None and algorithm.step + 1 == args.die_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if algorithm.after_optimizer_step():
            periods.append((algorithm.step, algorithm.period))
            record["after_round"].append(snapshot(model, optimizer, algorithm))
        if args.step_sleep:
            time.sleep(args.step_sleep)
    algorithm.finalize()
    record.update(
        seconds=time.perf_counter() - start,
        final=[p.detach().clone() for p in model.parameters()],
        history=list(algorithm.round_history),
        losses=losses,
        periods=periods,
        events=[dataclasses.asdict(e) for e in rounds.events],
        ledger={tag: (s.rounds, s.bytes_sent) for tag, s in communicator.ledger.by_tag.items()},
        metrics=algorithm.metrics(),
    )
    algorithm.close()
    tmp = args.out + ".tmp"
    torch.save(record, tmp)
    os.replace(tmp, args.out)
    print(f"group {args.group}: done at step {algorithm.step}, rounds {algorithm.rounds}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
