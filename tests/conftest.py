"""Shared test setup: one thread per process (CPU results are then bitwise reproducible)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
DIGITS_DIR = REPO_ROOT / "examples" / "digits"
#: the configs' LightningCLI entry point: commsgd's CLI with the digits example's model and data importable
DIGITS_CLI = DIGITS_DIR / "cli.py"


_RENDEZVOUS_VARIABLES = (
    "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "GROUP_RANK",
)  # fmt: skip


def run_script(args: list[str], timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python *args`` with one thread per process; raise with the output tail when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # an in-process Trainer.fit earlier in the session leaves its rendezvous variables behind: a child that
    # inherited them would try to bind the same port (address already in use) or join the wrong world
    for name in _RENDEZVOUS_VARIABLES:
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd or REPO_ROOT,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture(autouse=True)
def _no_process_group_outlives_its_test():
    """An in-process ``Trainer.fit`` (world size 1) that fails in setup leaves torch's default process group,
    its bound store port and Lightning's rendezvous variables behind: the next single-process test would see
    a group, and the next subprocess would try to bind the same port. Destroy the group and restore the
    variables after every test."""
    saved = {name: os.environ.get(name) for name in _RENDEZVOUS_VARIABLES}
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def run_worker(tmp_path):
    """Run tests/lightning_worker.py with extra args; return each rank's record, in rank order."""

    def run(*extra: str, out: Path | None = None) -> list[dict]:
        out = out or tmp_path / "run"
        out.mkdir(parents=True, exist_ok=True)
        run_script([str(TESTS_DIR / "lightning_worker.py"), "--out", str(out), *extra])
        files = sorted(out.glob("rank*.pt"), key=lambda p: int(p.stem[4:]))
        return [torch.load(f, weights_only=False) for f in files]

    return run


@pytest.fixture
def digits_example(monkeypatch):
    """The digits example's ``model`` and ``data`` importable as the configs name them
    (``model.MLPClassifier``, ``data.DigitsDataModule``), as ``examples/digits/cli.py`` sees them, for a test
    that parses a config in-process. The one ``sys.path`` edit this needs stays within the test (monkeypatch
    undoes it), as do the top-level ``model``/``data`` modules: ``examples/cifar10`` has modules of the same
    names."""
    names = ("model", "data")
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(DIGITS_DIR))
    yield
    for name in names:  # the digits ones; monkeypatch then puts back what was there before
        sys.modules.pop(name, None)


@pytest.fixture
def lighthouse(monkeypatch):
    """A torchft Lighthouse in this process for the replica-group tests: at least 2 groups per quorum, a group
    silent for 1 s is dead, a quorum waits up to 20 s for live groups still joining. Yields its address."""
    from lightning_commsgd.ft import start_lighthouse

    monkeypatch.setenv("RUST_LOG", "warn")  # the Lighthouse logs every quorum at INFO
    server = start_lighthouse(min_groups=2, join_timeout_ms=20_000, heartbeat_timeout_ms=1000)
    yield server.address()
    server.shutdown()
