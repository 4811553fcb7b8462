"""The compression benchmark's pieces: the digits job's compressed-strategy options, the synthetic CNN
job, and the benchmark's pure helpers (no processes started here; test_bench_jobs.py runs the jobs)."""

from __future__ import annotations

import math
from types import ModuleType

import pytest
import torch

# the repository root is on the path in-process (pytest's pythonpath in pyproject.toml)
from benchmarks import bench_compression, tracing
from benchmarks.jobs import digits, synthetic_cnn
from lightning_commsgd import CompressedSGDStrategy, DianaStrategy, DoubleResidualStrategy, ScaledSign, TopK


@pytest.fixture(scope="module")
def digits_job() -> ModuleType:
    return digits


@pytest.fixture(scope="module")
def cnn() -> ModuleType:
    return synthetic_cnn


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return bench_compression


# -- digits_job.py: the compressed strategies ---------------------------------------------------------
def test_build_strategy_makes_every_compressed_strategy(digits_job):
    options = digits_job.CompressionOptions(block=64, topk_ratio=0.05, alpha=0.1, beta=1.0, seed=3)
    dore = digits_job.build_strategy("dore", 1, compression=options)
    theory = digits_job.CompressionOptions(beta=1.0, rates="theory")
    # the paper's beta is outside the theory
    with pytest.warns(UserWarning, match=r"model_rate=1.0 \(beta\) exceeds"):
        assert digits_job.build_strategy("dore", 1, compression=theory).rates == "theory"
    assert isinstance(dore, DoubleResidualStrategy) and dore.master == "rank0"
    rates = (dore.shift_rate, dore.model_rate, dore.error_weight, dore.seed)
    assert dore.compressor.block_size == 64 and rates == (0.1, 1.0, 1.0, 3)
    diana = digits_job.build_strategy("diana", 1, compression=options)
    assert isinstance(diana, DianaStrategy) and (diana.model_rate, diana.error_weight) == (1.0, 0.0)
    mem = digits_job.build_strategy("mem_sgd", 1, compression=options)
    assert isinstance(mem, CompressedSGDStrategy) and mem.error_feedback and mem.master == "replicated"
    assert isinstance(mem.compressor, TopK) and mem.compressor.ratio == 0.05
    squeeze = digits_job.build_strategy("double_squeeze", 1, compression=options)
    assert isinstance(squeeze.server_compressor, ScaledSign) and squeeze.master == "rank0"
    qsgd = digits_job.build_strategy("qsgd", 1)  # the defaults: 4 levels over buckets of 512
    assert (qsgd.compressor.levels, qsgd.compressor.bucket_size, qsgd.error_feedback) == (4, 512, False)
    assert not set(digits_job.COMPRESSED_STRATEGIES) & set(digits_job.PERIODIC_STRATEGIES)
    assert all(name in digits_job.ROUND_TAGS for name in digits_job.STRATEGIES)


def test_digits_job_fills_the_compression_defaults(digits_job):
    args = digits_job.parse_args(["--strategy", "double_squeeze"])
    assert args.server == "rank0" and args.compressor_block is None  # the default block is filled later
    assert digits_job.CompressionOptions.from_args(args).block == digits_job.DEFAULT_COMPRESSOR_BLOCK
    assert digits_job.parse_args(["--strategy", "qsgd"]).server == "replicated"
    assert digits_job.parse_args(["--strategy", "ddp"]).server is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategy", "ddp", "--server", "rank0"], "--server applies"),
        (["--strategy", "qsgd", "--topk-ratio", "0.1"], "--topk-ratio applies to --strategy mem_sgd only"),
        (["--strategy", "diana", "--dore-beta", "0.5"], "--dore-beta applies to --strategy dore only"),
        (["--strategy", "diana", "--dore-rates", "theory"], "--dore-rates applies to --strategy dore only"),
        (["--strategy", "mem_sgd", "--compressor-block", "64"], "--compressor-block applies"),
        (["--strategy", "local_sgd", "--qsgd-levels", "2"], "--qsgd-levels applies"),
        (["--strategy", "dore", "--dore-alpha", "2"], "alpha"),
        (["--strategy", "qsgd", "--qsgd-levels", "200"], "levels"),
        (["--strategy", "mem_sgd", "--topk-ratio", "0"], "ratio"),
        (["--strategy", "dore", "--schedule", "adacomm"], "--schedule adacomm needs"),
    ],
)
def test_digits_job_refuses_bad_compression_options(digits_job, capsys, argv, message):
    with pytest.raises(SystemExit):
        digits_job.parse_args(argv)
    assert message in capsys.readouterr().err


def test_step_trace_adds_the_means_over_the_ranks():
    trace = tracing.StepTrace(monitor=None, round_tags=("up", "down"))
    trace.rows = [{"step": 1, "round_bytes_sent": 10}, {"step": 2, "round_bytes_sent": 20}]
    trace.add_rank_means([[(1, 12, 10), (2, 24, 20)], [(1, 4, 2), (2, 8, 4)]])
    assert [
        (r["mean_bytes_sent"], r["mean_round_bytes_sent"], r["max_round_bytes_sent"]) for r in trace.rows
    ] == [
        (8, 6, 10),
        (16, 12, 20),
    ]
    with pytest.raises(RuntimeError, match="disagree"):
        trace.add_rank_means([[(1, 0, 0), (3, 0, 0)]])


# -- the synthetic CNN job ---------------------------------------------------------------------------
def test_synthetic_images_are_deterministic_standardised_and_shifted_prototypes(cnn):
    prototypes = cnn.make_prototypes(0)
    assert prototypes.shape == (10, 3, 32, 32)
    assert torch.equal(prototypes, cnn.make_prototypes(0)) and not torch.equal(
        prototypes, cnn.make_prototypes(1)
    )
    x, y = cnn.make_synthetic_images(prototypes, 6, noise=0.0, max_shift=5, seed=7)
    x2, y2 = cnn.make_synthetic_images(prototypes, 6, noise=0.0, max_shift=5, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.dtype == torch.float32
    # Without noise, each sample is its class prototype rolled (circularly) and scaled: torch.roll agrees.
    generator = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 10, (6,), generator=generator)
    shifts = torch.randint(-5, 6, (6, 2), generator=generator)
    contrast = 0.5 + torch.rand(6, generator=generator)
    expected = torch.stack(
        [torch.roll(prototypes[labels[i]], tuple(shifts[i].tolist()), (1, 2)) * contrast[i] for i in range(6)]
    ) / math.sqrt(13 / 12)
    assert torch.equal(y, labels) and torch.allclose(x, expected, atol=1e-6)
    noisy, _ = cnn.make_synthetic_images(prototypes, 2048, noise=3.0, max_shift=8, seed=1)
    assert abs(float(noisy.std()) - 1.0) < 0.05  # standardised whatever the noise


def test_synthetic_datamodule_and_cnn(cnn):
    datamodule = cnn.SyntheticImageDataModule(batch_size=8, train_size=40, val_size=16, repeat=2)
    datamodule.setup("fit")
    assert len(datamodule.train_dataset) == 80 and len(datamodule.val_dataset) == 16
    x, y = next(iter(datamodule.train_dataloader()))
    model = cnn.SmallCNN()
    assert model(x).shape == (8, 10)
    # conv 3->32->64->64 (3x3), then 64*4*4 -> 128 -> 10
    assert sum(p.numel() for p in model.parameters()) == (
        (27 * 32 + 32) + (288 * 64 + 64) + (576 * 64 + 64) + (1024 * 128 + 128) + (128 * 10 + 10)
    )
    skewed = cnn.SyntheticImageDataModule(train_size=40, val_size=8, label_skew_shards=2)
    skewed.setup()
    labels = skewed.train_dataset.tensors[1]
    assert labels[0::2].max() <= labels[1::2].min()  # shard 0 holds the lower labels


def test_synthetic_cnn_options(cnn, capsys):
    args = cnn.parse_args(["--strategy", "dore", "--max-steps", "3"])
    assert (args.depth, args.hidden, args.lr, args.width, args.server) == (3, 128, 0.02, 32, "rank0")
    with pytest.raises(SystemExit):
        cnn.parse_args(["--depth", "6"])
    assert "--depth" in capsys.readouterr().err


# -- bench_compression.py helpers ------------------------------------------------------------------------
def test_build_methods_keeps_the_order_and_the_baseline(bench):
    methods = bench.build_methods(["dore", "qsgd"], ["dore"])
    assert [m.key for m in methods] == ["sgd", "qsgd", "dore", "dore_paper"]
    assert methods[-1].args[-6:] == ("--dore-alpha", "0.1", "--dore-beta", "1", "--dore-eta", "1")
    assert "--dore-rates" not in methods[-1].args  # the paper row: explicit rates, no theory warning
    assert methods[-2].args[-2:] == ("--dore-rates", "theory")  # DORE's row keeps the theory's rates
    assert [m.key for m in bench.build_methods(list(bench.METHODS), [])] == list(bench.METHODS)
    with pytest.raises(ValueError, match="unknown"):
        bench.build_methods(["sgd", "nope"], [])
    with pytest.raises(ValueError, match="needs method diana"):
        bench.build_methods(["dore"], ["diana"])
    with pytest.raises(ValueError, match="no paper rates"):
        bench.build_methods(["qsgd"], ["qsgd"])


def _trace(losses, per_step=10.0):
    return [
        {"step": i + 1, "loss": loss, "round_bytes_sent": 999, "mean_round_bytes_sent": per_step * (i + 1)}
        for i, loss in enumerate(losses)
    ]


def test_loss_curve_smooths_causally_and_stops_at_a_divergence(bench):
    curve = bench.loss_curve(_trace([4.0, 2.0, 2.0, 0.0]), window=2)
    assert curve.steps == [2, 3, 4] and curve.loss == [3.0, 2.0, 1.0]
    assert curve.mean_bytes == [20.0, 30.0, 40.0] and curve.diverged_at is None and curve.final_loss == 1.0
    assert curve.first_at_or_below(2.0) == 1 and curve.first_at_or_below(0.5) is None
    # without the mean over the ranks (an older trace), rank 0's own counts
    rank0 = bench.loss_curve([{"step": 1, "loss": 1.0, "round_bytes_sent": 5}], window=1)
    assert rank0.mean_bytes == [5.0]
    diverged = bench.loss_curve(_trace([3.0, 1.0, 1.0, None, None]), window=2)
    assert diverged.steps == [2, 3] and diverged.diverged_at == 4 and math.isnan(diverged.final_loss)
    early = bench.loss_curve(_trace([None, None]), window=2)
    assert early.loss == [] and early.diverged_at == 1
    with pytest.raises(ValueError, match="window"):
        bench.loss_curve(_trace([1.0]), window=0)


def test_first_reaching_reads_the_bytes_of_the_validation_step(bench):
    trace = _trace([1.0] * 6)
    val_trace = [{"step": 2, "val_acc": 0.5}, {"step": 4, "val_acc": 0.9}, {"step": 6, "val_acc": 0.95}]
    assert bench.first_reaching(val_trace, 0.9, trace) == (4, 40.0)
    assert bench.first_reaching(val_trace, 0.99, trace) is None


def _run(losses, val_acc=0.9, per_step=10.0):
    trace = _trace(losses, per_step)
    steps = len(losses)
    return {
        "steps": steps,
        "trace": trace,
        "val_trace": [{"step": steps, "val_acc": val_acc}],
        "mean_round_bytes_sent_per_rank": per_step * steps,
        "max_round_bytes_sent_per_rank": 2 * per_step * steps,
        "final_val_acc": val_acc,
        "train_loop_s": 1.0,
    }


def test_measure_summarize_and_table(bench):
    base_run = _run([2.0, 1.0, 0.5, 0.5], per_step=100.0)
    base_curve = bench.loss_curve(base_run["trace"], 1)
    target = base_curve.final_loss
    base = bench.summarize("SGD", [bench.measure(base_run, base_curve, target, 0.89)])
    assert (base["steps_to_loss"], base["bytes_to_loss"]) == (3, 300.0)
    assert (base["steps_to_acc"], base["bytes_to_acc"], base["bytes_per_step"]) == (4, 400.0, 100.0)
    fast_run = _run([2.0, 0.4, 0.4, 0.4], per_step=2.0)
    fast = bench.summarize(
        "fast", [bench.measure(fast_run, bench.loss_curve(fast_run["trace"], 1), target, 0.89)]
    )
    assert (fast["steps_to_loss"], fast["bytes_to_loss"]) == (2, 4.0)
    slow_run = _run([2.0, 1.5, 1.0, 0.9], val_acc=0.5, per_step=1.0)
    slow = bench.summarize(
        "slow", [bench.measure(slow_run, bench.loss_curve(slow_run["trace"], 1), target, 0.89)]
    )
    assert slow["steps_to_loss"] is None and slow["steps_to_acc"] is None
    table = bench.results_table([base, fast, slow, {"label": "broken", "error": "NonFiniteError: x"}], base)
    lines = table.splitlines()
    assert len(lines) == 6 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| 0.0200 |" in lines[3] and "98.7%" in lines[3]  # 8 B vs 800 B; 4 B vs 300 B to the loss
    assert "not reached" in lines[4] and "run failed: NonFiniteError: x" in lines[5]


def test_summarize_takes_medians_and_needs_most_repeats_to_reach_a_target(bench):
    measured = [
        {"steps_to_loss": 10, "final_smoothed_loss": 1.0},
        {"steps_to_loss": None, "final_smoothed_loss": 3.0},
        {"steps_to_loss": 30, "final_smoothed_loss": 2.0},
    ]
    row = bench.summarize("m", measured)
    assert row["steps_to_loss"] == 20 and row["final_smoothed_loss"] == 2.0 and row["repeats"] == 3
    assert bench.summarize("m", measured[:2])["steps_to_loss"] is None  # 1 of 2: not most


def test_failure_gist_names_the_error(bench):
    message = (
        "exit status 1: python x.py\n--- stderr (tail) ---\nTraceback\n  File ...\nNonFiniteError: NaN | at 3"
    )
    assert bench._failure(message) == "NonFiniteError: NaN / at 3"
    assert bench._failure("timed out after 5 s: cmd\nmore") == "timed out after 5 s: cmd"


def test_plot_paths_are_named_after_the_results_and_the_workload(bench, tmp_path):
    paths = bench.plot_paths(tmp_path / "compression_2026-01-01.md", "cnn")
    assert paths["loss_vs_bytes"].name == "compression_2026-01-01_cnn_loss_vs_bytes.png"
    assert paths["loss_vs_steps"].parent == tmp_path


def test_ladder_table_gives_steps_bytes_and_savings_per_target(bench):
    sgd = bench.loss_curve(_trace([3.0, 2.0, 1.0], per_step=100.0), 1)
    small = bench.loss_curve(_trace([3.0, 2.5, 2.0, 1.5], per_step=1.0), 1)
    table = bench.ladder_table(
        ["SGD", "small", "broken"], {"SGD": [sgd], "small": [small], "broken": []}, [2.0, 1.0]
    )
    lines = table.splitlines()
    assert lines[0] == "| method | to loss 2 | to loss 1 |"
    assert lines[2] == "| SGD | 2 steps, 200 B | 3 steps, 300 B |"
    assert lines[3] == "| small | 3 steps, 3 B (98.5% less) | not reached |"
    assert lines[4] == "| broken | run failed | run failed |"


def test_claim_check_names_the_methods_under_five_percent(bench):
    rows = [
        {"label": "SGD", "bytes_to_loss": 1000.0, "bytes_to_acc": 800.0},
        {"label": "a", "bytes_to_loss": 50.0, "bytes_to_acc": 41.0},
        {"label": "b", "bytes_to_loss": None, "bytes_to_acc": 10.0},
        {"label": "c", "error": "boom"},
    ]
    text = bench.claim_check(rows)
    assert "final training loss: a." in text and "accuracy (minus the slack): b." in text
    assert "loss: none." in bench.claim_check(rows[:1] + rows[2:])
