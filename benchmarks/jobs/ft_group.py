"""One replica group of ``bench_ft``: the fault-tolerance example's group (an MLP on digits, inner AdamW,
DiLoCo between groups), with what the benchmark needs on top: a per-step compute time (``--step-sleep``,
so that several groups share this machine's cores), a JSON line per completed round in ``--events``, and,
for the stop-and-resume baseline, a checkpoint every ``--checkpoint-every`` rounds and ``--resume-step``.

    python -m benchmarks.jobs.ft_group --group 0 --groups 3 --lighthouse http://10.77.0.1:29510 \\
        --hostname 10.77.0.1 --steps 3000 --events /tmp/events.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from examples.fault_tolerance.train_group import (
    TEST_SAMPLES,
    batch_indices,
    build_model,
    group_data,
    quiet_torchft,
)
from lightning_commsgd.ft import ReplicaGroupSettings, connect_replica_group


def checkpoint_path(folder: Path, group: int, step: int) -> Path:
    return folder / f"group{group}_step{step}.pt"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", type=int, required=True)
    ap.add_argument("--groups", type=int, required=True, help="groups the job starts with")
    ap.add_argument("--lighthouse", required=True)
    ap.add_argument("--hostname", default=None)
    ap.add_argument("--tau", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--step-sleep", type=float, default=0.02, help="emulated compute seconds per step")
    ap.add_argument("--events", type=Path, required=True, help="JSON lines, one per completed round")
    ap.add_argument("--checkpoint-dir", type=Path, default=None)
    ap.add_argument("--checkpoint-every", type=int, default=0, help="rounds between checkpoints (0: none)")
    ap.add_argument("--resume-step", type=int, default=0, help="load this step's checkpoint first")
    ap.add_argument("--quorum-timeout", type=float, default=60.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    quiet_torchft()
    features, labels, train_x, train_y, shard = group_data(args.group, args.groups)
    model = build_model(args.hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    settings = ReplicaGroupSettings(
        lighthouse=args.lighthouse,
        group=args.group,
        min_groups=1,
        timeout=30,
        quorum_timeout=args.quorum_timeout,
        hostname=args.hostname,
    )
    algorithm = connect_replica_group(
        model,
        [optimizer],
        settings,
        tau=args.tau,
        start_groups=args.groups,
        start_timeout=args.quorum_timeout,
        max_missed_rounds=10,
    )
    if args.resume_step:
        assert args.checkpoint_dir is not None
        state = torch.load(
            checkpoint_path(args.checkpoint_dir, args.group, args.resume_step), weights_only=False
        )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        algorithm.load_state_dict(state["algorithm"])

    def log(kind: str, **fields: object) -> None:
        with args.events.open("a") as out:
            out.write(json.dumps({"t": time.time(), "group": args.group, "kind": kind, **fields}) + "\n")

    membership = algorithm.join()
    log("joined", step=algorithm.step, healed=membership.healed, groups=membership.groups)
    while algorithm.step < args.steps:
        index = batch_indices(shard, args.group, algorithm.step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(train_x[index]), train_y[index]).backward()
        optimizer.step()
        time.sleep(args.step_sleep)
        if algorithm.after_optimizer_step() and algorithm.round_history:
            step, contributors, contributed = algorithm.round_history[-1]
            if step == algorithm.step:  # this round committed (a missed round leaves no entry)
                log("round", step=step, contributors=contributors, contributed=contributed)
                if args.checkpoint_every and algorithm.rounds % args.checkpoint_every == 0:
                    assert args.checkpoint_dir is not None
                    target = checkpoint_path(args.checkpoint_dir, args.group, step)
                    state = {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "algorithm": algorithm.state_dict(),
                    }
                    torch.save(state, target.with_suffix(".tmp"))
                    target.with_suffix(".tmp").replace(target)
    algorithm.finalize()
    with torch.no_grad():
        accuracy = float((model(features[-TEST_SAMPLES:]).argmax(1) == labels[-TEST_SAMPLES:]).float().mean())
    log("done", step=algorithm.step, accuracy=accuracy, bytes_sent=algorithm.communicator.ledger.bytes_sent)
    algorithm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
