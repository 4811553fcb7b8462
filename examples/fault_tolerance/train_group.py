"""One replica group of the fault-tolerance example: an MLP on scikit-learn's digits, DiLoCo between the
groups through :mod:`lightning_commsgd.ft` (torchft underneath).

Group g trains on its shard of the training set (every ``groups``-th sample from g). Which batch a step
reads follows from the step alone, so a group that heals (takes a live peer's step) also takes the right
place in its data. Prints one line per round and writes a JSON summary to ``--out``.

    python examples/fault_tolerance/train_group.py --group 0 --groups 3 --lighthouse http://localhost:29510
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.digits.data import load_digits_tensors  # noqa: E402
from lightning_commsgd.ft import ReplicaGroupSettings, connect_replica_group  # noqa: E402

TEST_SAMPLES = 297  # the last samples of load_digits: the held-out test set
BATCH = 32


def build_model(hidden: int = 128) -> nn.Module:
    torch.manual_seed(0)  # every group starts from the same x_0
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def group_data(group: int, groups: int) -> tuple[torch.Tensor, ...]:
    """``(features, labels, train_x, train_y, shard)``: the whole digits set (its last ``TEST_SAMPLES`` are
    the test set), the training part, and the indices of ``group``'s shard of it (every ``groups``-th)."""
    features, labels = load_digits_tensors()
    train_x, train_y = features[:-TEST_SAMPLES], labels[:-TEST_SAMPLES]
    return features, labels, train_x, train_y, torch.arange(group, len(train_x), groups)


def quiet_torchft() -> None:
    """torchft warns once per quorum that it has no NCCL flight recorder to reset (CPU), and torch that the
    healing transfer's buffer is read-only: neither matters here."""
    logging.getLogger("torchft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="The given buffer is not writable")


def batch_indices(shard: torch.Tensor, group: int, step: int) -> torch.Tensor:
    """The samples of ``step`` in this group's shard: a fresh permutation per epoch, seeded by group and
    epoch, so the position follows from the step."""
    per_epoch = len(shard) // BATCH
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(len(shard), generator=torch.Generator().manual_seed(1000 * group + epoch))
    return shard[order[offset * BATCH : (offset + 1) * BATCH]]


def fingerprint(model: nn.Module) -> str:
    data = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    return hashlib.sha256(data).hexdigest()[:16]


def finish(
    args: argparse.Namespace,
    algorithm: Any,
    model: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    healed: bool,
    healed_from: int | None,
    joined_at_step: int,
    seconds: float,
) -> dict[str, Any]:
    """The group's end: its test accuracy and model fingerprint printed, and the JSON summary ``run.py`` reads
    written to ``args.out`` (rounds, quorum events, bytes sent). Returns the summary."""
    with torch.no_grad():
        accuracy = float((model(features[-TEST_SAMPLES:]).argmax(1) == labels[-TEST_SAMPLES:]).float().mean())
    summary = {
        "group": args.group,
        "healed": healed,
        "healed_from": healed_from,
        "joined_at_step": joined_at_step,
        "rounds": [list(r) for r in algorithm.round_history],
        "events": [
            {k: getattr(e, k) for k in ("step", "groups", "healed", "heal_seconds", "wall_time")}
            for e in algorithm.rounds_between_groups.events
        ],
        "bytes_sent": algorithm.communicator.ledger.bytes_sent,
        "test_accuracy": accuracy,
        "model": fingerprint(model),
        "seconds": seconds,
    }
    print(
        f"[group {args.group}] done: step {algorithm.step}, test accuracy {accuracy:.3f}, "
        f"model {summary['model']}",
        flush=True,
    )
    if args.out is not None:
        args.out.write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", type=int, required=True, help="this group's index (kept when it restarts)")
    ap.add_argument("--groups", type=int, default=3, help="groups the job starts with")
    ap.add_argument("--min-groups", type=int, default=2, help="fewest groups a round may run with")
    ap.add_argument("--lighthouse", required=True, help="the Lighthouse's address, http://host:port")
    ap.add_argument("--hostname", default=None, help="address the other groups reach this one at")
    ap.add_argument("--tau", type=int, default=8, help="H, inner steps between outer steps")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps of the run")
    ap.add_argument(
        "--step-sleep", type=float, default=0.01, help="seconds added to each step (a bigger model)"
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON summary")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    quiet_torchft()
    features, labels, train_x, train_y, shard = group_data(args.group, args.groups)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)  # DiLoCo's inner optimizer
    settings = ReplicaGroupSettings(
        lighthouse=args.lighthouse,
        group=args.group,
        min_groups=args.min_groups,
        timeout=30,
        quorum_timeout=60,
        hostname=args.hostname,
    )
    algorithm = connect_replica_group(
        model, [optimizer], settings, tau=args.tau, start_groups=args.groups, start_timeout=60
    )
    healed_from: list[int] = []
    algorithm.register_extra_state("group", save=lambda: args.group, load=healed_from.append)

    start = time.perf_counter()
    membership = algorithm.join()
    joined_step = algorithm.step
    if membership.healed:
        print(
            f"[group {args.group}] healed from group {healed_from[-1]}: joins at step {algorithm.step}",
            flush=True,
        )
    else:
        print(f"[group {args.group}] started with {membership.groups} groups", flush=True)
    loss_sum, seen = 0.0, 0
    while algorithm.step < args.steps:
        index = batch_indices(shard, args.group, algorithm.step)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(train_x[index]), train_y[index])
        loss.backward()
        optimizer.step()
        loss_sum, seen = loss_sum + float(loss.detach()), seen + 1
        time.sleep(args.step_sleep)
        if algorithm.after_optimizer_step():
            step, groups, _ = (
                algorithm.round_history[-1] if algorithm.round_history else (algorithm.step, 0, False)
            )
            missed = " (no quorum: trained on locally)" if algorithm.missed_rounds else ""
            print(
                f"[group {args.group}] step {algorithm.step:4d}  loss {loss_sum / seen:.3f}  "
                f"round with {groups} groups{missed}",
                flush=True,
            )
            loss_sum, seen = 0.0, 0
    algorithm.finalize()
    finish(
        args,
        algorithm,
        model,
        features,
        labels,
        healed=membership.healed,
        healed_from=healed_from[-1] if healed_from else None,
        joined_at_step=joined_step,
        seconds=time.perf_counter() - start,
    )
    algorithm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
