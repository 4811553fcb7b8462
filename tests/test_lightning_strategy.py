"""LocalSGDStrategy under a real multi-process Lightning Trainer, checked against the simulation."""

from __future__ import annotations

import copy

import pytest
import torch
from simulation import simulate_local_sgd, simulate_overlap_local_sgd
from toy_problem import lightning_batches, make_net, mse, redundant_batches

pytestmark = pytest.mark.multiprocess


def _sgd(module):
    return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)


def _adam(module):
    return torch.optim.Adam(module.parameters(), lr=0.01)


def _simulate(world_size, steps, tau, momentum, make_opt=_sgd, batch_norm=False, accumulate=1):
    """Reference trajectory from rank 0's x_0 (seed 100), on Lightning's data order."""
    batches = lightning_batches(world_size, steps, accumulate)
    if accumulate == 1:
        batches = [[step[0] for step in rank] for rank in batches]
        loss = mse
    else:  # Lightning scales each micro-batch loss by 1/accumulate: the mean over the group

        def loss(net, group):
            return sum(mse(net, micro) for micro in group) / len(group)

    return simulate_local_sgd(make_net(100, batch_norm), make_opt, batches, loss, tau=tau, momentum=momentum)


def _max_diff(records, sim):
    return max(
        float((a - s).abs().max())
        for rank, rec in enumerate(records)
        for a, s in zip(rec["params"], sim[rank])
    )


def _assert_rounds_only(records, tau, steps, round_bytes):
    """Inside training batches the only collective is one all-reduce at each round step, of round_bytes."""
    for rec in records:
        in_batch = [c for c in rec["calls"] if c["in_batch"]]
        expected_steps = [t for t in range(steps) if (t + 1) % tau == 0]
        assert [c["step"] for c in in_batch] == expected_steps
        assert {c["fn"] for c in in_batch} == {"all_reduce"}
        assert all(c["bytes"] == round_bytes for c in in_batch)


@pytest.mark.parametrize(
    ("start_method", "momentum", "batch_norm"),
    [
        pytest.param("popen", "average", True, marks=pytest.mark.lightning_smoke),
        pytest.param("spawn", "local", False, marks=pytest.mark.extended),
        ("fork", "zero", True),
    ],
)
def test_trajectory_matches_simulation_two_ranks(run_worker, start_method, momentum, batch_norm):
    steps, tau = 10, 3
    extra = ["--batch-norm"] if batch_norm else []
    records = run_worker(
        "--tau",
        str(tau),
        "--momentum",
        momentum,
        "--max-steps",
        str(steps),
        "--start-method",
        start_method,
        *extra,
    )
    assert len(records) == 2
    sim = _simulate(2, steps, tau, momentum, batch_norm=batch_norm)
    assert _max_diff(records, sim) <= 1e-6
    # The check has teeth: replicas differ mid-period and agree right after a round.
    assert float((records[0]["params"][1] - records[1]["params"][1]).abs().max()) > 1e-4
    assert torch.equal(records[0]["params"][tau - 1], records[1]["params"][tau - 1])
    # After fit every rank holds the consensus model (final round at step 10, mid-period).
    assert torch.equal(records[0]["final_params"], records[1]["final_params"])
    final_mean = (sim[0][-1] + sim[1][-1]) / 2
    assert float((records[0]["final_params"] - final_mean).abs().max()) <= 1e-6

    net = make_net(100, batch_norm)
    n_params = sum(p.numel() for p in net.parameters())
    n_buffers = sum(b.numel() for b in net.buffers() if torch.is_floating_point(b))
    n_elems = n_params * (2 if momentum == "average" else 1) + n_buffers
    round_bytes = (n_elems + 2) * 4  # and one finite flag per rank
    _assert_rounds_only(records, tau, steps, round_bytes)
    ledger = records[0]["ledger"]["by_tag"]
    assert ledger["average"]["rounds"] == steps // tau
    assert ledger["average"]["bytes_sent"] == (steps // tau) * round_bytes
    assert ledger["final"]["rounds"] == 1


@pytest.mark.extended
def test_four_ranks_adam_matches_simulation(run_worker):
    steps, tau = 8, 4
    records = run_worker(
        "--devices", "4", "--tau", str(tau), "--optimizer", "adam", "--max-steps", str(steps)
    )
    assert len(records) == 4
    sim = _simulate(4, steps, tau, "average", make_opt=_adam)
    assert _max_diff(records, sim) <= 1e-6
    n_params = sum(p.numel() for p in make_net(100).parameters())
    _assert_rounds_only(records, tau, steps, (3 * n_params + 4) * 4)  # x, exp_avg, exp_avg_sq, 4 flags
    assert "final" not in records[0]["ledger"]["by_tag"]  # steps end on a round: nothing left to average


def test_gradient_accumulation_and_tau1_match_ddp(run_worker, tmp_path):
    """tau=1 with plain SGD is mathematically DDP (mean of x - lr g = x - lr mean g): same trajectory,
    with gradient accumulation, an LR scheduler and two param groups."""
    common = ["--optimizer", "sgd_plain", "--max-steps", "6", "--accumulate", "2", "--scheduler", "--groups"]
    local = run_worker("--tau", "1", *common, out=tmp_path / "local")
    ddp = run_worker("--strategy", "ddp", *common, out=tmp_path / "ddp")
    for rec_local, rec_ddp in zip(local, ddp):
        assert len(rec_local["params"]) == len(rec_ddp["params"]) == 6
        for a, b in zip(rec_local["params"], rec_ddp["params"]):
            assert float((a - b).abs().max()) <= 1e-6
    # Same algorithm, ~2x fewer bytes than DDP's gradients? No: tau=1 sends params every step, as DDP
    # sends gradients, plus the 2 finite flags (8 bytes) per round; both counted by the same ledger.
    average = local[0]["ledger"]["by_tag"]["average"]
    assert average["rounds"] == 6
    assert average["bytes_sent"] == ddp[0]["ledger"]["by_tag"]["ddp_gradients"]["bytes_sent"] + 6 * 2 * 4


def test_accumulation_matches_simulation(run_worker):
    steps, tau = 6, 2
    records = run_worker("--tau", str(tau), "--max-steps", str(steps), "--accumulate", "2")
    sim = _simulate(2, steps, tau, "average", accumulate=2)
    assert _max_diff(records, sim) <= 1e-6


def test_bf16_clipping_consensus_validation_and_monitor(run_worker, tmp_path):
    """bf16-mixed autocast, gradient clipping, validation on the consensus model mid-period, and the
    monitor's consensus distance: runs, replicas differ between rounds, end in consensus."""
    records = run_worker(
        "--tau",
        "4",
        "--max-steps",
        "10",
        "--precision",
        "bf16-mixed",
        "--clip",
        "0.5",
        "--validate",
        "--consensus-every",
        "1",
        "--batch-norm",
        "--ckpt-on-val",
        "--prog-bar",
        out=tmp_path / "run",
    )
    by_tag = records[0]["ledger"]["by_tag"]
    # validation at steps 5 and 10 (val_check_interval=5): step 5 is mid-period (rounds at 4, 8)
    assert by_tag["eval_consensus"]["rounds"] >= 1
    assert "val_loss" in records[0]["metrics"]
    assert records[0]["gathered"][0] == [[0.0], [1.0]] and by_tag["lightning_all_gather"]["rounds"] >= 1
    assert torch.equal(records[0]["final_params"], records[1]["final_params"])
    progress = records[0]["progress_bar"]
    assert progress["MB_sent"] > 0 and progress["rounds"] == records[0]["logged"]["comm/rounds"][-1]
    distances = records[0]["logged"]["comm/consensus_distance"]
    assert distances and all(d > 0 for d in distances)
    # measured at every round, the final one included
    assert by_tag["consensus"]["rounds"] == by_tag["average"]["rounds"] + by_tag["final"]["rounds"]
    # A checkpoint saved during consensus validation keeps each rank's own replica, not the consensus.
    saved = torch.load(tmp_path / "run" / "ckpt" / "val.ckpt", weights_only=False)
    local = [
        torch.cat([v.reshape(-1).float() for v in r["state_dict"].values()])
        for r in saved["lightning_commsgd"]["ranks"]
    ]
    assert not torch.equal(local[0], local[1])
    consensus = torch.cat([v.reshape(-1).float() for v in saved["state_dict"].values()])
    assert torch.allclose(consensus, (local[0] + local[1]) / 2, atol=1e-6)
    # Validation restored each rank's own replica: training continued from different models.
    assert float((records[0]["params"][5] - records[1]["params"][5]).abs().max()) > 1e-4


def test_world_size_one_runs_without_collectives(run_worker):
    (record,) = run_worker("--devices", "1", "--tau", "2", "--max-steps", "4")
    assert record["world_size"] == 1
    assert record["ledger"]["rounds"] == 0 and record["ledger"]["bytes_sent"] == 0
    assert not [c for c in record["calls"] if c["in_batch"]]


def test_resume_mid_period_equals_uninterrupted(run_worker, tmp_path):
    """Checkpoint at step 12 (end of epoch 0, 2 steps into a period of 5): bitwise the same trajectory.

    Resumes at other steps (mid-epoch too) for every strategy: tests/test_resume_matrix.py.
    """
    steps, tau, ckpt_step = 16, 5, 12
    full = run_worker(
        "--tau", str(tau), "--max-steps", str(steps), "--ckpt-every", str(ckpt_step), out=tmp_path / "full"
    )
    ckpt = tmp_path / "full" / "ckpt" / f"step={ckpt_step}.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    ranks = saved["lightning_commsgd"]["ranks"]
    assert len(ranks) == 2 and ranks[0]["algorithm"]["step"] == ckpt_step
    # The checkpoint's state_dict is the consensus model; each rank's own replica is kept beside it.
    local0, local1 = (torch.cat([v.reshape(-1) for v in r["state_dict"].values()]) for r in ranks)
    assert not torch.equal(local0, local1)
    consensus = torch.cat([v.reshape(-1) for v in saved["state_dict"].values()])
    assert torch.allclose(consensus, (local0 + local1) / 2, atol=1e-7)

    resumed = run_worker(
        "--tau", str(tau), "--max-steps", str(steps), "--resume", str(ckpt), out=tmp_path / "resumed"
    )
    for rec_full, rec_resumed in zip(full, resumed):
        assert rec_resumed["steps"] == list(range(ckpt_step + 1, steps + 1))
        for a, b in zip(rec_full["params"][ckpt_step:], rec_resumed["params"]):
            assert torch.equal(a, b)
        assert torch.equal(rec_full["final_params"], rec_resumed["final_params"])
    # The ledger keeps counting across the resume.
    assert (
        resumed[0]["ledger"]["by_tag"]["average"]["rounds"]
        == full[0]["ledger"]["by_tag"]["average"]["rounds"]
    )


def test_adacomm_under_lightning_shrinks_tau_alike_on_every_rank(run_worker, tmp_path):
    """AdaComm in step mode under Lightning: the losses training_step returns drive tau, every rank logs
    the same tau sequence and F. (Resuming it mid-interval, bitwise: tests/test_resume_matrix.py.)"""
    args = ["--tau", "6", "--adacomm-interval", "5", "--max-steps", "30", "--optimizer", "sgd_plain"]
    full = run_worker(*args, out=tmp_path / "full")
    taus = full[0]["logged"]["comm/tau"]
    assert taus[0] == 6 and len(set(taus)) > 1  # the loss fell, tau shrank
    assert full[0]["logged"]["comm/tau"] == full[1]["logged"]["comm/tau"]
    assert "comm/adacomm_F" in full[0]["logged"] and "comm/adacomm_F0" in full[0]["logged"]


@pytest.mark.parametrize("world_size", [3])
def test_gossip_strategy_one_peer_checkpoints_the_graph_phase(run_worker, tmp_path, world_size):
    """DecentralizedSGDStrategy under Lightning on a time-varying graph (one-peer exponential, m=3, two
    phases): gossip rounds only, one exact average at the end, consensus distance logged, the graph phase
    in the checkpoint. (Resuming from it, bitwise: tests/test_resume_matrix.py.)"""
    args = ["--strategy", "decentralized_sgd", "--topology", "one_peer_exponential", "--tau", "3"]
    args += ["--momentum", "average"]
    args += ["--devices", str(world_size), "--max-steps", "22", "--consensus-every", "1"]
    full = run_worker(*args, "--ckpt-every", "16", out=tmp_path / "full")
    assert len(full) == world_size
    by_tag = full[0]["ledger"]["by_tag"]
    assert "average" not in by_tag and by_tag["gossip"]["rounds"] == 22 // 3
    assert by_tag["final"]["rounds"] == 1  # the one exact all-reduce, at the end of fit
    assert all(d > 0 for d in full[0]["logged"]["comm/consensus_distance"])
    finals = [rec["final_params"] for rec in full]
    assert all(torch.equal(finals[0], f) for f in finals[1:])
    saved = torch.load(tmp_path / "full" / "ckpt" / "step=16.ckpt", weights_only=False)
    assert saved["lightning_commsgd"]["ranks"][0]["algorithm"]["mix_rounds"] == 16 // 3


def test_elastic_strategy_checkpoints_one_centre_variable(run_worker, tmp_path):
    """EASGD under Lightning: z is replicated (no final traffic), every rank's copy in the checkpoint is
    bitwise the same. (Resuming from it, bitwise: tests/test_resume_matrix.py.)"""
    args = ["--strategy", "elastic_averaging", "--tau", "3", "--momentum", "local", "--max-steps", "16"]
    args += ["--batch-norm"]
    full = run_worker(*args, "--ckpt-every", "12", out=tmp_path / "full")
    by_tag = full[0]["ledger"]["by_tag"]
    assert (
        by_tag["elastic"]["rounds"] == 16 // 3 and "final" not in by_tag
    )  # z is replicated: no final traffic
    assert torch.equal(full[0]["final_params"], full[1]["final_params"])
    saved = torch.load(tmp_path / "full" / "ckpt" / "step=12.ckpt", weights_only=False)
    centres = [r["algorithm"]["center"] for r in saved["lightning_commsgd"]["ranks"]]
    assert torch.equal(centres[0], centres[1])  # every rank's copy of z is bitwise the same


@pytest.mark.parametrize(
    ("redundancy", "sampling"), [pytest.param(0.5, "stratified", marks=pytest.mark.extended), (0.25, "union")]
)
def test_redundant_data_trajectory_matches_simulation(run_worker, tmp_path, redundancy, sampling):
    """RI-SGD under Lightning: the strategy swaps in the redundant sampler (the DataModule is unchanged)
    and the run equals the simulation on the RI-SGD batches; stratified batches are b (1 + mu p) big."""
    steps, tau, world_size = 14, 3, 2 if redundancy == 0.5 else 4
    records = run_worker(
        "--devices", str(world_size), "--tau", str(tau), "--max-steps", str(steps),
        "--redundancy", str(redundancy), "--sampling", sampling, out=tmp_path / "run",
    )  # fmt: skip
    batches = redundant_batches(world_size, steps, redundancy, sampling)
    if sampling == "stratified":
        assert all(len(b[0]) == 4 * (1 + round(redundancy * world_size)) for b in batches[0])
    sim = simulate_local_sgd(make_net(100), _sgd, batches, mse, tau=tau, momentum="average")
    assert _max_diff(records, sim) <= 1e-6


@pytest.mark.parametrize(
    ("world_size", "redundancy", "sampling", "batch_sizes"),
    [(2, 0.5, "stratified", [2, 6]), pytest.param(3, 0.0, "union", [3, 4, 6], marks=pytest.mark.extended)],
)
def test_heterogeneous_batches_weighted_by_samples_match_simulation(
    run_worker, tmp_path, world_size, redundancy, sampling, batch_sizes
):
    """Per-rank batch sizes with replica_weights="samples": each round is sum_j n_j x_j / sum_j n_j; the run
    equals the simulation on those batches and not the uniform mean; the weight costs 4 bytes, no extra
    round."""
    steps, tau = 11, 3
    records = run_worker(
        "--devices", str(world_size), "--tau", str(tau), "--max-steps", str(steps),
        "--redundancy", str(redundancy), "--sampling", sampling, "--replica-weights", "samples",
        "--batch-sizes", *map(str, batch_sizes), out=tmp_path / "run",
    )  # fmt: skip
    batches = redundant_batches(world_size, steps, redundancy, sampling, batch_sizes)
    factor = 1 + round(redundancy * world_size) if sampling == "stratified" else 1
    for rank, b in enumerate(batch_sizes):
        assert all(len(batch[0]) == b * factor for batch in batches[rank])
    weighted = simulate_local_sgd(make_net(100), _sgd, batches, mse, tau=tau, weights="samples")
    uniform = simulate_local_sgd(make_net(100), _sgd, batches, mse, tau=tau, weights="uniform")
    assert _max_diff(records, weighted) <= 1e-6
    assert _max_diff(records, uniform) > 1e-3  # the weights matter: a uniform mean would be caught
    numel = sum(p.numel() for p in make_net(100).parameters())
    _assert_rounds_only(records, tau, steps, (2 * numel + 1 + world_size) * 4)  # n_j and the flags


def test_resume_after_losing_a_worker_continues_on_the_survivors(run_worker, tmp_path):
    """RI-SGD fault tolerance under Lightning: 3 workers with mu = 1/3 checkpoint at step 6 (a round, mid
    epoch); worker 1 is lost; the run resumes on 2 processes with original_world_size=3,
    failed_workers=[1]. Coverage stays 100%, the survivors (original workers 0 and 2) continue the same
    epoch at batch 7 from the consensus model, and the trajectory equals the simulation of that."""
    mu, tau = str(1 / 3), 3
    run_worker(
        "--devices", "3", "--tau", str(tau), "--max-steps", "6", "--redundancy", mu, "--ckpt-every", "6",
        out=tmp_path / "full",
    )  # fmt: skip
    ckpt = tmp_path / "full" / "ckpt" / "step=6.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["lightning_commsgd"]["ranks"][0]["sampler"] == {"epoch": 0, "position": 6}
    resumed = run_worker(
        "--devices", "2", "--tau", str(tau), "--max-steps", "15", "--redundancy", mu,
        "--original-world-size", "3", "--failed-workers", "1", "--resume", str(ckpt), out=tmp_path / "res",
    )  # fmt: skip
    assert resumed[0]["steps"] == list(range(7, 16)) and resumed[0]["world_size"] == 2

    start = make_net(100)
    start.load_state_dict({k.removeprefix("net."): v for k, v in saved["state_dict"].items()})
    optimizer_state = saved["lightning_commsgd"]["ranks"][0]["optimizer_states"][0]

    def resumed_sgd(module):
        opt = _sgd(module)
        opt.load_state_dict(copy.deepcopy(optimizer_state))  # replicas must not share momentum tensors
        return opt

    survivors = redundant_batches(2, 15, 1 / 3, "stratified", original_world_size=3, failed_workers=(1,))
    sim = simulate_local_sgd(start, resumed_sgd, [b[6:] for b in survivors], mse, tau=tau)
    assert _max_diff(resumed, sim) <= 1e-6
    # the survivors hold shard 1 (worker 0 holds its own 0 and its neighbour's 1; worker 2 holds 2 and 0)
    assert all(len(b[0]) == 8 for b in survivors[0])


def test_losing_an_unreplicated_worker_refuses_to_start(run_worker, tmp_path):
    """mu = 0: losing worker 1 of 3 loses shard 1; the run stops before training with the lost shard named."""
    with pytest.raises(AssertionError, match=r"no surviving holder: \[1\]"):
        run_worker(
            "--devices", "2", "--max-steps", "3", "--original-world-size", "3", "--failed-workers", "1",
            out=tmp_path / "run",
        )  # fmt: skip


@pytest.mark.parametrize(
    "strategy", ["decentralized_sgd", pytest.param("elastic_averaging", marks=pytest.mark.extended)]
)
def test_decentralized_strategies_take_the_redundant_sampler(run_worker, tmp_path, strategy):
    """The RI-SGD sampler is the strategy base's: gossip and EASGD get stratified batches of
    b (1 + mu p) = 8 samples (Lightning's sampler would give 4)."""
    records = run_worker(
        "--strategy", strategy, "--redundancy", "0.5", "--tau", "2", "--max-steps", "4",
        *(["--momentum", "average"] if strategy == "decentralized_sgd" else []), out=tmp_path / "run",
    )  # fmt: skip
    assert all(rec["batch_sizes"] == [8] * 4 for rec in records)


def _payload_bytes(compressor: str, chunk: int) -> int:
    """Bytes of one encoded chunk of ``chunk`` values."""
    if compressor == "int8":
        return 4 * -(-chunk // 256) + chunk  # an fp32 scale per 256 values, a byte per value
    if compressor == "int4":
        return 4 * -(-chunk // 64) + -(-chunk // 2)  # an fp32 scale per 64 values, two values per byte
    return 2 * chunk


def _lowp_round(compressor: str, numel: int, world_size: int) -> tuple[int, int]:
    """Message batches and payload bytes each rank sends in one low-precision mean of ``numel`` values:
    two ranks all-gather the encoded values (one batch: the toy model fits in one piece); more ranks
    reduce-scatter encoded chunks of ceil(numel / p) values and all-gather their means (two batches)."""
    if world_size == 2:
        return 1, _payload_bytes(compressor, numel)
    return 2, 2 * (world_size - 1) * _payload_bytes(compressor, -(-numel // world_size))


# how far a run may drift from the exact average (the rounding of the change over a few rounds)
_PAYLOAD_GAP = {"bf16": 2e-2, "fp16": 3e-3, "int8": 5e-2, "int4": 5e-2}


@pytest.mark.parametrize(
    ("compressor", "world_size"), [("bf16", 2), pytest.param("int8", 4, marks=pytest.mark.extended)]
)
def test_low_precision_payload_matches_its_simulation(run_worker, tmp_path, compressor, world_size):
    """compressor: each rank's change since the latest consensus travels in 16 or 8 bits and is summed
    in fp32; the run equals the simulation of exactly that (int8: the same seeded stochastic rounding),
    stays within the rounding of the change from the exact average, and sends half (16 bits) or about a
    quarter (int8) of the bytes (2 ranks: an all-gather of the encoded change, one batch of messages as the
    toy model fits in one piece; 4 ranks: reduce-scatter + all-gather of encoded chunks, two batches)."""
    steps, tau = 9, 3
    records = run_worker(
        "--devices", str(world_size), "--tau", str(tau), "--max-steps", str(steps),
        "--compressor", compressor, "--check-replicas", out=tmp_path / "run",
    )  # fmt: skip
    # the debug check hashed every rank's parameters after each round and at the end of fit: all equal
    assert all(rec["ledger"]["by_tag"]["replica_check"]["rounds"] == steps // tau + 1 for rec in records)
    batches = [[step[0] for step in rank] for rank in lightning_batches(world_size, steps)]
    low = simulate_local_sgd(make_net(100), _sgd, batches, mse, tau=tau, compressor=compressor)
    exact = simulate_local_sgd(make_net(100), _sgd, batches, mse, tau=tau)
    assert _max_diff(records, low) <= 1e-6
    gap = _max_diff(records, exact)
    assert 0 < gap <= _PAYLOAD_GAP[compressor]
    numel = 2 * sum(p.numel() for p in make_net(100).parameters())  # parameters and momentum
    batches, per_round = _lowp_round(compressor, numel, world_size)
    for rec in records:
        in_batch = [c for c in rec["calls"] if c["in_batch"]]
        # each round: the message batches, then the replica check's all-gather
        expected = (["batch_isend_irecv"] * batches + ["all_gather"]) * (steps // tau)
        assert [c["fn"] for c in in_batch] == expected
        assert rec["ledger"]["by_tag"]["average"]["bytes_sent"] == (steps // tau) * per_round


@pytest.mark.parametrize(("compressor", "world_size"), [("int4", 2), ("int8", 3)])
def test_adam_low_precision_payload_keeps_second_moments_positive(
    run_worker, tmp_path, compressor, world_size
):
    """Adam + BatchNorm under a block-quantized payload: the signed values (parameters, exp_avg) travel as
    rounded changes, the non-negative ones (exp_avg_sq, running_var) as bf16 values; the run equals the
    simulation of exactly that rule (which keeps every second moment and variance positive), and the bytes
    are what the two sections cost."""
    steps, tau = 9, 3
    records = run_worker(
        "--devices", str(world_size), "--tau", str(tau), "--max-steps", str(steps), "--optimizer", "adam",
        "--batch-norm", "--compressor", compressor, out=tmp_path / "run",
    )  # fmt: skip
    batches = [[step[0] for step in rank] for rank in lightning_batches(world_size, steps)]
    net = make_net(100, batch_norm=True)
    low = simulate_local_sgd(net, _adam, batches, mse, tau=tau, compressor=compressor)
    assert _max_diff(records, low) <= 1e-6
    n_params = sum(p.numel() for p in net.parameters())
    n_var = sum(m.running_var.numel() for m in net.modules() if isinstance(m, torch.nn.BatchNorm1d))
    signed = 2 * n_params + (sum(b.numel() for b in net.buffers() if b.is_floating_point()) - n_var)
    nonnegative = n_params + n_var  # exp_avg_sq and running_var
    _, signed_bytes = _lowp_round(compressor, signed, world_size)
    _, value_bytes = _lowp_round("bf16", nonnegative, world_size)
    per_round = signed_bytes + value_bytes
    for rec in records:
        assert rec["ledger"]["by_tag"]["average"]["bytes_sent"] == (steps // tau) * per_round


def test_hierarchical_averaging_matches_simulation(run_worker, tmp_path):
    """4 ranks in blocks of 2, tau=2, global every 3rd round: rounds 1, 2 average within {0,1} and {2,3}
    (tag average_local), round 3 over all; the run equals the simulation, and after fit all agree."""
    steps, tau = 13, 2
    records = run_worker(
        "--devices", "4", "--tau", str(tau), "--max-steps", str(steps), "--group-size", "2",
        "--global-every", "3", out=tmp_path / "run",
    )  # fmt: skip
    batches = [[step[0] for step in rank] for rank in lightning_batches(4, steps)]
    sim = simulate_local_sgd(make_net(100), _sgd, batches, mse, tau=tau, group_size=2, global_every=3)
    assert _max_diff(records, sim) <= 1e-6
    flat = simulate_local_sgd(make_net(100), _sgd, batches, mse, tau=tau)
    assert _max_diff(records, flat) > 1e-3  # the hierarchy is not a flat average in disguise
    by_tag = records[0]["ledger"]["by_tag"]
    assert by_tag["average_local"]["rounds"] == 4 and by_tag["average"]["rounds"] == 2  # 6 rounds in 13
    assert "final" in by_tag  # step 13 is local: one global round at the end of fit
    assert all(torch.equal(r["final_params"], records[0]["final_params"]) for r in records)


@pytest.mark.parametrize(("world_size", "beta"), [(2, 0.0), pytest.param(3, 0.5, marks=pytest.mark.extended)])
def test_overlap_local_sgd_matches_simulation(run_worker, tmp_path, world_size, beta):
    """Overlap Local-SGD: one all-reduce per round, started at the round and applied at the next; the run
    equals the simulation of the paper's update (with and without anchor momentum), and after fit every
    rank holds the same model."""
    steps, tau = 13, 3
    records = run_worker(
        "--strategy", "overlap_local_sgd", "--devices", str(world_size), "--tau", str(tau),
        "--max-steps", str(steps),
        "--overlap-alpha", "0.6", "--anchor-momentum", str(beta), out=tmp_path / "run",
    )  # fmt: skip
    batches = [[step[0] for step in rank] for rank in lightning_batches(world_size, steps)]
    sim = simulate_overlap_local_sgd(make_net(100), _sgd, batches, mse, tau=tau, alpha=0.6, beta=beta)
    assert _max_diff(records, sim) <= 1e-6
    blocking = simulate_local_sgd(make_net(100), _sgd, batches, mse, tau=tau, momentum="local")
    assert _max_diff(records, blocking) > 1e-3
    for rec in records:
        in_batch = [c for c in rec["calls"] if c["in_batch"]]
        assert [(c["step"], c["fn"]) for c in in_batch] == [
            (t, "all_reduce") for t in range(steps) if (t + 1) % tau == 0
        ]
        assert torch.equal(rec["final_params"], records[0]["final_params"])
    assert records[0]["ledger"]["by_tag"]["overlap_average"]["rounds"] == steps // tau


@pytest.mark.parametrize(
    ("compressor", "world_size", "beta"),
    [("int4", 2, 0.0), pytest.param("fp16", 3, 0.5, marks=pytest.mark.extended)],
)
def test_overlap_low_precision_payload_matches_its_simulation(
    run_worker, tmp_path, compressor, world_size, beta
):
    """Overlap with compressor: the change since the anchor travels in 4 or 16 bits (2 ranks: all-gather;
    3: reduce-scatter + all-gather; fp32 accumulation) on the helper thread; the run equals the simulation
    of exactly that rounding, stays within it of the fp32 overlap run, sends a seventh or half the bytes
    (fit's last average too), and no collective of a round runs on the training thread. (int8 shares
    int4's code path; the resume matrix runs it.)"""
    steps, tau = 13, 3
    records = run_worker(
        "--strategy", "overlap_local_sgd", "--devices", str(world_size), "--tau", str(tau),
        "--max-steps", str(steps),
        "--overlap-alpha", "0.6", "--anchor-momentum", str(beta), "--compressor", compressor,
        "--check-replicas", out=tmp_path / "run",
    )  # fmt: skip
    # replicas differ between rounds (the average lands a round late): only fit's final average is checked
    assert all(rec["ledger"]["by_tag"]["replica_check"]["rounds"] == 1 for rec in records)
    batches = [[step[0] for step in rank] for rank in lightning_batches(world_size, steps)]
    kwargs = {"tau": tau, "alpha": 0.6, "beta": beta}
    low = simulate_overlap_local_sgd(make_net(100), _sgd, batches, mse, compressor=compressor, **kwargs)
    exact = simulate_overlap_local_sgd(make_net(100), _sgd, batches, mse, **kwargs)
    assert _max_diff(records, low) <= 1e-6
    assert 0 < _max_diff(records, exact) <= _PAYLOAD_GAP[compressor]
    rounds = steps // tau
    numel = sum(p.numel() for p in make_net(100).parameters())  # parameters only: momentum stays local
    batches, per_round = _lowp_round(compressor, numel, world_size)
    for rec in records:
        background = [c["fn"] for c in rec["calls"] if c["thread"] == "commsgd-overlap_average"]
        assert background == ["batch_isend_irecv"] * batches * rounds
        assert not [c for c in rec["calls"] if c["in_batch"] and c["thread"] == "MainThread"]
        stats = rec["ledger"]["by_tag"]["overlap_average"]
        assert stats["rounds"] == rounds
        assert stats["bytes_sent"] == rounds * per_round
        assert torch.equal(rec["final_params"], records[0]["final_params"])
        # step 13 is local: fit's last average sends the changes since the anchor in the same format
        assert rec["ledger"]["by_tag"]["final"]["bytes_sent"] == per_round
    # ... and lands within that format's rounding of the replicas' exact mean, but not on it
    exact_final = torch.stack([low[r][-1] for r in range(world_size)]).mean(0)
    final_gap = float((records[0]["final_params"] - exact_final).abs().max())
    assert 0 < final_gap <= _PAYLOAD_GAP[compressor]


@pytest.mark.parametrize(
    ("world_size", "compressor"), [(2, None), pytest.param(3, "bf16", marks=pytest.mark.extended)]
)
def test_overlap_cocod_correction_matches_simulation(run_worker, tmp_path, world_size, compressor):
    """correction="cocod": the arrived average replaces the model each rank sent a round earlier and the
    local progress since is kept; the run equals the simulation of that rule (fp32, and bf16 payloads on 3
    ranks) and is not the paper's pull."""
    steps, tau = 13, 3
    extra = ["--compressor", compressor] if compressor else []
    records = run_worker(
        "--strategy", "overlap_local_sgd", "--devices", str(world_size), "--tau", str(tau),
        "--max-steps", str(steps),
        "--correction", "cocod", *extra, out=tmp_path / "run",
    )  # fmt: skip
    batches = [[step[0] for step in rank] for rank in lightning_batches(world_size, steps)]
    sim = simulate_overlap_local_sgd(
        make_net(100), _sgd, batches, mse, tau=tau, alpha=0.5, compressor=compressor, correction="cocod"
    )
    assert _max_diff(records, sim) <= 1e-6
    pull = simulate_overlap_local_sgd(make_net(100), _sgd, batches, mse, tau=tau, alpha=0.5)
    assert _max_diff(records, pull) > 1e-3
    assert all(torch.equal(rec["final_params"], records[0]["final_params"]) for rec in records)
