"""The emulated-cluster benchmark: its arithmetic (steps, smoothing, time to target, the analytic
prediction), its refusal to run without root, every configuration's strategy, and (as root) a short real
run whose ledger bytes agree with what the kernel counted on the links."""

from __future__ import annotations

import os
import re

import pytest
from lightning.pytorch.strategies import DDPStrategy
from test_emulated_cluster import require_emulated_cluster

# the repository root is on the path in-process (pytest's pythonpath in pyproject.toml)
from benchmarks import bench_cluster, emulated_cluster
from benchmarks.emulated_cluster import ClusterUnavailable
from benchmarks.jobs.cluster_worker import CONFIGS, build_strategy
from lightning_commsgd import LocalSGDStrategy, OverlapLocalSGDStrategy
from lightning_commsgd.compression import codec_name


def _codec_of(config_name: str) -> str:
    """The codec a cluster config's name ends with (``"fp32"``: none)."""
    return next((d for d in ("bf16", "int8", "int4") if config_name.endswith(d)), "fp32")


def test_steps_per_epoch_follows_the_padded_distributed_sampler():
    assert bench_cluster.steps_per_epoch(8628, 2, 32) == 135  # 4314 per rank -> 135 batches
    assert bench_cluster.steps_per_epoch(100, 3, 10) == 4  # 34 per rank (padded) -> 4 batches


def test_smoothed_and_time_to_target():
    assert bench_cluster.smoothed([4.0, 2.0, 0.0, 2.0], 2) == [4.0, 3.0, 1.0, 1.0]
    steps = [[0.5, 4.0], [1.0, 2.0], [1.5, 0.0], [2.0, 2.0]]
    assert bench_cluster.time_to_target(steps, 1.0, 2) == 1.5
    assert bench_cluster.time_to_target(steps, 0.5, 2) is None


def test_prediction_is_floor_plus_bytes_over_bandwidth_and_overlap_hides_tau_steps():
    row = {"config": "local_sgd", "bytes_sent": 20e6, "bytes_received": 10e6, "by_tag": {}}
    assert bench_cluster.predicted_seconds(3.0, row, 10e6, 8, 100) == (5.0, None)
    # 10 rounds of 1 MB at 10 MB/s = 0.1 s each; 8 steps of 3 s / 400 hide 0.06 s of each; 1 MB more
    # outside the rounds (x_0 broadcast, final average) is not hidden
    overlap = {
        "config": "overlap_bf16",
        "bytes_sent": 11e6,
        "bytes_received": 11e6,
        "by_tag": {"overlap_average": {"rounds": 10, "bytes_sent": 10e6, "bytes_received": 10e6}},
    }
    blocking, hidden = bench_cluster.predicted_seconds(3.0, overlap, 10e6, 8, 400)
    assert blocking == pytest.approx(4.1)
    assert hidden == pytest.approx(3.0 + 10 * 0.04 + 0.1)
    # slower compute hides the rounds completely (8 steps of 0.03 s > 0.1 s)
    assert bench_cluster.predicted_seconds(3.0, overlap, 10e6, 8, 100)[1] == pytest.approx(3.1)


def test_seeds_merge_into_means_and_a_paired_difference_to_ddp():
    def run(loss: float, seconds: float) -> dict:
        return {"config": "c", "job_seconds": seconds, "train_seconds": seconds / 2, "train_loss": loss,
                "val_acc": 0.9, "link_tx": 10.0, "steps": [[0.0, loss, 0]]}  # fmt: skip

    ddp = bench_cluster.merge_seeds([run(0.02, 10.0), run(0.04, 12.0), run(0.03, 14.0)])
    assert ddp["job_seconds"] == 12.0 and ddp["train_seconds"] == 6.0
    assert ddp["train_loss"] == pytest.approx(0.03) and ddp["train_losses"] == [0.02, 0.04, 0.03]
    assert ddp["steps"] == [[0.0, 0.02, 0]]  # the first seed's trace
    # the seed moves both alike: the paired difference is exact although the spread is large
    other = bench_cluster.merge_seeds([run(0.021, 1.0), run(0.041, 1.0), run(0.031, 1.0)])
    assert bench_cluster.loss_cells(ddp, ddp) == ("0.0300 +- 0.0100", "-")
    assert bench_cluster.loss_cells(other, ddp) == ("0.0310 +- 0.0100", "+0.0010 +- 0.0000")
    assert bench_cluster.loss_cells(other, None) == ("0.0310 +- 0.0100", "-")
    single = bench_cluster.merge_seeds([run(0.05, 1.0)])
    assert bench_cluster.loss_cells(single, ddp) == ("0.0500", "-")


def test_without_root_or_tools_it_explains_and_exits_2(monkeypatch, capsys):
    def unavailable() -> None:
        raise ClusterUnavailable("The emulated cluster needs root")

    monkeypatch.setattr(bench_cluster, "check_available", unavailable)
    assert bench_cluster.main(["--configs", "local_sgd"]) == 2
    assert "needs root" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--configs", "sgd"], "unknown"),
        (["--tau", "0"], "--tau"),
        (["--nodes", "1"], "--nodes"),
        (["--seeds", "1", "1"], "--seeds"),
        (["--seeds", "-1"], "--seeds"),
    ],
)
def test_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_cluster.main(argv)
    assert exc.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_configuration_builds_its_strategy(name):
    strategy = build_strategy(name, 8)
    if name in ("ddp", "post_local_sgd"):
        assert type(strategy) is DDPStrategy
        assert (strategy._model_averaging_period == 8) == (name == "post_local_sgd")
    if name.startswith("overlap"):
        assert isinstance(strategy, OverlapLocalSGDStrategy)
        assert codec_name(strategy.compressor) == _codec_of(name)
        assert strategy.correction == ("cocod" if "cocod" in name else "pull")
    if name.startswith("local_sgd") or name == "hierarchical":
        assert isinstance(strategy, LocalSGDStrategy) and strategy.tau == 8
        assert codec_name(strategy.compressor) == _codec_of(name)
    if name.startswith("dore"):
        config = strategy.algorithm_config
        assert config.master == ("replicated" if "replicated" in name else "rank0")
        assert type(config.wire).__name__ == ("EntropyWire" if name.endswith("_entropy") else "PackedWire")


def test_unknown_configuration():
    with pytest.raises(ValueError, match="config"):
        build_strategy("sgd", 8)


def _table(report: str) -> dict[str, dict[str, str]]:
    lines = [line for line in report.splitlines() if line.startswith("|")]
    headers = [h.strip() for h in lines[0].strip("|").split("|")]
    return {
        cells[0]: dict(zip(headers, cells))
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }


def test_short_run_skips_with_the_reason_where_tc_is_missing(monkeypatch, tmp_path):
    """``make test`` as root in a container without iproute2: the short run is skipped, saying why, instead of
    failing on the benchmark's exit code 2."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(emulated_cluster, "find_tool", lambda name: None if name == "tc" else f"/sbin/{name}")
    reason = r"cannot emulate a cluster here: `tc` \(iproute2\) is not installed: not on PATH nor in /usr/"
    with pytest.raises(pytest.skip.Exception, match=reason):
        test_short_run_on_two_emulated_nodes(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="the emulated cluster needs root (network namespaces)")
def test_short_run_on_two_emulated_nodes(tmp_path):
    """DDP, local SGD and 8-bit overlap on a 1gbit emulated link, 1 epoch of a small MLP: every row is
    there, the predictions are filled in, and the bytes the kernel counted on the links are the ledger's
    payload plus headers and rendezvous (at least the payload, at most 1.3 x it + 1.5 MB). Skipped, with the
    reason, where the emulation cannot run (no iproute2, no network namespaces)."""
    require_emulated_cluster()
    out = tmp_path / "cluster.md"
    argv = ["--rates", "1gbit", "--configs", "ddp", "local_sgd", "overlap_int8", "--epochs", "1"]
    argv += ["--hidden", "256", "--repeat", "1", "--out", str(out), "--no-plots", "--timeout", "240"]
    assert bench_cluster.main(argv) == 0
    rows = _table(out.read_text())
    assert set(rows) == {"compute_floor", "ddp", "local_sgd", "overlap_int8"}
    for name in ("ddp", "local_sgd", "overlap_int8"):
        ledger = float(rows[name]["MB sent per rank (ledger)"])
        link = float(rows[name]["MB link tx per node"])
        assert ledger <= link <= 1.3 * ledger + 1.5, (name, ledger, link)
        assert re.fullmatch(r"[\d.]+( / [\d.]+)?", rows[name]["predicted s (blocking / overlap)"])
    assert " / " in rows["overlap_int8"]["predicted s (blocking / overlap)"]
    assert rows["local_sgd"]["loss - DDP's (paired)"] == "-"  # one seed
    # 8-bit changes of the parameters against fp32 parameters + momentum: about 8x fewer bytes per round,
    # but x_0's broadcast and the exact final average are fp32 and this run has only 8 rounds
    assert float(rows["overlap_int8"]["MB sent per rank (ledger)"]) < 0.5 * float(
        rows["local_sgd"]["MB sent per rank (ledger)"]
    )
    # DDP all-reduces every step, local SGD every 8th (params + momentum): about 4x fewer bytes
    assert float(rows["local_sgd"]["MB sent per rank (ledger)"]) < 0.5 * float(
        rows["ddp"]["MB sent per rank (ledger)"]
    )


def test_codec_seconds_counts_each_encode_and_decode_once(tmp_path):
    import cProfile
    import time

    import torch

    from benchmarks.profile_cluster import codec_seconds
    from lightning_commsgd.payload import payload_codec

    codec = payload_codec("int4")  # its encode calls BlockInt4.encode: nested, counted once
    x = torch.randn(200_000)
    generator = torch.Generator().manual_seed(0)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(5):
        codec.decode(codec.encode(x, generator), x.numel())
    time.sleep(0.05)  # not codec work
    profiler.disable()
    elapsed = time.perf_counter() - start
    profiler.dump_stats(tmp_path / "rank0.prof")
    seconds = codec_seconds(tmp_path / "rank0.prof")
    assert 0 < seconds < elapsed - 0.045


def test_profile_cluster_refuses_fewer_than_one_pair_before_touching_the_cluster():
    from benchmarks import profile_cluster

    with pytest.raises(ValueError, match="pairs"):
        profile_cluster.main(["--config", "dore", "--pairs", "0"])


def test_a_master_on_rank0_pays_both_directions_in_series():
    assert bench_cluster.is_serial_chain("dore") and bench_cluster.is_serial_chain("dore_entropy")
    assert not bench_cluster.is_serial_chain("dore_replicated")
    assert not bench_cluster.is_serial_chain("qsgd_entropy")  # all-gathered: both directions at once
    row = {"config": "dore", "bytes_sent": 20e6, "bytes_received": 10e6, "by_tag": {}}
    assert bench_cluster.predicted_seconds(3.0, row, 10e6, 8, 100) == (6.0, None)


def test_the_bare_link_gives_each_configuration_its_work_beyond_the_bound():
    def section(rate: str, bandwidth: float, floor: float, loop: float) -> dict:
        rows = [
            {"config": "compute_floor", "train_seconds": floor},
            {"config": "local_sgd", "train_seconds": loop, "bytes_sent": 10e6, "bytes_received": 10e6,
             "by_tag": {}},
        ]  # fmt: skip
        return {"rate": rate, "bandwidth": bandwidth, "rows": rows}

    # bare link: bound 2 + 10 MB / 1 GB/s = 2.01 s, loop 3.01 s: 1 s of work the link does not explain
    free = section("none", 1e9, 2.0, 3.01)
    shaped = section("1gbit", 100e6, 2.2, 3.5)  # bound 2.2 + 0.1 = 2.3; + 1 s = 3.3
    assert bench_cluster.cpu_breakdown([shaped], 8, 100) is None
    table = bench_cluster.cpu_breakdown([free, shaped], 8, 100)
    row = next(line for line in table.splitlines() if line.startswith("| local_sgd"))
    assert [c.strip() for c in row.strip("|").split("|")] == [
        "local_sgd", "1gbit", "3.5", "2.3", "1.52", "1.0", "3.3", "1.06",
    ]  # fmt: skip
