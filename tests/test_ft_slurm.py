"""The SLURM template of the fault-tolerance example (``examples/fault_tolerance/slurm.sbatch``), run on this
machine with stand-ins for ``srun`` (runs the command with the ``--export`` variables) and ``scontrol`` (three
nodes, all this machine): it starts a Lighthouse, one group per node, and starts a failed group again, which
heals and finishes on the same model as the others."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE.parent / "examples" / "fault_tolerance" / "slurm.sbatch"

pytestmark = pytest.mark.timeout(300)

FAKE_SRUN = r"""#!/bin/bash
# srun on one machine: the options are dropped, --export=ALL,K=V,... exported, then the command runs
while [[ $# -gt 0 && $1 == --* ]]; do
    if [[ $1 == --export=* ]]; then
        IFS=',' read -ra pairs <<< "${1#--export=}"
        for pair in "${pairs[@]}"; do [[ $pair == ALL ]] || export "$pair"; done
    fi
    shift
done
exec "$@"
"""

FAKE_SCONTROL = """#!/bin/bash
# scontrol show hostnames: the job's nodes, all this machine
for _ in $(seq "$SLURM_JOB_NUM_NODES"); do echo 127.0.0.1; done
"""


def _stand_ins(folder: Path) -> Path:
    folder.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = folder / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return folder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_slurm_template_starts_the_groups_and_restarts_a_failed_one_which_heals(tmp_path):
    bin_dir = _stand_ins(tmp_path / "bin")
    out = tmp_path / "g{group}.pt"
    # group 2 kills itself once, at step 10 (its marker file says so), and the template starts it again
    train = (
        f"{sys.executable} {HERE / 'ft_lightning_worker.py'} --start-groups 3 --min-groups 2 --tau 4 "
        f"--steps 40 --step-sleep 0.2 --out {out} --die-group 2 --die-at-step 10 "
        f"--die-once {tmp_path / 'died'}"
    )
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        SLURM_JOB_NODELIST="node[0-2]",
        SLURM_JOB_NUM_NODES="3",
        LIGHTHOUSE_PORT=str(_free_port()),
        TRAIN_CMD=train,
        OMP_NUM_THREADS="1",
        RUST_LOG="error",
        TORCHFT_USE_OTEL="false",
    )
    env.pop("MASTER_PORT", None)
    result = subprocess.run(
        ["bash", str(TEMPLATE)], env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=240
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "3 replica groups, at least 2 per round" in output
    # only the group whose marker file was free died; it was started again (not the others)
    assert "replica group 2 failed; restart 1 of 3" in output, output[-4000:]
    assert "replica group 0 failed" not in output and "replica group 1 failed" not in output
    records = {g: torch.load(str(out).format(group=g), weights_only=False) for g in range(3)}
    assert records[2]["joined"]["healed"] and not records[0]["joined"]["healed"]
    for g in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(records[0]["final"], records[g]["final"]))
        assert records[g]["global_step"] == 40


def test_the_slurm_template_refuses_more_groups_than_nodes(tmp_path):
    bin_dir = _stand_ins(tmp_path / "bin")
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_NODELIST="node[0-1]",
        SLURM_JOB_NUM_NODES="2",
        REPLICA_GROUPS="3",
    )
    result = subprocess.run(["bash", str(TEMPLATE)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "3 replica groups need as many nodes, the job has 2" in result.stderr
