"""The parameter-server strategies inside Lightning: sync SGD equals DDP, async runs end where they should."""

from __future__ import annotations

import pytest

from lightning_commsgd import AsyncSGDStrategy, KSyncSGDStrategy, StalenessAwareLR


@pytest.mark.multiprocess
def test_ksync_with_k_equal_p_follows_ddp_with_momentum_sgd(run_worker, tmp_path):
    """k = P: every update averages all P gradients of the current model: DDP's trajectory (momentum SGD,
    Nesterov, weight decay, a step scheduler and two parameter groups, all run on the server), to 1e-6 at
    every step on every rank."""
    common = ["--max-steps", "8", "--scheduler", "--groups", "--devices", "3"]
    ps = run_worker("--strategy", "ksync", *common, out=tmp_path / "ps")
    ddp = run_worker("--strategy", "ddp", *common, out=tmp_path / "ddp")
    for rank, (rec_ps, rec_ddp) in enumerate(zip(ps, ddp)):
        assert rec_ps["steps"] == rec_ddp["steps"] == list(range(1, 9)), rank
        for step, (a, b) in enumerate(zip(rec_ps["params"], rec_ddp["params"]), start=1):
            assert float((a - b).abs().max()) <= 1e-6, (rank, step)
    # workers 1 and 2 push 8 gradients (a 32-byte header each) and a last "leave" header, and pull 8
    # models; rank 0's own pushes and pulls are in-process and cost nothing
    message = ps[0]["params"][0].numel() * 4 + 32
    for worker in (1, 2):
        traffic = ps[worker]["ledger"]["by_tag"]["ps"]
        assert traffic["bytes_sent"] == 8 * message + 32 and traffic["bytes_received"] == 8 * message
    server = ps[0]["ledger"]["by_tag"]["ps"]
    assert server["bytes_received"] == 2 * (8 * message + 32) and server["bytes_sent"] == 2 * 8 * message


@pytest.mark.multiprocess
@pytest.mark.parametrize(("k", "variant"), [(1, "k-async"), (2, "k-batch")])
def test_async_variants_stop_every_rank_at_max_steps_with_rank0_holding_the_server_model(
    run_worker, tmp_path, k, variant
):
    """The server's update count is the global step: with max_steps=12 every rank stops, and each worker's
    global_step is the version of the last model it received (12 for those told to stop at the end)."""
    records = run_worker(
        "--strategy", "async", "--k", str(k), "--variant", variant, "--max-steps", "12", "--devices", "3",
        out=tmp_path / variant,
    )  # fmt: skip
    assert all(rec["steps"] and rec["steps"][-1] <= 12 for rec in records)
    assert records[0]["steps"][-1] == 12 or max(rec["steps"][-1] for rec in records) == 12
    pushes = sum(len(rec["steps"]) for rec in records)
    assert pushes >= 12 * k  # every update took k gradients (a few more pushes are answered with stop)


def test_bad_arguments_are_refused_before_any_process_group():
    with pytest.raises(ValueError, match="k must be in"):
        KSyncSGDStrategy(k=0)
    with pytest.raises(TypeError, match="k must be an integer"):
        AsyncSGDStrategy(k=1.5)
    with pytest.raises(ValueError, match="variant"):
        AsyncSGDStrategy(variant="hogwild")
    with pytest.raises(TypeError, match="staleness_lr"):
        AsyncSGDStrategy(staleness_lr=0.1)
    with pytest.raises(ValueError, match="straggler_mu"):
        AsyncSGDStrategy(straggler_mu=0)
    with pytest.raises(ValueError, match="does not support"):
        KSyncSGDStrategy(redundancy=0.5)
    AsyncSGDStrategy(staleness_lr=StalenessAwareLR(C=1.0))


def test_k_above_the_number_of_workers_is_refused_when_the_trainer_is_built():
    import lightning as L

    with pytest.raises(ValueError, match=r"k must be in \[1, 2\]"):
        L.Trainer(accelerator="cpu", devices=2, strategy=KSyncSGDStrategy(k=3), logger=False)
