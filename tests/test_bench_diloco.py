"""The DiLoCo benchmark's pure parts: --steps parsing, time and bytes to DDP's final loss, the
standard-library text (deterministic files, split and windows), the LM (builds and takes one step, Streaming
DiLoCo's block fragments) and every configuration's strategy. No timed assertion, no process group."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from benchmarks import bench_diloco
from benchmarks.jobs import lm
from lightning_commsgd import LocalSGDStrategy


def test_parse_steps_one_count_or_per_workload():
    assert bench_diloco.parse_steps(None) == bench_diloco.DEFAULT_STEPS
    assert bench_diloco.parse_steps(["300"]) == {"lm": 300, "digits": 300}
    assert bench_diloco.parse_steps(["lm=100"]) == {"lm": 100, "digits": bench_diloco.DEFAULT_STEPS["digits"]}
    assert bench_diloco.parse_steps(["digits=7"], ("digits",)) == {"digits": 7}
    for bad in (["x"], ["lm=0"], ["cnn=5"], ["lm=-3"]):
        with pytest.raises(ValueError, match="--steps"):
            bench_diloco.parse_steps(bad)


def test_link_rate_loopback_is_unlimited():
    assert bench_diloco.link_rate("loopback") is None
    assert bench_diloco.link_rate("100mbit") == "100mbit"


def test_time_and_bytes_to_ddps_final_smoothed_loss():
    # rows: [seconds, loss, bytes sent so far]
    ddp = [[1.0, 4.0, 10], [2.0, 2.0, 20], [3.0, 2.0, 30], [4.0, 1.0, 40]]
    assert bench_diloco.target_loss(ddp, 2) == 1.5  # mean of the last two
    assert bench_diloco.reach_target(ddp, 1.5, 2) == (4.0, 40, 4)
    other = [[0.5, 3.0, 1], [1.0, 1.0, 2], [1.5, 1.0, 3]]
    # trailing means 3, 2, 1: reached at the third step, with its time and bytes
    assert bench_diloco.reach_target(other, 1.5, 2) == (1.5, 3, 3)
    assert bench_diloco.reach_target(other, 2.0, 2) == (1.0, 2, 2)
    assert bench_diloco.reach_target(other, 0.5, 2) is None


def test_main_without_root_explains_and_exits_2(monkeypatch, capsys):
    def unavailable() -> None:
        raise bench_diloco.ClusterUnavailable("needs root")

    monkeypatch.setattr(bench_diloco, "check_available", unavailable)
    assert bench_diloco.main(["--configs", "ddp", "--no-plots"]) == 2
    assert "needs root" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_diloco.main(["--configs", "nope"])


def test_stdlib_files_are_sorted_filtered_and_cut_at_the_byte_budget(tmp_path):
    for name, size in (("b.py", 10), ("a.py", 10), ("pkg/c.py", 10), ("tests/t.py", 10), ("z.txt", 99)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    names = [p.relative_to(tmp_path).as_posix() for p in lm.stdlib_files(15, tmp_path)]
    assert names == ["a.py", "b.py"]  # sorted, up to the file that reaches 15 bytes
    assert [p.name for p in lm.stdlib_files(10**6, tmp_path)] == ["a.py", "b.py", "c.py"]  # no tests/
    with pytest.raises(ValueError):
        lm.stdlib_files(0, tmp_path)


def test_corpus_split_is_deterministic_and_disjoint_by_file():
    files = lm.stdlib_files(200_000)
    assert files == lm.stdlib_files(200_000)
    train, val = lm.load_corpus(200_000)
    assert (train, val) == lm._load_corpus.__wrapped__(200_000, None)  # same bytes when read afresh
    expected_val = b"".join(f.read_bytes() + b"\n" for i, f in enumerate(files) if i % 10 == 9)
    assert val == expected_val
    assert len(train) + len(val) == sum(f.stat().st_size + 1 for f in files)


def test_byte_windows_are_shifted_pairs_of_the_text():
    text = bytes(range(50))
    windows = lm.ByteWindows(text, context=8)
    assert len(windows) == 6  # (50 - 1) // 8
    assert windows[1].tolist() == list(range(8, 17))  # 9 bytes: input 8..15, target 9..16
    assert windows[1].dtype == torch.int64
    with pytest.raises(IndexError):
        windows[6]
    assert windows.evenly_spaced(3)[:, 0].tolist() == [0, 16, 32]
    assert windows.evenly_spaced(100).shape == (6, 9)


def test_lm_builds_and_takes_one_step():
    torch.manual_seed(0)
    model = lm.ByteTransformerLM(layers=2, d_model=32, heads=4, context=16, warmup=5)
    batch = torch.randint(0, 256, (4, 17))
    assert model(batch[:, :-1]).shape == (4, 16, 256)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(model.hparams.lr / 5)  # warm-up
    before = [p.detach().clone() for p in model.parameters()]
    loss = model.training_step(batch, 0)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.1)  # near uniform
    loss.backward()
    optimizer.step()
    scheduler.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # decay on matrices only, every parameter in exactly one group
    groups = optimizer.param_groups
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(p.dim() == 2 for p in groups[0]["params"]) and groups[1]["weight_decay"] == 0.0


def test_lm_fragments_are_whole_blocks():
    model = lm.ByteTransformerLM(layers=4, d_model=16, heads=2, context=8)
    assert model.fragment_prefixes(2) == [
        ["tok", "pos", "blocks.0", "blocks.2"],
        ["blocks.1", "blocks.3", "ln_f", "head"],
    ]
    with pytest.raises(ValueError):
        model.fragment_prefixes(5)


def test_every_configuration_builds_its_strategy():
    model = lm.ByteTransformerLM(layers=2, d_model=16, heads=2, context=8)
    assert isinstance(lm.build_strategy("ddp"), DDPStrategy)
    assert isinstance(lm.build_strategy("local_sgd"), LocalSGDStrategy)
    for h in (8, 32, 128):
        assert lm.build_strategy(f"diloco_{h}").algorithm_config.tau == h
    streaming = lm.build_strategy("streaming_diloco_int4", model).algorithm_config
    assert (streaming.tau, streaming.sync_delay, streaming.local_weight) == (32, 2, 0.5)
    assert streaming.fragments == model.fragment_prefixes(2)
    assert lm.build_strategy("streaming_diloco_int4").algorithm_config.fragments == 2  # digits: strided
    assert set(bench_diloco.DEFAULT_CONFIGS) <= set(lm.CONFIGS)
    plain = lm.build_strategy("diloco_32_plain").algorithm_config
    assert plain.tau == 32
    outer = plain.outer_optimizer([torch.zeros(1)])
    assert outer.defaults["lr"] == 1.0 and outer.defaults["momentum"] == 0
    slower = lm.build_strategy("diloco_32_lr0.3").algorithm_config.outer_optimizer([torch.zeros(1)])
    defaults = slower.defaults
    assert (defaults["lr"], defaults["momentum"], defaults["nesterov"]) == (0.3, 0.9, True)
    with pytest.raises(ValueError):
        lm.build_strategy("diloco_7")
