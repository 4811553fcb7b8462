"""The Fabric adapter: every algorithm on 2 gloo CPU processes against its single-process reference, the
ledger, bitwise resume through fabric.save / fabric.load, the registry, bad input, and the example.

One launch of tests/fabric_worker.py runs every case (each with its own Fabric and strategy) in the same two
processes; the tests below read its records.
"""

from __future__ import annotations

import ast
import copy
import re

import pytest
import torch
import torch.distributed as dist
from compression_simulation import simulate_compressed_sgd, simulate_dore
from conftest import REPO_ROOT, TESTS_DIR, run_script
from diloco_simulation import simulate_diloco
from fabric_worker import FRAGMENTS, NESTEROV
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import MixedPrecision
from lightning.fabric.strategies import STRATEGY_REGISTRY
from simulation import flat_params, simulate_local_sgd, simulate_overlap_local_sgd
from toy_problem import lightning_batches, make_net, mse

import lightning_commsgd.fabric as commsgd_fabric
from lightning_commsgd import QSGD, PNormQuantizer, TopK
from lightning_commsgd.fabric import (
    CommunicationStrategy,
    DecentralizedSGDStrategy,
    DoubleResidualStrategy,
    ElasticAveragingStrategy,
    LocalSGDStrategy,
)
from lightning_commsgd.registry import ENTRIES

# the Fabric adapter's private hooks (lightning_commsgd.internals) run on both ends of the declared range:
# make test-oldest-lightning runs this file on the oldest
pytestmark = pytest.mark.lightning_smoke

NUMEL = sum(p.numel() for p in make_net(100).parameters())
PNORM = PNormQuantizer(float("inf"), 16)


def _sgd(module):
    return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)


def _sgd_plain(module):
    return torch.optim.SGD(module.parameters(), lr=0.1)


def _batches(steps, accumulate=1):
    """``out[r][t]``: rank r's batch at step t (a list of micro-batches when accumulating)."""
    per_rank = lightning_batches(2, steps, accumulate)
    return per_rank if accumulate > 1 else [[group[0] for group in rank] for rank in per_rank]


def _max_diff(records, sim):
    """Largest difference between each rank's parameters after every step and the reference's: ``sim[r]``
    per rank, or one trajectory shared by every rank."""
    per_rank = sim if isinstance(sim[0], list) else [sim] * len(records)
    return max(
        float((a - s.double()).abs().max())
        for rec, ref in zip(records, per_rank)
        for a, s in zip(rec["params"], ref)
    )


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """case -> [rank 0's record, rank 1's record], and the folder of the run (checkpoints)."""
    out = tmp_path_factory.mktemp("fabric")
    run_script([str(TESTS_DIR / "fabric_worker.py"), "--out", str(out)], timeout=400)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return {name: [ranks[0][name], ranks[1][name]] for name in ranks[0]}, out


# -- the algorithms against their references -----------------------------------------------------------
@pytest.mark.multiprocess
def test_local_sgd_matches_simulation_with_consensus_evaluation(records):
    """PR-SGD-Momentum with BatchNorm on Fabric's DistributedSampler: every rank equals the simulation after
    every step; consensus_model() shows the mean mid-period and gives each rank its own replica back;
    finalize() leaves the mean on every rank; Fabric's collectives are counted under the framework tags."""
    recs = records[0]["local_sgd"]
    steps, tau = 10, 3
    sim = simulate_local_sgd(make_net(100, True), _sgd, _batches(steps), mse, tau=tau, momentum="average")
    assert _max_diff(recs, sim) <= 1e-6
    assert float((recs[0]["params"][4] - recs[1]["params"][4]).abs().max()) > 1e-4  # step 5: mid-period
    assert torch.equal(recs[0]["params"][2], recs[1]["params"][2])  # step 3: a round
    for rec in recs:
        assert torch.allclose(rec["consensus"], (sim[0][4] + sim[1][4]) / 2, atol=1e-6)
        assert torch.equal(rec["after_consensus"], rec["params"][4])
        assert torch.allclose(rec["final"], (sim[0][-1] + sim[1][-1]) / 2, atol=1e-6)
    assert torch.equal(recs[0]["final"], recs[1]["final"])

    net = make_net(100, True)
    params = sum(p.numel() for p in net.parameters())
    buffers = sum(b.numel() for b in net.buffers() if torch.is_floating_point(b))
    round_bytes = (2 * params + buffers + 2) * 4  # parameters, momentum, BatchNorm statistics, finite flags
    by_tag = recs[0]["ledger"]["by_tag"]
    assert by_tag["average"]["rounds"] == steps // tau
    assert by_tag["average"]["bytes_sent"] == (steps // tau) * round_bytes
    assert by_tag["final"]["rounds"] == 1 and by_tag["eval_consensus"]["rounds"] == 1
    assert by_tag["setup_broadcast"]["rounds"] == 1 and by_tag["checkpoint"]["rounds"] == 1
    for tag in ("lightning_reduce", "lightning_broadcast", "lightning_all_gather", "lightning_barrier"):
        assert by_tag[tag]["rounds"] >= 1, tag
    assert recs[0]["reduced"] == [3.0] and recs[1]["broadcast"] == "from rank 1"
    assert recs[0]["gathered"] == [[0.0], [1.0]]


@pytest.mark.multiprocess
def test_adacomm_schedule_from_the_losses_fabric_records(records):
    """AdaComm in step mode: the losses fabric.backward recorded move tau alike on both ranks (without them
    AdaComm raises), and the run equals local SGD averaged at exactly the steps it chose."""
    recs = records[0]["adacomm"]
    taus = [m["tau"] for m in recs[0]["metrics"]]
    assert taus[0] == 6 and len(set(taus)) > 1
    assert taus == [m["tau"] for m in recs[1]["metrics"]]
    counts = recs[0]["average_rounds"]
    round_steps = {t + 1 for t in range(len(counts)) if counts[t] > (counts[t - 1] if t else 0)}
    assert 6 in round_steps and len(round_steps) >= 3
    sim = _simulate_rounds(make_net(100), _sgd_plain, _batches(len(counts)), round_steps)
    assert _max_diff(recs, sim) <= 1e-6


def _simulate_rounds(model, make_optimizer, batches, round_steps):
    """Local SGD that averages the replicas' parameters after the (1-based) steps in ``round_steps``."""
    replicas = [copy.deepcopy(model) for _ in batches]
    optimizers = [make_optimizer(m) for m in replicas]
    out = [[] for _ in batches]
    for t in range(len(batches[0])):
        for replica, optimizer, rank_batches in zip(replicas, optimizers, batches):
            optimizer.zero_grad()
            mse(replica, rank_batches[t]).backward()
            optimizer.step()
        if t + 1 in round_steps:
            with torch.no_grad():
                for params in zip(*(m.parameters() for m in replicas)):
                    mean = torch.stack([p.detach() for p in params]).sum(0) / len(params)
                    for p in params:
                        p.copy_(mean)
        for r, replica in enumerate(replicas):
            out[r].append(flat_params(replica))
    return out


@pytest.mark.multiprocess
def test_gossip_matches_simulation(records):
    """DecentralizedSGD over a ring of 2 (W = all 1/2: each gossip round is the exact mean of parameters and
    momentum) equals PR-SGD-Momentum with the same tau, through point-to-point gossip, never an all-reduce
    until finalize's exact average."""
    recs = records[0]["gossip"]
    sim = simulate_local_sgd(make_net(100), _sgd, _batches(8), mse, tau=2, momentum="average")
    assert _max_diff(recs, sim) <= 1e-6
    by_tag = recs[0]["ledger"]["by_tag"]
    assert by_tag["gossip"]["rounds"] == 4 and "average" not in by_tag
    assert by_tag["final"]["rounds"] == 1
    assert torch.equal(recs[0]["final"], recs[1]["final"])


def _simulate_easgd(model, make_optimizer, batches, tau):
    """EASGD from its update rule: every tau steps x_i <- (1 - a) x_i + a z, z <- (1 - m a) z + a sum_i x_i
    (the x_i from before the round), a = 2 / (m + 2); momentum stays local. Returns the trajectories and z."""
    m = len(batches)
    alpha = 2 / (m + 2)
    replicas = [copy.deepcopy(model) for _ in range(m)]
    optimizers = [make_optimizer(r) for r in replicas]
    center = [p.detach().clone() for p in model.parameters()]
    out = [[] for _ in range(m)]
    for t in range(len(batches[0])):
        for replica, optimizer, rank_batches in zip(replicas, optimizers, batches):
            optimizer.zero_grad()
            mse(replica, rank_batches[t]).backward()
            optimizer.step()
        if (t + 1) % tau == 0:
            with torch.no_grad():
                for i, params in enumerate(zip(*(r.parameters() for r in replicas))):
                    total = torch.stack([p.detach() for p in params]).sum(0)
                    for p in params:
                        p.mul_(1 - alpha).add_(center[i], alpha=alpha)
                    center[i] = center[i] * (1 - m * alpha) + alpha * total
        for r, replica in enumerate(replicas):
            out[r].append(flat_params(replica))
    return out, torch.cat([c.reshape(-1).double() for c in center])


@pytest.mark.multiprocess
def test_elastic_averaging_matches_simulation(records):
    recs = records[0]["elastic"]
    sim, center = _simulate_easgd(make_net(100), _sgd, _batches(10), tau=3)
    assert _max_diff(recs, sim) <= 1e-6
    for rec in recs:  # finalize: every replica takes the centre variable z, replicated without traffic
        assert float((rec["final"] - center).abs().max()) <= 1e-6
    by_tag = recs[0]["ledger"]["by_tag"]
    assert by_tag["elastic"]["rounds"] == 3 and "final" not in by_tag


@pytest.mark.multiprocess
def test_overlap_local_sgd_matches_simulation(records):
    recs = records[0]["overlap"]
    sim = simulate_overlap_local_sgd(make_net(100), _sgd, _batches(10), mse, tau=3, alpha=0.6)
    assert _max_diff(recs, sim) <= 1e-6
    assert recs[0]["ledger"]["by_tag"]["overlap_average"]["rounds"] == 3
    assert torch.equal(recs[0]["final"], recs[1]["final"])


@pytest.mark.multiprocess
def test_dore_matches_the_reference(records):
    """DORE (rank 0 as master: only rank 0 steps its optimizer) equals the paper's pseudocode."""
    recs = records[0]["dore"]
    reference = simulate_dore(
        make_net(100), _sgd, _batches(6), mse, PNORM, PNORM, alpha=0.1, beta=1.0, eta=1.0
    )
    assert _max_diff(recs, reference) <= 1e-6
    by_tag = recs[0]["ledger"]["by_tag"]
    assert by_tag["dore_gradient"]["rounds"] == 6 and by_tag["dore_model"]["rounds"] == 6
    # rank 0 receives rank 1's compressed residual and its status byte, nothing else
    assert by_tag["dore_gradient"]["bytes_received"] >= PNORM.payload_nbytes(NUMEL) + 1


@pytest.mark.multiprocess
def test_compressed_sgd_with_gradient_accumulation_matches_the_reference(records):
    """QSGD with 2 micro-batches per step (the first under fabric.no_backward_sync): one exchange per
    optimizer step, of the accumulated gradient; MEM-SGD's error feedback."""
    recs = records[0]["qsgd"]
    batches = _batches(5, accumulate=2)

    def mean_loss(net, group):
        return sum(mse(net, micro) / len(group) for micro in group)

    reference = simulate_compressed_sgd(
        make_net(100), _sgd, batches, mean_loss, QSGD(2, 32), error_feedback=False
    )
    assert _max_diff(recs, reference) <= 1e-6
    gradient = recs[0]["ledger"]["by_tag"]["compressed_gradient"]
    assert gradient["rounds"] == 5 and gradient["bytes_sent"] == 5 * (QSGD(2, 32).payload_nbytes(NUMEL) + 1)

    mem = records[0]["mem_sgd"]
    reference = simulate_compressed_sgd(make_net(100), _sgd, _batches(5), mse, TopK(0.2), error_feedback=True)
    assert _max_diff(mem, reference) <= 1e-6


def _int4_bytes(numel: int) -> int:
    """An int4 payload of ``numel`` values: a 4-byte scale per 64 values, two values a byte."""
    return 4 * -(-numel // 64) + -(-numel // 2)


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", ["diloco", "streaming_diloco"])
def test_diloco_and_streaming_diloco_match_the_simulation_bitwise(records, case):
    """DiLoCo (H=4, the paper's outer Nesterov SGD) and Streaming DiLoCo (2 fragments, H=4, sync_delay=1,
    local_weight=0.5, int4 pseudo-gradients) under Fabric: every step and finalize() bitwise the
    single-process simulation of docs/ALGORITHMS.md section 9; one exact all-reduce per outer step, or one
    fragment's int4 payload per streaming round."""
    recs = records[0][case]
    steps, tau = 10, 4
    kwargs = {"tau": tau, "make_outer": NESTEROV}
    if case == "streaming_diloco":
        kwargs.update(fragments=FRAGMENTS, sync_delay=1, local_weight=0.5, compressor="int4")
    sim = simulate_diloco(lambda: make_net(100), _sgd, _batches(steps), mse, **kwargs)
    assert _max_diff(recs, [s[:-1] for s in sim]) == 0.0
    for rec, ref in zip(recs, sim):
        assert len(rec["params"]) == steps and torch.equal(rec["final"], ref[-1].to(rec["final"].dtype))
    assert torch.equal(recs[0]["final"], recs[1]["final"])
    assert float((recs[0]["params"][2] - recs[1]["params"][2]).abs().max()) > 1e-4  # replicas drift apart
    ledger = recs[0]["ledger"]
    if case == "diloco":  # outer steps at 4 and 8, fit's final one: the pseudo-gradient and 2 finite flags
        outer, final, round_bytes = ledger["by_tag"]["outer_step"], ledger["by_tag"]["final"], (NUMEL + 2) * 4
        assert (outer["rounds"], final["rounds"]) == (steps // tau, 1)
        assert (outer["bytes_sent"], final["bytes_sent"]) == ((steps // tau) * round_bytes, round_bytes)
        assert torch.equal(recs[0]["params"][tau - 1], recs[1]["params"][tau - 1])
    else:  # fragment 0 (Linear 6 -> 16) sends at 1, 5, 9, fragment 1 (Linear 16 -> 1) at 3, 7
        fragment_bytes = [_int4_bytes(6 * 16 + 16), _int4_bytes(16 + 1)]
        outer = ledger["by_tag"]["outer_step"]
        assert outer["rounds"] == 5 and outer["bytes_sent"] == 3 * fragment_bytes[0] + 2 * fragment_bytes[1]
        assert ledger["by_tag"]["final"]["bytes_sent"] == sum(fragment_bytes)
    metrics = recs[0]["metrics"]
    assert all(m["outer_lr"] == pytest.approx(0.7) for m in metrics)
    assert metrics[0]["pseudo_gradient_norm"] == 0.0 and metrics[-1]["pseudo_gradient_norm"] > 0


# -- checkpoints --------------------------------------------------------------------------------------------
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("case", "round_tag"),
    [("local_sgd", "average"), ("elastic", "elastic"), ("overlap", "overlap_average"),
     ("dore", "dore_gradient"), ("mem_sgd", "compressed_gradient"),
     ("diloco", "outer_step"), ("streaming_diloco", "outer_step")],
)  # fmt: skip
def test_save_and_load_resume_bitwise(records, case, round_tag):
    """fabric.save after step k, then a new Fabric, strategy, model (other weights) and optimizer that
    fabric.load the file: the next steps and the final model are bitwise the uninterrupted run's, the
    caller's own entries come back, the ledger keeps counting. (Streaming DiLoCo is saved with a fragment
    in flight.)"""
    for rec in records[0][case]:
        resumed = rec["resumed"]
        k = resumed["step"]
        assert 0 < k < len(rec["params"]) and resumed["remainder"] == []
        assert len(resumed["params"]) == len(rec["params"]) - k
        for a, b in zip(rec["params"][k:], resumed["params"]):
            assert torch.equal(a, b)
        assert torch.equal(rec["final"], resumed["final"])
        assert (
            resumed["ledger"]["by_tag"][round_tag]["rounds"] == rec["ledger"]["by_tag"][round_tag]["rounds"]
        )


@pytest.mark.multiprocess
def test_checkpoint_layout(records):
    """One file: the consensus model and rank 0's other entries at the top (a plain Fabric checkpoint), every
    rank's own state under "lightning_commsgd"; saved inside consensus_model(), the entries hold each rank's
    own replica."""
    recs, out = records[0]["local_sgd"], records[1]
    saved = torch.load(out / "local_sgd.ckpt", weights_only=False)
    assert set(saved) == {"model", "optimizer", "step", "lightning_commsgd"} and saved["step"] == 5
    extra = saved["lightning_commsgd"]
    assert extra["format"] == 1 and extra["world_size"] == 2 and len(extra["ranks"]) == 2
    local = [
        torch.cat([v.reshape(-1).double() for v in r["state"]["model"].values()]) for r in extra["ranks"]
    ]
    assert not torch.equal(local[0], local[1])
    consensus = torch.cat([v.reshape(-1).double() for v in saved["model"].values()])
    assert torch.allclose(consensus, (local[0] + local[1]) / 2, atol=1e-6)
    for r, entry in enumerate(extra["ranks"]):
        assert entry["algorithm"]["step"] == 5 and entry["state"]["step"] == 5
        params = torch.cat([entry["state"]["model"][k].reshape(-1).double() for k in _param_keys()])
        assert torch.equal(params, recs[r]["params"][4])  # the replica, not the consensus


def _param_keys():
    net = make_net(100, True)
    return [name for name, _ in net.named_parameters()]


@pytest.mark.multiprocess
def test_resume_on_another_world_size_starts_from_the_consensus(records):
    """The 2-rank checkpoint on 1 process: the model is the consensus, the counters continue (rank 0's),
    and nothing is sent on a world of one. A second trained model on the same strategy is refused."""
    out = records[1]
    fabric = Fabric(accelerator="cpu", devices=1, strategy=LocalSGDStrategy(tau=3))
    fabric.launch()
    net = make_net(7, True)
    model, optimizer = fabric.setup(net, _sgd(net))
    with pytest.warns(UserWarning, match="written by 2 ranks and is resumed on 1"):
        fabric.load(out / "local_sgd.ckpt", {"model": model, "optimizer": optimizer})
    saved = torch.load(out / "local_sgd.ckpt", weights_only=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved["model"][key])
    assert fabric.strategy.algorithm.state_dict()["step"] == 5
    fabric.backward(mse(model, _batches(1)[0][0]))
    optimizer.step()
    assert fabric.strategy.algorithm.state_dict()["step"] == 6
    assert fabric.strategy.communicator.ledger.rounds == 0
    other = make_net(8)
    with pytest.raises(RuntimeError, match="trains one model"):
        fabric.setup(other, _sgd(other))


# -- construction, the registry ------------------------------------------------------------------------------
def test_every_algorithm_name_resolves_through_fabrics_registry():
    for name, entry in ENTRIES.items():
        if entry.algorithm is None:  # the parameter-server strategies are Trainer-only
            assert name not in STRATEGY_REGISTRY
            continue
        strategy = Fabric(accelerator="cpu", devices=4, strategy=name).strategy  # a square: torus
        assert type(strategy) is getattr(commsgd_fabric, entry.class_name), name
        assert isinstance(strategy.algorithm_config, entry.algorithm)
        for arg, value in entry.presets().items():
            assert type(getattr(strategy, arg)) is type(value), (name, arg)
    assert isinstance(Fabric(accelerator="cpu", devices=2, strategy="qsgd").strategy.compressor, QSGD)
    ring = Fabric(accelerator="cpu", devices=2, strategy="gossip_ring").strategy
    assert ring.topology == "ring" and ring.tau == 1
    commsgd_fabric.register_strategies()  # idempotent
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: LocalSGDStrategy(tau=0), ValueError, "tau"),
        (lambda: LocalSGDStrategy(tua=3), TypeError, "did you mean 'tau'"),
        (lambda: LocalSGDStrategy(sync_timeout=-1), ValueError, "sync_timeout"),
        (lambda: CommunicationStrategy("local_sgd"), TypeError, "algorithm"),
        (lambda: DoubleResidualStrategy(PNORM, master="ps"), ValueError, "master"),
        # the checks that need the world size run when Fabric is constructed
        (lambda: Fabric(accelerator="cpu", devices=2, strategy=ElasticAveragingStrategy(alpha=0.9)),
         ValueError, "alpha"),
        (lambda: Fabric(accelerator="cpu", devices=2, strategy=DecentralizedSGDStrategy(topology="torus")),
         ValueError, "square"),
        (lambda: Fabric(accelerator="cpu", devices=2, strategy=DoubleResidualStrategy(PNORM),
                        plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]),
         ValueError, "16-mixed"),
    ],
)  # fmt: skip
def test_bad_input_fails_before_any_process_group(build, error, match):
    with pytest.raises(error, match=match):
        build()
    assert not dist.is_initialized()


_TRAINER_MODULES = ("lightning.pytorch", "lightning_commsgd.strategies")


def test_the_adapter_imports_nothing_of_the_trainer():
    for path in (REPO_ROOT / "lightning_commsgd" / "fabric").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )  # fmt: skip
            trainer = [n for n in names if n.startswith(_TRAINER_MODULES)]
            assert not trainer, f"{path.name} imports {trainer}"


# -- the example ---------------------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_fabric_example_trains_and_reports_bytes():
    proc = run_script([str(REPO_ROOT / "examples" / "fabric" / "train.py"), "--epochs", "2"], timeout=240)
    out = proc.stdout
    assert out.count("val_loss ") == 1 and out.count("bytes_sent ") == 1, out  # rank 0 prints, once
    assert 0 < float(re.search(r"^val_loss (\S+)", out, re.M).group(1)) < 2.3  # below chance: log(10)
    assert int(re.search(r"^bytes_sent (\d+)", out, re.M).group(1)) > 0
