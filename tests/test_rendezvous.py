"""Issue 18: a rank that dies before the process group forms (a SLURM task that fails at import) left the
others waiting torch's rendezvous timeout, 30 minutes, saying nothing. Now the wait is bounded by the
strategy's ``rendezvous_timeout`` (default: the larger of ``sync_timeout`` and 300 s) and the error names the
missing rank."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT

from lightning_commsgd import LocalSGDStrategy

BOUND = 3.0

# One rank of a 2-rank job started by hand (LOCAL_RANK set: Lightning starts no other process), as a SLURM
# task or a torchrun worker is; the other rank never comes.
WORKER = f"""
import sys, time
import lightning as L, torch
from torch.utils.data import DataLoader, TensorDataset
from lightning_commsgd import LocalSGDStrategy

class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 1)
    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

strategy = LocalSGDStrategy(tau=2, rendezvous_timeout={BOUND})
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
data = TensorDataset(torch.randn(16, 2), torch.randn(16, 1))
print("FIT START", time.time(), flush=True)
trainer.fit(Net(), DataLoader(data, batch_size=4))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_alone(rank: int) -> tuple[subprocess.CompletedProcess, float]:
    env = {
        **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "LOCAL_RANK": str(rank),
        "NODE_RANK": "0", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
    }  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", WORKER], capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT
    )
    ended = time.time()
    started = re.search(r"FIT START ([\d.]+)", proc.stdout)
    assert started, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc, ended - float(started.group(1))


@pytest.mark.multiprocess
def test_rank_0_alone_names_the_rank_that_never_joined_within_the_bound():
    proc, elapsed = _run_alone(0)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert (
        f"RendezvousError: rank 0: the process group did not form within {BOUND:g} s: rank(s) [1] of 2 never "
        "joined the rendezvous at 127.0.0.1:"
    ) in output, output[-4000:]
    assert elapsed < BOUND + 10, f"rank 0 ended {elapsed:.1f} s after fit started (bound {BOUND} s)"


@pytest.mark.multiprocess
def test_a_rank_without_rank_0_names_the_store_host_within_the_bound():
    proc, elapsed = _run_alone(1)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert (
        f"RendezvousError: rank 1: the process group did not form within {BOUND:g} s: the rendezvous store "
        "at 127.0.0.1:"
    ) in output and "hosted by rank 0, never accepted a connection" in output, output[-4000:]
    assert elapsed < BOUND + 10, f"rank 1 ended {elapsed:.1f} s after fit started (bound {BOUND} s)"


def test_rendezvous_timeout_defaults_to_sync_timeout_but_at_least_five_minutes_and_is_checked():
    assert LocalSGDStrategy(sync_timeout=42).rendezvous_timeout == 300.0
    assert LocalSGDStrategy(sync_timeout=1200).rendezvous_timeout == 1200.0
    assert LocalSGDStrategy(sync_timeout=42, rendezvous_timeout=9).rendezvous_timeout == 9.0
    with pytest.raises(ValueError, match="Arg `rendezvous_timeout` must be a finite number of seconds > 0"):
        LocalSGDStrategy(rendezvous_timeout=0)
