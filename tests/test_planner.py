"""The scaling model and planner (lightning_commsgd.planning, ``commsgd plan``): formulas against
hand-computed cases, monotonicity and limits, the recommendation, the command line. Pure Python, no
processes."""

from __future__ import annotations

import math

import pytest

from lightning_commsgd.planning import (
    BF16,
    DDP,
    FP32,
    INT4,
    INT8,
    Gossip,
    Link,
    ParameterServer,
    Workload,
    custom_format,
    default_strategies,
    dore,
    gossip_degree,
    local_sgd,
    lowp_mean,
    overlap_local_sgd,
    parse_count,
    parse_duration,
    parse_rate,
    payload_format,
    plan,
    recommend,
    ring_allreduce,
)

# 1000 payload bytes per second: link seconds = bytes / 1000
SLOW = Link(bits_per_second=8000, latency=0.01)


def work(params=1000, step=0.1, steps=16, **kw):
    return Workload(params=params, step_seconds=step, steps_per_epoch=steps, **kw)


# --- collectives --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4, 8, 1024])
def test_ring_allreduce_volume_and_latency(n):
    seconds, sent = ring_allreduce(1000.0, n, SLOW)
    assert sent == pytest.approx(2 * (n - 1) / n * 1000)
    assert seconds == pytest.approx(2 * (n - 1) * 0.01 + sent / 1000)


def test_ring_volume_approaches_twice_the_payload():
    assert ring_allreduce(1000.0, 2, SLOW)[1] == pytest.approx(1000)  # n = 2: the payload once
    assert ring_allreduce(1000.0, 4, SLOW)[1] == pytest.approx(1500)
    assert 1990 < ring_allreduce(1000.0, 1024, SLOW)[1] < 2000


def test_two_workers_send_the_encoded_payload_once():
    # int4, 640 values: 320 bytes of codes + 10 scales of 4 bytes
    seconds, sent = lowp_mean(640, INT4, 2, SLOW)
    assert sent == 360
    assert seconds == pytest.approx(0.01 + 0.360)


def test_three_or_more_workers_reduce_scatter_then_all_gather_chunks():
    # int8, 1024 values on 4 workers: chunks of 256 values = 256 + 4 bytes, sent to 3 peers, twice
    seconds, sent = lowp_mean(1024, INT8, 4, SLOW)
    assert sent == 2 * 3 * 260
    assert seconds == pytest.approx(2 * 0.01 + 1.560)
    # an uneven split rounds the chunk up: 1000 values on 3 workers -> chunks of 334
    assert lowp_mean(1000, BF16, 3, SLOW)[1] == 2 * 2 * 334 * 2


def test_fp32_averaging_is_a_ring_all_reduce():
    assert lowp_mean(500, FP32, 2, SLOW) == ring_allreduce(2000.0, 2, SLOW)
    assert lowp_mean(500, FP32, 5, SLOW) == ring_allreduce(2000.0, 5, SLOW)


def test_codec_time_hides_behind_the_link_on_two_workers_only():
    slow_codec = INT4.with_codec_cost(encode_seconds=1e-3, decode_seconds=1e-3)  # 3 s for 1000 values
    two, _ = lowp_mean(1000, slow_codec, 2, SLOW)
    assert two == pytest.approx(0.01 + max(INT4.nbytes(1000) / 1000, 1000 * 3e-3))
    fast_codec = INT4.with_codec_cost(encode_seconds=1e-7, decode_seconds=1e-7)
    assert lowp_mean(1000, fast_codec, 2, SLOW) == lowp_mean(1000, INT4, 2, SLOW)  # hidden
    four, _ = lowp_mean(1000, fast_codec, 4, SLOW)
    base, _ = lowp_mean(1000, INT4, 4, SLOW)
    assert four - base == pytest.approx(1000 * ((1 + 1 / 4) * 1e-7 + 2 * 1e-7))  # added, not hidden


# --- formats ------------------------------------------------------------------------------------------------


def test_format_sizes_match_the_package_wire_formats():
    assert INT8.bytes_per_value == pytest.approx(1 + 4 / 256)
    assert INT4.bytes_per_value == pytest.approx(0.5 + 4 / 64)
    assert FP32.nbytes(10) == 40 and BF16.nbytes(10) == 20
    from lightning_commsgd.compression import BlockInt4, BlockInt8

    for numel in (1, 63, 64, 65, 1000, 123_457):
        assert INT8.nbytes(numel) == BlockInt8().payload_nbytes(numel)
        assert INT4.nbytes(numel) == BlockInt4().payload_nbytes(numel)


def test_custom_formats_plug_in_by_bits_per_value():
    entropy = custom_format("entropy", 3.2)
    assert entropy.nbytes(1000) == 400
    assert payload_format("3.2").nbytes(1000) == 400
    assert payload_format("int4") is INT4
    with pytest.raises(ValueError, match="Unknown payload format"):
        payload_format("int3x")
    with pytest.raises(ValueError, match="bits"):
        custom_format("bad", 0)


# --- strategies ---------------------------------------------------------------------------------------------


def test_ddp_hand_computed():
    w = work(params=1_000_000, step=0.05, steps=10)
    link = Link(bits_per_second=8e6, latency=1e-3)  # 1 MB/s
    assert DDP().buckets(1_000_000) == 2  # 4 MB: the first 1 MiB bucket, then one of up to 25 MiB
    per_step = 2 * 2 * (4 - 1) * 1e-3 + 2 * 3 / 4 * 4e6 / 1e6
    p = DDP().predict(w, link, 4)
    assert p.epoch_seconds == pytest.approx(10 * (0.05 + per_step))
    assert p.compute_seconds == pytest.approx(0.5) and p.bytes_per_worker == pytest.approx(10 * 6e6)
    hidden = DDP(overlap=1.0).predict(w, link, 4)  # backward overlap hides t_c of each step
    assert hidden.comm_seconds == pytest.approx(10 * (per_step - 0.05))


def test_local_sgd_rounds_every_tau_steps():
    w = work(params=1000, step=0.1, steps=16)
    p = local_sgd(4, INT4).predict(w, SLOW, 2)
    round_s = 0.01 + INT4.nbytes(2000) / 1000  # parameters and momentum: 2000 values
    assert p.rounds == 4
    assert p.epoch_seconds == pytest.approx(1.6 + 4 * round_s)
    assert p.bytes_per_worker == 4 * INT4.nbytes(2000)
    params_only = local_sgd(4, INT4, state_copies=1).predict(w, SLOW, 2)
    assert params_only.bytes_per_worker == 4 * INT4.nbytes(1000)


def test_overlap_hides_the_round_behind_tau_steps():
    w = work(params=1000, step=0.1, steps=16)
    round_s = 0.01 + INT4.nbytes(1000) / 1000  # 0.5725 s
    assert overlap_local_sgd(8, INT4).predict(w, SLOW, 2).comm_seconds == 0  # 8 steps = 0.8 s hide it
    p = overlap_local_sgd(4, INT4).predict(w, SLOW, 2)  # 4 steps = 0.4 s do not
    assert p.comm_seconds == pytest.approx(4 * (round_s - 0.4))
    blocking = local_sgd(4, INT4, state_copies=1).predict(w, SLOW, 2)
    assert blocking.comm_seconds == pytest.approx(4 * round_s)


@pytest.mark.parametrize(
    "topology, n, degree",
    [
        ("ring", 2, 1),
        ("ring", 16, 2),
        ("torus", 4, 2),
        ("torus", 16, 4),
        ("torus", 8, None),
        ("exponential", 8, 3),
        ("exponential", 9, 4),
        ("one_peer_exponential", 64, 1),
        ("complete", 10, 9),
    ],
)
def test_gossip_degree(topology, n, degree):
    assert gossip_degree(topology, n) == degree


def test_gossip_cost_scales_with_degree_not_with_n():
    w = work(params=1000, step=0.1, steps=8)
    ring = [Gossip("ring", tau=1).predict(w, SLOW, n) for n in (4, 64, 1024)]
    assert (
        ring[0].epoch_seconds == pytest.approx(ring[1].epoch_seconds) == pytest.approx(ring[2].epoch_seconds)
    )
    per_round = 0.01 + 2 * 8000 / 1000  # 2 neighbours, params + momentum in fp32
    assert ring[0].comm_seconds == pytest.approx(8 * per_round)
    complete = Gossip("complete", tau=1).predict(w, SLOW, 8)
    assert complete.comm_seconds == pytest.approx(8 * (0.01 + 7 * 8000 / 1000))
    assert Gossip("torus").predict(w, SLOW, 8) is None


def test_parameter_server_bottleneck_grows_linearly_with_n():
    w = work(params=1000, step=0.1, steps=10)
    link = Link(bits_per_second=8000, latency=0.0)
    per_update = [ParameterServer("sync").predict(w, link, n).comm_seconds / 10 for n in (2, 4, 6, 8)]
    assert per_update == pytest.approx([2 * n * 4000 / 1000 for n in (2, 4, 6, 8)])
    steps = [b - a for a, b in zip(per_update, per_update[1:])]
    assert steps == pytest.approx([steps[0]] * 3)
    p = ParameterServer("sync", update_seconds=0.5).predict(w, link, 2)
    assert p.epoch_seconds == pytest.approx(10 * (0.1 + 16 + 0.5))
    assert "server" in p.bottleneck
    assert ParameterServer("sync", k=3).predict(w, link, 2) is None  # k > n


def test_async_parameter_server_is_bound_by_the_workers_or_the_server_link():
    link = Link(bits_per_second=8e6, latency=0.0)  # 1 MB/s; S = 4 kB: 4 ms a payload
    w = work(params=1000, step=0.1, steps=10)
    few = ParameterServer("async").predict(w, link, 2)  # workers: (0.1 + 0.008) / 2 per gradient
    assert few.epoch_seconds == pytest.approx(20 * 0.108 / 2)
    assert "worker" in few.bottleneck
    many = ParameterServer("async").predict(w, link, 64)  # server link: 4 ms per gradient
    assert many.epoch_seconds == pytest.approx(640 * 0.004)
    assert "server's link" in many.bottleneck
    updates = ParameterServer("async", update_seconds=0.01).predict(w, link, 64)
    assert "update rate" in updates.bottleneck and updates.epoch_seconds == pytest.approx(640 * 0.01)


def test_dore_master_link_carries_n_minus_one_payloads_in():
    w = work(params=1024, step=0.1, steps=1)
    link = Link(bits_per_second=8000, latency=0.0)
    up = 1024 * 2 // 8 + 4 * 4  # 2 bits, a scale per 256
    p = dore().predict(w, link, 5)
    assert p.comm_seconds == pytest.approx((4 * up + 3 * up) / 1000)  # gather, then ceil(log2 5) = 3 levels
    assert p.bottleneck_bytes == 4 * up


# --- monotonicity and limits --------------------------------------------------------------------------------


def test_epoch_time_falls_with_the_link_rate_and_rises_with_latency():
    w = work(params=100_000, step=0.01, steps=50)
    for strategy in default_strategies(tau=4):
        times = [strategy.predict(w, Link(rate, 1e-4), 4) for rate in (1e7, 1e8, 1e9, 1e10)]
        times = [t.epoch_seconds for t in times if t is not None]
        assert times == sorted(times, reverse=True), strategy.label
        lat = [strategy.predict(w, Link(1e9, alpha), 4) for alpha in (0, 1e-4, 1e-3)]
        lat = [t.epoch_seconds for t in lat if t is not None]
        assert lat == sorted(lat), strategy.label


def test_infinitely_fast_network_leaves_the_compute_floor():
    w = work(params=100_000, step=0.01, steps=50)
    link = Link(1e18, 0.0)
    for p in plan(w, link, [2, 16], default_strategies(tau=4)):
        assert p.epoch_seconds == pytest.approx(p.floor_seconds, rel=1e-6), p.strategy


def test_larger_tau_and_fewer_bits_are_never_slower():
    w = work(params=100_000, step=0.01, steps=64)
    link = Link(1e8, 1e-4)
    for n in (2, 3, 16):
        by_tau = [local_sgd(t, FP32).predict(w, link, n).epoch_seconds for t in (1, 2, 4, 8, 64)]
        assert by_tau == sorted(by_tau, reverse=True)
        by_format = [local_sgd(8, f).predict(w, link, n).epoch_seconds for f in (FP32, BF16, INT8, INT4)]
        assert by_format == sorted(by_format, reverse=True)


def test_steps_shrink_with_workers_like_the_distributed_sampler():
    w = Workload(params=10, step_seconds=0.1, samples_per_epoch=1000, batch_size=10)
    assert [w.steps(n) for n in (1, 2, 3, 7)] == [100, 50, 34, 15]
    assert w.gradients(3) == 102
    with pytest.raises(ValueError, match="exactly one"):
        Workload(params=10, step_seconds=0.1)
    with pytest.raises(ValueError, match="batch_size"):
        Workload(params=10, step_seconds=0.1, samples_per_epoch=100)
    with pytest.raises(ValueError, match="params"):
        Workload(params=0, step_seconds=0.1, steps_per_epoch=1)
    with pytest.raises(ValueError, match="bits_per_second"):
        Link(bits_per_second=-1)


# --- recommendation -----------------------------------------------------------------------------------------


def test_recommends_ddp_when_the_link_is_fast_enough():
    w = work(params=1000, step=0.1, steps=10)
    choice = recommend(w, Link(1e12, 0.0), 4)
    assert choice.strategy == "DDP" and choice.tau is None and choice.meets_target


def test_recommends_the_smallest_tau_then_the_least_lossy_format():
    # P = 1000, t_c = 0.1 s, 64 steps: floor 6.4 s, target 7.04 s: 0.64 s of rounds at most
    w = work(params=1000, step=0.1, steps=64)
    link = Link(bits_per_second=8e4, latency=0.0)  # 10 kB/s; a round of 2000 values on 2 workers:
    # fp32 0.8 s, bf16 0.4 s, int8 0.2031 s, int4 0.1125 s
    choice = recommend(w, link, 2)
    # tau = 16 (4 rounds): fp32 3.2 s, bf16 1.6, int8 0.81, int4 0.45 -> int4; tau = 32: bf16 0.8 s, int8 0.41
    assert (choice.tau, choice.payload) == (16, INT4)
    assert choice.meets_target and choice.prediction.slowdown <= 1.1
    # a larger slack: tau 8 with int4 (8 x 0.1125 = 0.9 s <= 0.96 s) comes first
    assert (recommend(w, link, 2, slack=0.15).tau, recommend(w, link, 2, slack=0.15).payload) == (8, INT4)
    # only lossless formats allowed: the smallest tau at which fp32 fits, 128 (0.5 rounds, 0.4 s)
    assert recommend(w, link, 2, formats=[FP32]).tau == 128


def test_reports_when_no_candidate_meets_the_target():
    w = work(params=10_000_000, step=0.001, steps=10)
    choice = recommend(w, Link(1e6, 1e-3), 8, taus=[1, 2, 4])
    assert not choice.meets_target
    assert "no candidate" in choice.describe()


# --- units and the command line -----------------------------------------------------------------------------


def test_human_units():
    assert parse_rate("100mbit") == 1e8 and parse_rate("1gbit") == 1e9 and parse_rate("10gbit") == 1e10
    assert parse_rate("12MB/s") == 96e6 and parse_rate("2.5Gbps") == 2.5e9
    assert parse_duration("0.5ms") == pytest.approx(5e-4) and parse_duration("50us") == pytest.approx(5e-5)
    assert parse_duration("0", allow_zero=True) == 0
    assert parse_count("1.3e6") == parse_count("1.3M") == 1_300_000 and parse_count("7B") == 7_000_000_000
    for bad in ("fast", "0mbit", "-3gbit"):
        with pytest.raises(ValueError, match="link rate"):
            parse_rate(bad)
    with pytest.raises(ValueError, match="duration"):
        parse_duration("5 parsecs")
    with pytest.raises(ValueError, match="whole number"):
        parse_count("1.5")


PLAN = ["plan", "--params", "1.3M", "--link", "100mbit", "--latency", "0.2ms", "--step-time", "5ms"]


def test_commsgd_plan_prints_the_table_and_the_recommendation(capsys):
    from lightning_commsgd.cli import main

    main(
        [
            *PLAN,
            "--workers",
            "2",
            "4",
            "9",
            "--samples-per-epoch",
            "50000",
            "--batch-size",
            "32",
            "--tau",
            "8",
        ]
    )
    out = capsys.readouterr().out
    assert "B = 100 Mbit/s" in out and "alpha = 200 us" in out
    for label in (
        "DDP",
        "local SGD tau=8 int4",
        "overlap local SGD tau=8 fp32",
        "gossip torus tau=8",
        "sync PS",
    ):
        assert label in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("2 ", "4 ", "9 "))]
    assert {r[0] for r in rows} == {"2", "4", "9"}
    assert not any(r[0] in ("2",) and "torus" in r for r in rows)  # a torus needs a square n
    assert "Recommendation" in out and "smallest tau" in out
    assert sum(line.strip().startswith("n=") for line in out.splitlines()) == 3
    # the figures are the model's
    w = Workload(params=1_300_000, step_seconds=5e-3, samples_per_epoch=50_000, batch_size=32)
    ddp = DDP().predict(w, Link(1e8, 2e-4), 4)
    assert f"{ddp.epoch_seconds:.4g}" in out


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--link", "fast", "--steps-per-epoch", "10"], "--link"),
        (["--workers", "1", "--steps-per-epoch", "10"], "--workers"),
        (["--steps-per-epoch", "10", "--samples-per-epoch", "10"], "exactly one"),
        (["--samples-per-epoch", "100"], "--batch-size"),
        (["--steps-per-epoch", "10", "--formats", "int3x"], "--formats"),
        (["--steps-per-epoch", "10", "--latency", "-1ms"], "--latency"),
    ],
)
def test_commsgd_plan_refuses_bad_input_naming_the_flag(capsys, extra, flag):
    from lightning_commsgd.cli import main

    with pytest.raises(SystemExit) as exc:
        main([*PLAN, *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "commsgd plan: error:" in err and flag in err


def test_plan_refuses_a_single_worker():
    with pytest.raises(ValueError, match="worker count"):
        plan(work(), SLOW, [1])
    assert math.isfinite(plan(work(), SLOW, [2])[0].epoch_seconds)


def test_parameter_server_labels():
    assert ParameterServer("sync").label == "sync PS"
    assert ParameterServer("sync", k=3).label == "K-sync PS k=3"
    assert ParameterServer("async", k=2).label == "K-async PS k=2"
    assert ParameterServer("batch", k=4).label == "K-batch-async PS k=4"
    with pytest.raises(ValueError, match="mode"):
        ParameterServer("gossip")


def test_the_validation_benchmark_predicts_with_the_planner():
    """``bench_scaling --validate`` predicts a run of ``steps`` steps; gossip always ends with an exact
    all-reduce (the mixer never counts a round as exact), local SGD only when the last step was no round."""
    from benchmarks.bench_scaling import predicted_train_loop, worker_counts

    link = Link(bits_per_second=8000, latency=0.0)
    seconds, sent = predicted_train_loop("gossip", 2, 16, 8, 1000, 0.1, link)
    final = ring_allreduce(8000.0, 2, link)
    assert seconds == pytest.approx(1.6 + 2 * 8 + final[0]) and sent == pytest.approx(2 * 8000 + final[1])
    exact, _ = predicted_train_loop("local_sgd", 2, 16, 8, 1000, 0.1, link)
    ragged, _ = predicted_train_loop("local_sgd", 2, 20, 8, 1000, 0.1, link)
    assert exact == pytest.approx(1.6 + 2 * 8) and ragged == pytest.approx(2.0 + 2 * 8 + 8)  # + the final
    with pytest.raises(ValueError, match="no model"):
        predicted_train_loop("dore", 2, 16, 8, 1000, 0.1, link)
    assert worker_counts(2, 20) == [2, 4, 8, 9, 16]
