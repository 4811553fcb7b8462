"""Damaged checkpoints are refused with the file named, and a save killed midway leaves the previous
checkpoint intact (issue 9, item 3)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT, TESTS_DIR

from lightning_commsgd.checkpoint_io import AtomicCheckpointIO, DamagedCheckpointError, verify_checkpoint


def sample_checkpoint(version: int = 0, size: int = 4000) -> dict:
    generator = torch.Generator().manual_seed(version)
    return {
        "state_dict": {"w": torch.randn(size, generator=generator), "b": torch.arange(7) + version},
        "global_step": version,
        "lightning_commsgd": {"ranks": [{"algorithm": {"step": version, "rounds": version // 4}}]},
    }


def same(a: dict, b: dict) -> bool:
    return (
        torch.equal(a["state_dict"]["w"], b["state_dict"]["w"])
        and torch.equal(a["state_dict"]["b"], b["state_dict"]["b"])
        and a["global_step"] == b["global_step"]
        and a["lightning_commsgd"] == b["lightning_commsgd"]
    )


def test_a_whole_checkpoint_passes_and_loads(tmp_path):
    path = tmp_path / "step=8.ckpt"
    AtomicCheckpointIO().save_checkpoint(sample_checkpoint(8), path)
    verify_checkpoint(path)
    assert same(AtomicCheckpointIO().load_checkpoint(path, weights_only=False), sample_checkpoint(8))
    assert [p.name for p in tmp_path.iterdir()] == ["step=8.ckpt"]  # no temporary file left


def test_empty_and_truncated_checkpoints_are_refused_naming_the_file(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save(sample_checkpoint(), good)
    data = good.read_bytes()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"")
    with pytest.raises(DamagedCheckpointError, match=f"{bad}.*empty"):
        verify_checkpoint(bad)
    for keep in (1, 100, len(data) // 3, len(data) // 2, len(data) - 200, len(data) - 1):
        bad.write_bytes(data[:keep])
        with pytest.raises(DamagedCheckpointError, match=str(bad)):
            AtomicCheckpointIO().load_checkpoint(bad, weights_only=False)


def test_every_harmful_bit_flip_is_refused(tmp_path):
    """A flipped bit anywhere: either the file is refused, or it loads to exactly the saved content (a flip
    in zip padding or an unused header field). Without the CRC check, flips inside tensor bytes would load
    wrong numbers silently."""
    good = tmp_path / "good.ckpt"
    original = sample_checkpoint(3)
    torch.save(original, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.ckpt"
    rng = random.Random(0)
    refused = harmless = 0
    positions = rng.sample(range(len(data)), 150) + list(range(len(data) // 2, len(data) // 2 + 50))
    for position in positions:
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        bad.write_bytes(flipped)
        try:
            loaded = AtomicCheckpointIO().load_checkpoint(bad, weights_only=False)
        except DamagedCheckpointError as error:
            assert str(bad) in str(error)
            refused += 1
            continue
        assert same(loaded, original), f"a flip at byte {position} loaded different content"
        harmless += 1
    assert refused > 150  # most of the file is tensor bytes and headers that matter


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(sample_checkpoint(1), path)
    before = path.read_bytes()

    def save_half_then_fail(obj, stream, *args, **kwargs):
        stream.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint(sample_checkpoint(2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


SAVER = """
import io, sys, time, torch
sys.path.insert(0, {tests!r})  # stays: a -c program has its working directory first on its path, not tests/
from test_checkpoint_io import sample_checkpoint
from lightning_commsgd.checkpoint_io import AtomicCheckpointIO

real_save = torch.save


def slow_save(obj, stream, *args, **kwargs):  # a slow disk: 1 MB every 10 ms, so a kill lands mid-write
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    for i in range(0, len(data), 1 << 20):
        stream.write(data[i : i + (1 << 20)])
        stream.flush()
        time.sleep(0.01)


torch.save = slow_save
io_ = AtomicCheckpointIO()
version = 0
while True:
    version += 1
    checkpoint = sample_checkpoint(version, size=4_000_000)  # 16 MB
    print("saving", version, flush=True)
    io_.save_checkpoint(checkpoint, {path!r})
    print("saved", version, flush=True)
"""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path):
    """A process saves 16 MB checkpoints over the same file, 1 MB every 10 ms, and is SIGKILLed in the
    middle of a save (after one or more whole saves): the file is always the previous whole checkpoint,
    and the next save removes the dead process's temporary file."""
    path = tmp_path / "last.ckpt"
    script = SAVER.format(tests=str(TESTS_DIR), path=str(path))
    rng = random.Random(1)
    for trial in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
        )
        assert proc.stdout is not None
        whole_saves = 1 + trial
        last_saved = 0
        while True:
            word, version = proc.stdout.readline().split()
            if word == "saved":
                last_saved = int(version)
            elif last_saved >= whole_saves:
                break  # a save of version last_saved + 1 has begun: it takes at least 160 ms
        time.sleep(rng.uniform(0.02, 0.12))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert any(p.name.startswith(".last.ckpt.tmp-") for p in tmp_path.iterdir())  # killed mid-write
        verify_checkpoint(path)
        loaded = torch.load(path, weights_only=False)
        assert loaded["global_step"] == last_saved  # the previous checkpoint, whole
        assert same(loaded, sample_checkpoint(last_saved, size=4_000_000)), trial
    AtomicCheckpointIO().save_checkpoint(sample_checkpoint(0), path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "damage",
    [
        pytest.param("truncated", marks=pytest.mark.lightning_smoke),
        pytest.param("empty", marks=pytest.mark.fault_matrix),
        pytest.param("flipped", marks=pytest.mark.fault_matrix),
    ],
)
def test_every_rank_refuses_a_damaged_checkpoint_before_any_collective(tmp_path, damage):
    good = tmp_path / "good.ckpt"
    torch.save(sample_checkpoint(5), good)
    data = bytearray(good.read_bytes())
    path = tmp_path / f"{damage}.ckpt"
    if damage == "empty":
        data = bytearray()
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10  # inside the tensor bytes
    path.write_bytes(bytes(data))
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, str(TESTS_DIR / "fault_worker.py"), "--out", str(out), "--resume", str(path)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # every rank refuses it (3 tracebacks), before its process group exists: no rank ever waited for
    # another, none was ended by the watchdog. (The ranks share stderr, and a traceback is written in
    # pieces: under load one rank's lines can split another's "module.Error: message" line, so the count
    # is of the message's own tail.)
    refusal = f"DamagedCheckpointError: Checkpoint '{path}'"
    assert output.count(refusal) == 3, output[-3000:]
    assert "Initializing distributed" not in output
    assert "collective #" not in output and "RankFailureError" not in output
