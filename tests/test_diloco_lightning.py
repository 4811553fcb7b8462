"""DiLoCo, Streaming DiLoCo and SlowMo under a real multi-process Lightning Trainer
(``tests/lightning_worker.py --strategy diloco|streaming_diloco|slowmo``, built by ``create_strategy``),
checked against the single-process simulation of docs/ALGORITHMS.md section 9 (``tests/diloco_simulation.py``)
on the worker's model, data order, loss and optimizers: bitwise on 2 ranks (the same sums in the same
order), the ledger's bytes per round, and the outer figures on CommunicationMonitor's logged metrics.

The plain-loop runs against the same simulation: tests/test_diloco.py; resuming under the Trainer from a
step with a fragment in flight: tests/test_resume_matrix.py; Fabric: tests/test_fabric.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
from diloco_simulation import simulate_diloco
from torch import nn
from toy_problem import lightning_batches, make_net, mse

pytestmark = pytest.mark.multiprocess

NESTEROV = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)  # the paper's outer SGD
# the LightningModule's parameters are named "net.0.weight", ...: the fragments name them so in the run and
# in the simulation (whose model is wrapped alike); net.0 (Linear 6 -> 16) and net.2 (Linear 16 -> 1)
FRAGMENTS = [["net.0"], ["net.2"]]
FRAGMENT_NUMEL = [6 * 16 + 16, 16 + 1]
NUMEL = sum(FRAGMENT_NUMEL)


class _Wrapped(nn.Module):
    """The toy net under the attribute ``net``, as the worker's LightningModule holds it (same parameter
    names and order)."""

    def __init__(self, batch_norm: bool = False) -> None:
        super().__init__()
        self.net = make_net(100, batch_norm)  # rank 0's x_0: the strategy broadcasts it


def _loss(module: nn.Module, batch) -> torch.Tensor:
    return mse(module.net, batch)


def _sgd(module: nn.Module) -> torch.optim.Optimizer:
    """The worker's ``--optimizer sgd``."""
    return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)


def _batches(steps: int):
    return [[step[0] for step in rank] for rank in lightning_batches(2, steps)]


def _max_diff(records, simulated) -> float:
    """Every step's parameters and the parameters after fit (the simulation's finalize entry), all ranks."""
    diffs = []
    for record, sim in zip(records, simulated, strict=True):
        assert len(sim) == len(record["params"]) + 1  # the steps, then finalize
        diffs += [float((a - s).abs().max()) for a, s in zip(record["params"], sim[:-1], strict=True)]
        diffs.append(float((record["final_params"] - sim[-1]).abs().max()))
    return max(diffs)


def _diloco_args(strategy: str, tau: int, steps: int, *extra: str) -> list[str]:
    return ["--strategy", strategy, "--tau", str(tau), "--max-steps", str(steps), *extra]


def _algorithm_bytes(by_tag: dict) -> dict[str, int]:
    """Bytes sent by the algorithm's rounds, by tag (every tag but the framework's and the setup's)."""
    return {
        tag: stats["bytes_sent"]
        for tag, stats in by_tag.items()
        if tag != "setup_broadcast" and not tag.startswith("lightning_")
    }


def _per_step(values: list[float]) -> list[float]:
    """The increments of a cumulative logged metric, step by step (the first step's against 0)."""
    return [b - a for a, b in zip([0.0, *values], values)]


def test_diloco_matches_the_simulation_bitwise(run_worker):
    """DiLoCoStrategy(tau=4, outer SGD lr 0.7, momentum 0.9, Nesterov) on 2 processes: after every step and
    after fit each rank's parameters are bitwise the simulation's; replicas drift between outer steps and
    agree after each; one all-reduce per outer step, of the pseudo-gradient and the finite flags; the
    monitor logs the outer lr and the pseudo-gradient's norm, which moves at outer steps only."""
    steps, tau = 10, 4  # outer steps at 4 and 8; fit ends mid-period: the final outer step runs too
    records = run_worker(*_diloco_args("diloco", tau, steps))
    assert len(records) == 2 and all(len(rec["params"]) == steps for rec in records)
    simulated = simulate_diloco(_Wrapped, _sgd, _batches(steps), _loss, tau=tau, make_outer=NESTEROV)
    assert _max_diff(records, simulated) == 0.0
    # the comparison has teeth: replicas differ mid-period, agree after an outer step and after fit, and
    # the outer Nesterov step is not plain averaging (outer SGD lr 1: local SGD with local momentum)
    assert float((records[0]["params"][1] - records[1]["params"][1]).abs().max()) > 1e-4
    assert torch.equal(records[0]["params"][tau - 1], records[1]["params"][tau - 1])
    assert torch.equal(records[0]["final_params"], records[1]["final_params"])
    averaging = simulate_diloco(
        _Wrapped, _sgd, _batches(steps), _loss, tau=tau,
        make_outer=functools.partial(torch.optim.SGD, lr=1.0),
    )  # fmt: skip
    assert _max_diff(records, averaging) > 1e-3

    round_bytes = (NUMEL + 2) * 4  # the fp32 pseudo-gradient and one finite flag per rank
    for rec in records:
        in_batch = [c for c in rec["calls"] if c["in_batch"]]
        assert [(c["step"], c["fn"], c["bytes"]) for c in in_batch] == [
            (t, "all_reduce", round_bytes) for t in range(steps) if (t + 1) % tau == 0
        ]
        # the outer steps at 4 and 8, and fit's last one (steps 9 and 10 since the latest)
        assert _algorithm_bytes(rec["ledger"]["by_tag"]) == {
            "outer_step": (steps // tau) * round_bytes,
            "final": round_bytes,
        }
        assert rec["ledger"]["by_tag"]["outer_step"]["rounds"] == steps // tau
        logged = rec["logged"]
        assert logged["comm/outer_lr"] == [pytest.approx(0.7)] * steps
        norms = logged["comm/pseudo_gradient_norm"]
        assert norms[: tau - 1] == [0.0] * (tau - 1) and all(n > 0 for n in norms[tau - 1 :])
        moved = [t + 1 for t in range(1, steps) if norms[t] != norms[t - 1]]
        assert moved == [tau, 2 * tau]
        assert _per_step(logged["comm/bytes_sent"])[tau - 1 :: tau] == [round_bytes] * (steps // tau)


def test_streaming_diloco_int4_matches_the_simulation_bitwise(run_worker):
    """StreamingDiLoCoStrategy, 2 explicit fragments, H=4 (K=2), sync_delay=1, local_weight=0.5, int4
    pseudo-gradients: fragment f sends at steps 2f+1 (mod 4), on the helper thread, and lands a step later,
    merged 50/50 with the local value then. Bitwise the simulation (the same seeded int4 rounding), and
    not the exact-mean run; each round carries one fragment, its int4 payload (4-byte scale per 64 values,
    two values a byte), recorded when it lands; fit ends on the global model on both ranks."""
    steps, tau = 10, 4
    extra = ["--fragments", '[["net.0"], ["net.2"]]', "--sync-delay", "1", "--local-weight", "0.5"]
    records = run_worker(*_diloco_args("streaming_diloco", tau, steps, *extra, "--compressor", "int4"))
    kwargs = {"tau": tau, "make_outer": NESTEROV, "fragments": FRAGMENTS, "sync_delay": 1}
    kwargs["local_weight"] = 0.5
    simulated = simulate_diloco(_Wrapped, _sgd, _batches(steps), _loss, compressor="int4", **kwargs)
    assert _max_diff(records, simulated) == 0.0
    exact = simulate_diloco(_Wrapped, _sgd, _batches(steps), _loss, **kwargs)
    assert 0 < _max_diff(records, exact) <= 0.1  # the int4 rounding of a few outer steps
    assert float((records[0]["params"][-1] - records[1]["params"][-1]).abs().max()) > 1e-4  # merged 50/50
    assert torch.equal(records[0]["final_params"], records[1]["final_params"])

    def int4_bytes(numel: int) -> int:
        return 4 * -(-numel // 64) + -(-numel // 2)

    fragment_bytes = [int4_bytes(n) for n in FRAGMENT_NUMEL]
    assert fragment_bytes == [64, 13] and int4_bytes(NUMEL) == 77  # a whole-model round would carry 77
    sends = {t: (t // 2) % 2 for t in range(1, steps + 1, 2)}  # send step -> fragment: 1->0, 3->1, 5->0...
    landings = [t + 1 for t in sends]  # 2, 4, 6, 8, 10: every send lands within the fit
    assert landings[-1] == steps
    for rec in records:
        # one batch of messages per send, on the helper thread (the step it stamps races with the training
        # loop, so only the thread is checked); no collective on the training thread inside a batch
        background = [c["fn"] for c in rec["calls"] if c["thread"] == "commsgd-outer_step"]
        assert background == ["batch_isend_irecv"] * len(sends)
        assert not [c for c in rec["calls"] if c["in_batch"] and c["thread"] == "MainThread"]
        by_tag = rec["ledger"]["by_tag"]
        assert set(_algorithm_bytes(by_tag)) == {"outer_step", "final"}
        assert by_tag["outer_step"]["rounds"] == len(sends)
        assert by_tag["outer_step"]["bytes_sent"] == sum(fragment_bytes[f] for f in sends.values())
        # every landing merged with w = 0.5 (no fragment equals the global value): fit's last sync sends both
        # fragments and lands them with w = 0
        assert by_tag["final"]["rounds"] == 2 and by_tag["final"]["bytes_sent"] == sum(fragment_bytes)
        # per step: the landing fragment's bytes at t + 1, nothing otherwise
        expected = [0.0] * steps
        for t, f in sends.items():
            expected[t] = float(fragment_bytes[f])
        logged = rec["logged"]
        assert _per_step(logged["comm/bytes_sent"])[1:] == expected[1:]
        assert logged["comm/rounds"] == [float(sum(t <= s for t in landings)) for s in range(1, steps + 1)]
        assert logged["comm/outer_lr"] == [pytest.approx(0.7)] * steps
        norms = logged["comm/pseudo_gradient_norm"]
        assert norms[0] == 0.0 and all(n > 0 for n in norms[1:])
        assert [t + 1 for t in range(1, steps) if norms[t] != norms[t - 1]] == landings


def test_slowmo_follows_the_inner_lr_schedule(run_worker):
    """SlowMoStrategy(tau=3, slow_lr alpha=1, slow_momentum beta=0.5) with a per-step StepLR(3, 0.5) on the
    inner SGD: every outer step divides the pseudo-gradient by the inner lr gamma and steps with lr
    alpha * gamma. Lightning steps the scheduler after the optimizer step and the strategy's hook, so the
    outer step at step t sees the lr step t used; the simulation steps each replica's scheduler before the
    next step's loss, which is the same. Bitwise the simulation, and not outer SGD(alpha, beta) on the
    unscaled pseudo-gradient (SlowMo with gamma frozen at its first value)."""
    steps, tau = 10, 3

    def simulate(slowmo: bool):
        schedulers: dict[int, torch.optim.lr_scheduler.LRScheduler] = {}
        started: set[int] = set()

        def inner(module):
            optimizer = _sgd(module)
            schedulers[id(module)] = torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5)
            return optimizer

        def loss(module, batch):
            if id(module) in started:  # after the previous step and its outer step, as Lightning does
                schedulers[id(module)].step()
            started.add(id(module))
            return _loss(module, batch)

        slow = functools.partial(torch.optim.SGD, lr=1.0, momentum=0.5)
        batches = _batches(steps)
        return simulate_diloco(_Wrapped, inner, batches, loss, tau=tau, make_outer=slow, slowmo=slowmo)

    # fit's final outer step (step 10) sees gamma = 0.1 * 0.5^3 in both: after 9 (simulation) or 10
    # (Lightning) scheduler steps
    records = run_worker(*_diloco_args("slowmo", tau, steps, "--scheduler"))
    assert _max_diff(records, simulate(slowmo=True)) == 0.0
    assert _max_diff(records, simulate(slowmo=False)) > 1e-3
    # the outer lr alpha * gamma: alpha before the first outer step, then gamma of steps 3, 6, 9
    gammas = [1.0] * 2 + [0.1] * 3 + [0.05] * 3 + [0.025] * 2
    for rec in records:
        assert rec["logged"]["comm/outer_lr"] == [pytest.approx(g) for g in gammas]
