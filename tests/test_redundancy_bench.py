"""The RI-SGD benchmark's pieces: label-skewed shards of the digits, the digits job's RI-SGD options, and the
benchmark's pure helpers (no processes started here; test_bench_jobs.py runs the job)."""

from __future__ import annotations

import math
from types import ModuleType

import pytest
import torch

# the repository root is on the path in-process (pytest's pythonpath in pyproject.toml)
from benchmarks import bench_redundancy
from benchmarks.jobs import digits
from examples.digits.data import DigitsDataModule, label_skew_order
from lightning_commsgd import RedundancyInfusion

P = 4  # workers, as in the benchmark


@pytest.fixture(scope="module")
def digits_job() -> ModuleType:
    return digits


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return bench_redundancy


def _train_labels(datamodule: DigitsDataModule) -> torch.Tensor:
    datamodule.setup("fit")
    return torch.tensor([int(datamodule.train_dataset[i][1]) for i in range(len(datamodule.train_dataset))])


# -- label_skew_order ---------------------------------------------------------------------------------------
def test_label_skew_order_puts_a_sorted_block_in_each_strided_shard():
    labels = torch.tensor([3, 0, 2, 1, 3, 0, 1, 2, 0, 3, 1])  # 11 samples, 3 shards: 9 kept
    order = label_skew_order(labels, 3)
    assert sorted(order.tolist()) == list(range(9))  # a permutation of the first 3 * floor(11 / 3)
    shards = [labels[order[j::3]].tolist() for j in range(3)]
    # Concatenated, the shards are the label-sorted kept samples: shard j is the j-th block.
    assert sum(shards, []) == sorted(labels[:9].tolist())
    # Within a block the stable sort keeps the original order of equal labels.
    assert order[0::3].tolist() == [1, 5, 8]


@pytest.mark.parametrize("shards", [0, -1, 2.0, True])
def test_label_skew_order_rejects_bad_shards(shards):
    with pytest.raises(ValueError, match="shards"):
        label_skew_order(torch.arange(10), shards)


def test_label_skew_order_needs_a_sample_per_shard():
    with pytest.raises(ValueError, match="3 samples into 4"):
        label_skew_order(torch.arange(3), 4)


# -- DigitsDataModule(label_skew_shards=...) ----------------------------------------------------------------
def test_label_skew_shards_make_non_iid_shards_of_the_same_training_set():
    iid, skewed = DigitsDataModule(), DigitsDataModule(label_skew_shards=P)
    iid_labels, skewed_labels = _train_labels(iid), _train_labels(skewed)
    n = len(iid_labels)
    assert len(skewed_labels) == P * (n // P)  # truncated to a multiple of the shards
    # The same samples as the plain split (minus the truncated ones), in another order.
    iid_x = torch.stack([iid.train_dataset[i][0] for i in range(n)])
    skewed_x = torch.stack([skewed.train_dataset[i][0] for i in range(len(skewed_labels))])
    iid_rows = {tuple(row.tolist()) for row in iid_x}
    assert all(tuple(row.tolist()) in iid_rows for row in skewed_x)
    assert len({tuple(row.tolist()) for row in skewed_x}) == len(
        {tuple(row.tolist()) for row in iid_x[: len(skewed_x)]}
    )
    # Each strided shard is one label-sorted block: at most 4 digits (10 labels over 4 blocks), the
    # most common making at least 40 % of it, and consecutive shards in label order.
    for j in range(P):
        shard = skewed_labels[j::P]
        assert shard.unique().numel() <= 4
        assert shard.bincount().max() >= 0.4 * len(shard)
        assert shard.tolist() == sorted(shard.tolist())
        if j:
            assert skewed_labels[j - 1 :: P].max() <= shard.min()
    # The plain split's shards are close to iid: every shard has all 10 digits.
    assert all(iid_labels[j::P].unique().numel() == 10 for j in range(P))
    # Validation is untouched.
    assert torch.equal(iid.val_dataset.tensors[1], skewed.val_dataset.tensors[1])


def test_label_skew_survives_repeat():
    """The truncation keeps the length a multiple of the shards, so repeats keep every strided shard."""
    once, twice = DigitsDataModule(label_skew_shards=P), DigitsDataModule(label_skew_shards=P, repeat=2)
    labels, repeated = _train_labels(once), _train_labels(twice)
    assert torch.equal(repeated, torch.cat([labels, labels]))
    for j in range(P):
        assert torch.equal(repeated[j::P], torch.cat([labels[j::P], labels[j::P]]))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4"])
def test_label_skew_shards_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="label_skew_shards"):
        DigitsDataModule(label_skew_shards=bad)


def test_strided_placement_at_mu_zero_hands_each_rank_its_block():
    """What the digits job's --non-iid does at mu = 0 (original_world_size=p): rank 0 only sees its digits;
    with mu = 0.5 (stratified) it also sees its two neighbours' blocks."""
    datamodule = DigitsDataModule(batch_size=16, label_skew_shards=P)
    labels = _train_labels(datamodule)
    for mu, held in ((0.0, [0]), (0.5, [0, 1, 2])):
        config = RedundancyInfusion(mu=mu, sampling="stratified", original_world_size=P)
        loader = config.dataloader(datamodule.train_dataloader(), P, 0)
        seen = torch.cat([y for _, y in loader])
        expected = torch.cat([labels[j::P] for j in held])
        assert sorted(seen.unique().tolist()) == sorted(expected.unique().tolist())
        assert len(next(iter(loader))[1]) == 16 * len(held)


# -- digits_job.py options --------------------------------------------------------------------------------
def test_digits_job_parses_the_ri_sgd_options(digits_job):
    args = digits_job.parse_args(
        ["--strategy", "local_sgd", "--devices", "4", "--redundancy", "0.5", "--sampling", "union",
         "--non-iid", "--val-every-steps", "25"]
    )  # fmt: skip
    assert (args.redundancy, args.sampling, args.non_iid, args.val_every_steps) == (0.5, "union", True, 25)
    defaults = digits_job.parse_args([])
    assert (defaults.redundancy, defaults.sampling, defaults.non_iid, defaults.val_every_steps) == (
        0.0,
        "stratified",
        False,
        0,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategy", "ddp", "--redundancy", "0.25"], "--redundancy applies"),
        (["--strategy", "ddp", "--non-iid"], "--non-iid applies"),
        (["--strategy", "local_sgd", "--devices", "4", "--redundancy", "0.8"], "1 - 1/p"),
        (["--strategy", "local_sgd", "--redundancy", "-0.1"], "1 - 1/p"),
        (["--strategy", "local_sgd", "--val-every-steps", "-1"], "--val-every-steps"),
    ],
)
def test_digits_job_refuses_bad_ri_sgd_options(digits_job, capsys, argv, message):
    with pytest.raises(SystemExit):
        digits_job.parse_args(argv)
    assert message in capsys.readouterr().err


def test_build_strategy_passes_redundancy_to_every_strategy_of_ours(digits_job):
    for name in ("local_sgd", "gossip", "elastic"):
        strategy = digits_job.build_strategy(
            name, 4, redundancy=0.5, sampling="union", strided_placement_for=4
        )
        assert strategy.redundancy == RedundancyInfusion(mu=0.5, sampling="union", original_world_size=4)
    assert digits_job.build_strategy("local_sgd", 4).redundancy is None
    with pytest.raises(ValueError, match="DDPStrategy"):
        digits_job.build_strategy("ddp", 1, redundancy=0.5)


def test_redundancy_zero_given_selects_the_strided_placement_of_the_sweep(digits_job, bench):
    """``--redundancy 0`` is the mu = 0 point of the sweep's placement (fixed strided shards), not
    Lightning's global reshuffle; only a run with no RI-SGD option (the bench's iid reference) keeps that."""
    given_zero = digits_job.build_strategy("local_sgd", 4, redundancy=0.0)
    assert given_zero.redundancy == RedundancyInfusion(mu=0.0)
    for mu in ("0", "0.25", "0.5"):
        args = digits_job.parse_args(["--strategy", "local_sgd", "--devices", "4", "--redundancy", mu])
        assert args.ri_sgd and args.redundancy == float(mu)
    assert not digits_job.parse_args(["--strategy", "local_sgd", "--devices", "4"]).ri_sgd
    iid = bench.build_configs([0.0, 0.5], 32, 4, "stratified", control=False, iid=True)[-1]
    assert iid.kind == "iid" and not {"--redundancy", "--sampling", "--non-iid"} & set(iid.args)


# -- bench_redundancy.py helpers ----------------------------------------------------------------------------
def test_stratified_batch_size_follows_the_sampler(bench):
    assert [bench.stratified_batch_size(32, mu, 4) for mu in (0, 0.25, 0.5, 0.75)] == [32, 64, 96, 128]
    # mu p = 0.3 * 4 = 1.2 (just below in floating point): one full shard and int(32 * 0.2) = 6 more.
    assert bench.stratified_batch_size(32, 0.3, 4) == 32 * 2 + 6


def test_build_configs_adds_the_matching_control_and_the_iid_run(bench):
    configs = bench.build_configs([0.0, 0.25, 0.5], 32, 4, "stratified", control=True, iid=True)
    assert [c.label for c in configs] == ["mu=0", "mu=0.25", "mu=0.5", "control: mu=0, batch 96", "iid: mu=0"]
    assert [c.kind for c in configs] == ["ri_sgd", "ri_sgd", "ri_sgd", "control", "iid"]
    control, iid = configs[3], configs[4]
    assert control.samples_per_step == 96 and control.args[-2:] == ("--batch-size", "96")
    assert "--non-iid" in control.args and "--non-iid" not in iid.args
    # Union batches do not grow with mu: no control needed.
    union = bench.build_configs([0.0, 0.5], 32, 4, "union", control=True, iid=False)
    assert [c.kind for c in union] == ["ri_sgd", "ri_sgd"]


def _run(val_accs: list[float], val_losses: list[float]) -> dict:
    """A minimal digits_job.py result with a validation every 2 rounds."""
    return {
        "val_trace": [
            {"step": 16 * (i + 1), "rounds": 2 * (i + 1), "val_loss": loss, "val_acc": acc}
            for i, (acc, loss) in enumerate(zip(val_accs, val_losses))
        ],
        "trace": [{"loss": 1.0 / (step + 1)} for step in range(16 * len(val_accs))],
        "averaging_rounds": 2 * len(val_accs),
        "round_bytes_sent_per_rank": 1000,
        "bytes_sent_per_rank": 1200,
        "samples_per_rank_batch": 32,
        "final_val_loss": val_losses[-1],
        "final_val_acc": val_accs[-1],
        "train_loop_s": 1.5,
    }


def test_rounds_to_accuracy_and_measure(bench):
    run = _run([0.5, 0.91, 0.89, 0.96], [1.0, 0.4, 0.5, 0.2])
    assert bench.rounds_to_accuracy(run["val_trace"], 0.9) == 4
    assert bench.rounds_to_accuracy(run["val_trace"], 0.96) == 8
    assert bench.rounds_to_accuracy(run["val_trace"], 0.97) is None
    measured = bench.measure(run, window=4, targets=[0.9, 0.97])
    assert measured["to_target"] == {0.9: 4.0, 0.97: math.inf}
    assert measured["best_val_loss"] == 0.2 and measured["best_val_acc"] == 0.96
    assert measured["tail_evals"] == 1 and measured["tail_val_loss"] == 0.2  # a quarter of 4 evaluations
    assert measured["final_smoothed_train_loss"] == pytest.approx(sum(1 / s for s in range(61, 65)) / 4)
    with pytest.raises(ValueError, match="val-every-steps"):
        bench.measure({**run, "val_trace": []}, window=4, targets=[0.9])


def test_summary_tables_and_findings(bench):
    configs = bench.build_configs([0.0, 0.5], 32, 4, "stratified", control=True, iid=False)
    runs = [
        _run([0.5, 0.8, 0.9, 0.9], [1.0, 0.6, 0.5, 0.5]),
        _run([0.6, 0.92, 0.95, 0.96], [0.9, 0.3, 0.2, 0.15]),
        _run([0.5, 0.85, 0.91, 0.92], [1.0, 0.5, 0.4, 0.4]),
    ]
    # A second seed in which mu=0.5 is worse than mu=0 on the residual but still faster to 0.9.
    other_seed = [
        _run([0.5, 0.9, 0.95, 0.95], [1.0, 0.3, 0.1, 0.1]),
        _run([0.9, 0.92, 0.95, 0.96], [0.9, 0.3, 0.2, 0.2]),
        _run([0.5, 0.85, 0.91, 0.92], [1.0, 0.5, 0.4, 0.4]),
    ]
    targets = [0.9, 0.95]
    per_seed = {
        c.label: {0: bench.measure(a, 4, targets), 1: bench.measure(b, 4, targets)}
        for c, a, b in zip(configs, runs, other_seed)
    }
    rows = [bench.summarize(c, list(per_seed[c.label].values())) for c in configs]
    rows[1]["samples_per_step"] = rows[2]["samples_per_step"] = 96
    table = bench.results_table(rows, targets)
    assert table.count("\n") == 4 and "| mu=0.5 | 96 | 8 |" in table
    # Medians over the 2 seeds: mu=0 reaches 0.95 in 6 rounds in seed 1 and never in seed 0.
    assert rows[0]["to_target"][0.95] == math.inf and rows[1]["tail_val_loss"] == pytest.approx(0.175)
    notes = bench.findings(rows, targets, per_seed)
    assert len(notes) == 2  # mu=0.5 vs mu=0, and vs the control of the same batch
    assert notes[0].startswith(
        "- mu=0.5 vs mu=0: residual val loss 0.1750 vs 0.3000 (-0.1250, lower in 1/2 seeds)"
    )
    assert "rounds to val acc 0.9: 3 vs 5 (fewer in 2/2 seeds)" in notes[0]
    assert "vs control: mu=0, batch 96" in notes[1]
    seed_table = bench.per_seed_table(per_seed, targets)
    assert "seed 1: rounds to 0.9/0.95" in seed_table
    assert "| mu=0 | 0.5000 | 6/- | 0.1000 | 4/6 |" in seed_table


def test_bench_parse_args_checks_mu_before_running(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--mus", "0", "0.9"])
    assert "--mus 0.9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--mus", "0.1", "--batch-size", "2"])
    assert "partial shard" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", "1", "1"])
    assert "distinct" in capsys.readouterr().err
    args = bench.parse_args([])
    assert args.mus == [0.0, 0.25, 0.5] and args.tau == 8 and args.devices == 4 and args.seeds == [0]
    assert bench.parse_args(["--seed", "3"]).seeds == [3]
