"""DORE, DIANA, QSGD and MEM-SGD as Lightning strategies: trajectories against the single-process
references on Lightning's data order, the only collectives inside training steps, bytes and the
monitor's compression ratio, resume, registry names, YAML configs and bad input."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from compression_simulation import simulate_compressed_sgd, simulate_dore
from lightning import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.precision import MixedPrecision
from toy_problem import lightning_batches, make_net, mse, redundant_batches

from lightning_commsgd import (
    QSGD,
    CompressedSGDStrategy,
    DianaStrategy,
    DoubleResidualStrategy,
    Identity,
    PNormQuantizer,
    ScaledSign,
    TopK,
)
from lightning_commsgd.algorithms import DoubleResidualCompression
from lightning_commsgd.algorithms.protocol import World
from lightning_commsgd.comm import Communicator

REPO_ROOT = Path(__file__).resolve().parents[1]
NUMEL = 6 * 16 + 16 + 16 + 1  # make_net without BatchNorm
PNORM = PNormQuantizer(float("inf"), 16)  # C = (sqrt(16) - 1) / 2 = 1.5


def _sgd(module):
    return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)


def _batches(world_size, steps):
    return [[step[0] for step in rank] for rank in lightning_batches(world_size, steps)]


def _max_diff(records, reference):
    return max(
        float((a.float() - r).abs().max()) for rec in records for a, r in zip(rec["params"], reference)
    )


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("strategy", "master", "world_size"),
    [("dore", "rank0", 2), ("dore", "replicated", 3), ("diana", "rank0", 2)],
)
def test_dore_and_diana_match_the_reference(run_worker, tmp_path, strategy, master, world_size):
    steps = 9
    records = run_worker(
        "--strategy", strategy, "--master", master, "--devices", str(world_size), "--max-steps", str(steps),
        out=tmp_path / "run",
    )  # fmt: skip
    diana = strategy == "diana"
    reference = simulate_dore(
        make_net(100), _sgd, _batches(world_size, steps), mse, PNORM, Identity() if diana else PNORM,
        alpha=1 / (2 * 2.5) if diana else 0.1, beta=1.0, eta=0.0 if diana else 1.0,  # DORE: the paper's rates
    )  # fmt: skip
    assert _max_diff(records, reference) <= 1e-6
    payload, model_payload = (
        PNORM.payload_nbytes(NUMEL),
        (Identity() if diana else PNORM).payload_nbytes(NUMEL),
    )
    for rec in records:
        in_batch = [c for c in rec["calls"] if c["in_batch"]]
        per_step = {}
        for call in in_batch:
            per_step.setdefault(call["step"], []).append((call["fn"], call["bytes"]))
        assert sorted(per_step) == list(range(steps))
        for calls in per_step.values():
            if master == "rank0":
                assert calls == [("gather", payload + 1), ("broadcast", model_payload + world_size + 1)]
            else:
                assert calls == [("all_gather", payload + 1)]
        assert torch.equal(rec["final_params"], records[0]["final_params"])
    if master == "rank0":
        # the monitor's ratio on rank 0 (the master sends the model residual each step)
        ratio = records[0]["logged"]["comm/compression_ratio"][-1]
        assert ratio == pytest.approx((model_payload + world_size + 1) / (4 * NUMEL))


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["qsgd", "mem_sgd", "double_squeeze"])
def test_compressed_sgd_matches_the_reference(run_worker, tmp_path, strategy):
    steps = 7
    records = run_worker("--strategy", strategy, "--max-steps", str(steps), out=tmp_path / "run")
    compressor = {"qsgd": QSGD(2, 32), "mem_sgd": TopK(0.2), "double_squeeze": ScaledSign(16)}[strategy]
    reference = simulate_compressed_sgd(
        make_net(100), _sgd, _batches(2, steps), mse, compressor,
        error_feedback=strategy != "qsgd",
        server_compressor=ScaledSign(16) if strategy == "double_squeeze" else None,
    )  # fmt: skip
    assert _max_diff(records, reference) <= 1e-6
    ratio = records[0]["logged"]["comm/compression_ratio"][-1]
    # rank 0 sends its own payload + a status byte (all-gather), or the aggregate + 2 verdict bytes
    sent = compressor.payload_nbytes(NUMEL) + (2 if strategy == "double_squeeze" else 1)
    assert ratio == pytest.approx(sent / (4 * NUMEL))


def test_registered_names():
    for name, cls in [
        ("dore", DoubleResidualStrategy),
        ("diana", DianaStrategy),
        ("qsgd", CompressedSGDStrategy),
        ("mem_sgd", CompressedSGDStrategy),
        ("double_squeeze", CompressedSGDStrategy),
    ]:
        trainer = Trainer(strategy=name, accelerator="cpu", devices=2, logger=False)
        assert type(trainer.strategy) is cls
    mem = Trainer(strategy="mem_sgd", accelerator="cpu", devices=2, logger=False).strategy
    assert isinstance(mem.compressor, TopK) and mem.error_feedback
    squeeze = Trainer(strategy="double_squeeze", accelerator="cpu", devices=2, logger=False).strategy
    assert isinstance(squeeze.server_compressor, ScaledSign) and squeeze.master == "rank0"


@pytest.mark.parametrize(
    ("config", "override", "check"),
    [
        ("dore.yaml", "--trainer.strategy.master=replicated",
         lambda s: isinstance(s, DoubleResidualStrategy) and s.master == "replicated"
         and isinstance(s.compressor, PNormQuantizer) and s.compressor.block_size == 256),
        ("dore.yaml", "--trainer.strategy.rates=theory",
         lambda s: isinstance(s, DoubleResidualStrategy) and s.rates == "theory" and s.shift_rate is None),
        ("diana.yaml", "--trainer.strategy.shift_rate=0.1",
         lambda s: isinstance(s, DianaStrategy) and s.shift_rate == 0.1
         and isinstance(s.model_compressor, Identity)),
        ("qsgd.yaml", "--trainer.strategy.compressor.init_args.levels=8",
         lambda s: isinstance(s.compressor, QSGD) and s.compressor.levels == 8 and not s.error_feedback),
        ("double_squeeze.yaml", "--trainer.strategy.master=replicated",
         lambda s: isinstance(s.server_compressor, ScaledSign) and s.master == "replicated"
         and s.error_feedback),
        ("mem_sgd.yaml", "--trainer.strategy.compressor.init_args.ratio=0.05",
         lambda s: isinstance(s.compressor, TopK) and s.compressor.ratio == 0.05 and s.error_feedback),
    ],
)  # fmt: skip
def test_yaml_configs_instantiate(config, override, check, digits_example):
    cli = LightningCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=["--config", str(REPO_ROOT / "configs" / config), override],
    )  # fmt: skip
    assert check(cli.trainer.strategy)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: DoubleResidualStrategy("pnorm"), ValueError, r"`compressor` must be one of \('bf16'"),
        (lambda: DoubleResidualStrategy(PNORM, master="master"), ValueError, "master"),
        (lambda: DoubleResidualStrategy(PNORM, shift_rate=-0.1), ValueError, "shift_rate"),
        (lambda: DoubleResidualStrategy(PNORM, shift_rate=float("nan")), ValueError, "shift_rate"),
        (lambda: DoubleResidualStrategy(PNORM, model_rate=0.0), ValueError, "model_rate"),
        (lambda: DoubleResidualStrategy(PNORM, model_rate=1.5), ValueError, "model_rate"),
        (lambda: DoubleResidualStrategy(PNORM, error_weight=-1.0), ValueError, "error_weight"),
        (lambda: DoubleResidualStrategy(TopK(0.1), rates="theory"), ValueError, "biased"),
        (lambda: DoubleResidualStrategy(PNORM, rates="fast"), ValueError, "rates"),
        (lambda: DoubleResidualStrategy(PNORM, model_compressor=3), TypeError, "model_compressor"),
        (lambda: CompressedSGDStrategy(TopK(0.1), error_feedback="yes"), TypeError, "error_feedback"),
        (lambda: CompressedSGDStrategy(None), TypeError, "compressor"),
        (lambda: CompressedSGDStrategy(TopK(0.1), server_compressor="sign"), ValueError, "server_compressor"),
        (lambda: CompressedSGDStrategy(TopK(0.1), master="ps"), ValueError, "master"),
    ],
)
def test_bad_arguments_fail_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_rates_outside_the_theory_warn():
    with pytest.warns(UserWarning, match="shift_rate"):
        DoubleResidualStrategy(PNORM, shift_rate=0.9, rates="theory")  # 1/(C+1) = 0.4 for blocks of 16
    with pytest.warns(UserWarning, match="model_rate"):
        DoubleResidualStrategy(PNORM, model_rate=1.0, rates="theory")
    with warnings.catch_warnings():  # the paper's rates are outside the theorems by design: no warning
        warnings.simplefilter("error")
        DoubleResidualStrategy(PNORM)
        DoubleResidualStrategy(PNORM, shift_rate=0.3, model_rate=1.0)
        # biased: explicit rates
        DoubleResidualStrategy(TopK(0.1), shift_rate=0.1, model_rate=0.5, rates="theory")
        DoubleResidualStrategy(TopK(0.1))  # the paper's rates need no variance constant


def _dore_algorithm(strategy: DoubleResidualStrategy) -> DoubleResidualCompression:
    net = make_net(100)
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.1)]
    return strategy.algorithm_config.build(net, optimizers, Communicator(), World(1))


def test_dore_defaults_are_the_papers_rates_and_the_theorys_are_one_switch_away():
    """Defaults: the paper's experimental alpha = 0.1, beta = 1, eta = 1 (the theory's beta = 1/(C+1) moved
    x_hat by 0.118 of each step for blocks of 256 and trained that much slower); rates="theory" gives
    1/(2(C+1)), 1/(C+1) (C = 1.5 for inf-norm blocks of 16); an explicit rate wins over either."""
    paper = _dore_algorithm(DoubleResidualStrategy(PNORM))
    assert (paper.alpha, paper.beta, paper.eta) == (0.1, 1.0, 1.0)
    registered = Trainer(strategy="dore", accelerator="cpu", devices=2, logger=False).strategy
    assert registered.rates == "paper" and _dore_algorithm(registered).beta == 1.0
    theory = _dore_algorithm(DoubleResidualStrategy(PNORM, rates="theory"))
    assert (theory.alpha, theory.beta, theory.eta) == (pytest.approx(1 / 5), pytest.approx(1 / 2.5), 1.0)
    mixed = _dore_algorithm(DoubleResidualStrategy(PNORM, rates="theory", model_rate=0.3))
    assert (mixed.alpha, mixed.beta) == (pytest.approx(1 / 5), 0.3)
    net = make_net(100)  # the plain-PyTorch algorithm has the same defaults
    plain = DoubleResidualCompression([torch.optim.SGD(net.parameters(), lr=0.1)], Communicator(), PNORM)
    assert (plain.alpha, plain.beta, plain.eta) == (0.1, 1.0, 1.0)
    diana = _dore_algorithm(DianaStrategy(PNORM))  # DIANA keeps its theory alpha; its beta is 1 already
    assert (diana.alpha, diana.beta, diana.eta) == (pytest.approx(1 / 5), 1.0, 0.0)


def test_fp16_mixed_precision_is_refused_when_the_trainer_is_built():
    """On a GPU precision="16-mixed" brings a GradScaler (on CPU Lightning turns it into bf16): the
    plugin is given explicitly here, as the Trainer builds it on CUDA."""
    fp16 = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="16-mixed"):
        Trainer(strategy=DoubleResidualStrategy(PNORM), accelerator="cpu", devices=2, plugins=[fp16])


@pytest.mark.multiprocess
def test_dore_with_redundant_data_matches_the_reference(run_worker, tmp_path):
    """RI-SGD works with every strategy: DORE on the stratified redundant batches (b (1 + mu p) = 8 a
    batch) equals the reference fed the same batches."""
    steps = 6
    records = run_worker(
        "--strategy", "dore", "--redundancy", "0.5", "--max-steps", str(steps), out=tmp_path / "run"
    )  # fmt: skip
    assert all(size == 8 for rec in records for size in rec["batch_sizes"])
    batches = redundant_batches(2, steps, 0.5, "stratified")
    reference = simulate_dore(  # the default rates
        make_net(100), _sgd, batches, mse, PNORM, PNORM, alpha=0.1, beta=1.0, eta=1.0
    )
    assert _max_diff(records, reference) <= 1e-6


def test_step_buffers_are_model_sized_and_reused_on_cpu():
    """DORE's per-step vectors come from ``step_buffer``: on CPU the same fp32 vector under a name every step
    (a fresh model-sized vector a step costs its page faults), a distinct one per name."""
    algorithm = _dore_algorithm(DoubleResidualStrategy(PNORM))
    grad = algorithm.step_buffer("grad")
    assert grad.dtype == torch.float32 and grad.numel() == algorithm.numel
    assert algorithm.step_buffer("grad").data_ptr() == grad.data_ptr()
    assert algorithm.step_buffer("q_hat").data_ptr() != grad.data_ptr()
    flat = algorithm.flat_params(out=grad)
    assert flat.data_ptr() == grad.data_ptr() and torch.equal(flat, algorithm.flat_params())
