"""Runs the Fabric strategies on 2 CPU processes and records what each rank did, case after case.

Launched by tests/test_fabric.py as ``python tests/fabric_worker.py --out DIR [--cases a b ...]``; Fabric's
popen launcher re-runs this script for rank 1. Every case builds its own ``Fabric`` and strategy in the
same two processes (the process group of the first launch is reused). Each rank writes ``DIR/rank{r}.pt``:
per case, its flat parameters after every optimizer step, after ``finalize()``, its ledger, and what the
case checks besides (the consensus model mid-period, Fabric's collectives, a resumed run).

A case with ``save_at=k`` saves with ``fabric.save`` after step k, runs on to the end, then a *resumed* run
(a new Fabric, strategy, model with other initial weights, and optimizer) loads that file with
``fabric.load`` and continues from step k: its parameters must equal the uninterrupted run's bitwise.
"""

from __future__ import annotations

import argparse
import functools
import os

import torch

torch.set_num_threads(1)

from lightning.fabric import Fabric  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from toy_problem import BATCH_SIZE, lightning_batches, make_dataset, make_net, mse  # noqa: E402

from lightning_commsgd import QSGD, AdaComm, PNormQuantizer, TopK, create_strategy  # noqa: E402
from lightning_commsgd.fabric import (  # noqa: E402
    DiLoCoStrategy,
    DoubleResidualStrategy,
    ElasticAveragingStrategy,
    LocalSGDStrategy,
    OverlapLocalSGDStrategy,
    StreamingDiLoCoStrategy,
)

WORLD_SIZE = 2


def _sgd(module):
    return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)


def _sgd_plain(module):
    return torch.optim.SGD(module.parameters(), lr=0.1)


#: DiLoCo's outer optimizer, the paper's
NESTEROV = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)
#: Streaming DiLoCo's fragments of the toy net (Fabric hands the algorithm the plain nn.Sequential)
FRAGMENTS = [["0"], ["2"]]


#: name -> the strategy, the optimizer, steps, and options (see run_case)
CASES = {
    # PR-SGD-Momentum with BatchNorm, data through fabric.setup_dataloaders; consensus evaluation and a
    # checkpoint inside it at step 5 (mid-period: rounds at 3, 6, 9)
    "local_sgd": dict(
        strategy=lambda: LocalSGDStrategy(tau=3, momentum="average"),
        opt=_sgd,
        steps=10,
        batch_norm=True,
        loader=True,
        consensus_at=5,
        save_at=5,
        collectives=True,
    ),
    # AdaComm in step mode: the losses fabric.backward records drive tau
    "adacomm": dict(
        strategy=lambda: LocalSGDStrategy(tau=AdaComm(tau0=6, interval_steps=5)),
        opt=_sgd_plain,
        steps=24,
    ),
    # the package's factory, a registry name
    "gossip": dict(
        strategy=lambda: create_strategy("decentralized_sgd", "fabric", topology="ring", tau=2),
        opt=_sgd,
        steps=8,
    ),
    "elastic": dict(strategy=lambda: ElasticAveragingStrategy(tau=3), opt=_sgd, steps=10, save_at=4),
    "overlap": dict(
        strategy=lambda: OverlapLocalSGDStrategy(tau=3, alpha=0.6),
        opt=_sgd,
        steps=10,
        save_at=4,
    ),
    "dore": dict(
        strategy=lambda: DoubleResidualStrategy(compressor=PNormQuantizer(float("inf"), 16)),
        opt=_sgd,
        steps=6,
        save_at=3,
    ),
    # gradient accumulation: every backward pass but the last under fabric.no_backward_sync
    "qsgd": dict(
        strategy=lambda: create_strategy("qsgd", "fabric", compressor=QSGD(2, 32)),
        opt=_sgd,
        steps=5,
        accumulate=2,
    ),
    "mem_sgd": dict(
        strategy=lambda: create_strategy("mem_sgd", "fabric", compressor=TopK(0.2)),
        opt=_sgd,
        steps=5,
        save_at=2,
    ),
    # outer steps at 4 and 8; saved mid-period (the anchor and the outer momentum in the checkpoint)
    "diloco": dict(
        strategy=lambda: DiLoCoStrategy(tau=4, outer_optimizer=NESTEROV),
        opt=_sgd,
        steps=10,
        save_at=6,
    ),
    # H=4, K=2, d=1: fragment 0 sends at 1, 5, 9 and lands a step later, fragment 1 at 3, 7; saved at 5
    # with fragment 0 in flight (its int4 mean is in the checkpoint and lands at 6 after the load)
    "streaming_diloco": dict(
        strategy=lambda: StreamingDiLoCoStrategy(
            tau=4,
            fragments=FRAGMENTS,
            sync_delay=1,
            local_weight=0.5,
            outer_optimizer=NESTEROV,
            compressor="int4",
        ),
        opt=_sgd,
        steps=10,
        save_at=5,
    ),
}


def _flat(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])


def _train(fabric, model, optimizer, batches, start, stop, record, case, ckpt=None):
    """Optimizer steps ``start .. stop - 1`` on ``batches[t]`` (a list of micro-batches per step); with
    ``ckpt``, the case's consensus evaluation and checkpoint."""
    strategy = fabric.strategy
    for t in range(start, stop):
        group = batches[t]
        optimizer.zero_grad()
        for i, micro in enumerate(group):
            with fabric.no_backward_sync(model, enabled=i < len(group) - 1):
                loss = mse(model, micro)
                fabric.backward(loss / len(group))
        optimizer.step()
        record["params"].append(_flat(model))
        record["average_rounds"].append(strategy.communicator.ledger.tag("average").rounds)
        record["metrics"].append(dict(strategy.algorithm.metrics()))
        if ckpt is None:
            continue
        if case.get("consensus_at") == t + 1:
            with strategy.consensus_model():
                record["consensus"] = _flat(model)
                if case.get("save_at") == t + 1:
                    fabric.save(ckpt, {"model": model, "optimizer": optimizer, "step": t + 1})
            record["after_consensus"] = _flat(model)
        elif case.get("save_at") == t + 1:
            fabric.save(ckpt, {"model": model, "optimizer": optimizer, "step": t + 1})


def _setup(case, seed):
    fabric = Fabric(accelerator="cpu", devices=WORLD_SIZE, strategy=case["strategy"]())
    fabric.launch()
    model = make_net(seed + fabric.global_rank, case.get("batch_norm", False))  # x_0 differs per rank
    model, optimizer = fabric.setup(model, case["opt"](model))
    return fabric, model, optimizer


def run_case(name: str, out: str) -> dict:
    case = CASES[name]
    steps, accumulate = case["steps"], case.get("accumulate", 1)
    ckpt = os.path.join(out, f"{name}.ckpt")
    fabric, model, optimizer = _setup(case, seed=100)
    rank = fabric.global_rank
    record: dict = {"params": [], "average_rounds": [], "metrics": []}
    if case.get("loader"):  # Fabric's DistributedSampler (distributed_sampler_kwargs), one epoch
        loader = fabric.setup_dataloaders(DataLoader(make_dataset(), batch_size=BATCH_SIZE, shuffle=True))
        batches = [[batch] for batch in loader][:steps]
    else:
        batches = lightning_batches(WORLD_SIZE, steps, accumulate)[rank]
    _train(fabric, model, optimizer, batches, 0, steps, record, case, ckpt)
    record["before_finalize"] = _flat(model)
    fabric.strategy.finalize()
    record["final"] = _flat(model)
    if case.get("collectives"):  # Fabric's own collectives, through the communicator
        record["reduced"] = fabric.all_reduce(torch.tensor([rank + 1.0]), reduce_op="sum").tolist()
        record["broadcast"] = fabric.broadcast(f"from rank {rank}", src=1)
        record["gathered"] = fabric.all_gather(torch.tensor([float(rank)])).tolist()
        fabric.barrier()
    record["ledger"] = fabric.strategy.communicator.ledger.as_dict()
    fabric.strategy.teardown()

    if case.get("save_at"):
        k = case["save_at"]
        fabric, model, optimizer = _setup(case, seed=300)  # other weights: the load must replace them
        state = {"model": model, "optimizer": optimizer, "step": 0}
        remainder = fabric.load(ckpt, state)
        resumed: dict = {"params": [], "average_rounds": [], "metrics": [], "step": state["step"]}
        resumed["remainder"] = sorted(remainder)
        _train(fabric, model, optimizer, batches, k, steps, resumed, case)
        fabric.strategy.finalize()
        resumed["final"] = _flat(model)
        resumed["ledger"] = fabric.strategy.communicator.ledger.as_dict()
        fabric.strategy.teardown()
        record["resumed"] = resumed
    return record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    records = {name: run_case(name, args.out) for name in args.cases}
    rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.save(records, os.path.join(args.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
