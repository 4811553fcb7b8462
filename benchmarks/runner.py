"""Run a benchmark job (a module of :mod:`benchmarks.jobs`) in a fresh subprocess; collect its JSON results.

Every ``benchmarks/bench_*.py`` measures its runs this way: ``python -m benchmarks.jobs.digits ... --json
FILE`` (or ``benchmarks.jobs.synthetic_cnn``, which takes the same options) in a new interpreter, which then
launches its own ranks (Lightning re-runs ``python -m benchmarks.jobs.<job>`` for every extra rank). No
process group, thread pool or allocator state leaks from one measured run into the next.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CNN_JOB",
    "DIGITS_JOB",
    "REPO_ROOT",
    "JobError",
    "add_training_args",
    "run_digits",
    "run_job",
    "run_synthetic_cnn",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
#: the digits MLP job (every strategy option as a flag, traces, JSON results)
DIGITS_JOB = "benchmarks.jobs.digits"
#: the same options and results with a small CNN on synthetic 32x32x3 images
CNN_JOB = "benchmarks.jobs.synthetic_cnn"


class JobError(RuntimeError):
    """A job exited non-zero, timed out, or wrote no results."""


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of the run: the repository root on ``PYTHONPATH``, so that ``python -m benchmarks...``
    resolves from any working directory, installed or not."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # One OpenMP thread per rank, matching torch.set_num_threads(1) in the jobs, so the ranks do
    # not fight over the cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run_digits(
    args: Sequence[str],
    *,
    timeout_s: float = 600.0,
    workdir: Path | None = None,
    stderr_tail_lines: int = 40,
) -> dict[str, Any]:
    """Run the digits job with ``args`` (``--json`` is added) and return the JSON its rank 0 wrote; see
    :func:`run_job`."""
    return run_job(
        DIGITS_JOB, args, timeout_s=timeout_s, workdir=workdir, stderr_tail_lines=stderr_tail_lines
    )


def run_synthetic_cnn(
    args: Sequence[str],
    *,
    timeout_s: float = 600.0,
    workdir: Path | None = None,
    stderr_tail_lines: int = 40,
) -> dict[str, Any]:
    """Run the synthetic CNN job (the small CNN on synthetic 32x32x3 images, same options and results as
    the digits job) with ``args``; see :func:`run_job`."""
    return run_job(CNN_JOB, args, timeout_s=timeout_s, workdir=workdir, stderr_tail_lines=stderr_tail_lines)


def run_job(
    job: str,
    args: Sequence[str],
    *,
    timeout_s: float = 600.0,
    workdir: Path | None = None,
    stderr_tail_lines: int = 40,
    env: Mapping[str, str] | None = None,
) -> Any:
    """Run ``python -m job *args --json FILE`` and return the JSON the job wrote (its rank 0).

    Args:
        job: the job's module, e.g. :data:`DIGITS_JOB` or :data:`CNN_JOB`; it must take ``--json``.
        args: command-line arguments for the job, e.g. ``["--strategy", "ddp", "--epochs", "3"]``.
        timeout_s: seconds before the whole run (every rank) is killed.
        workdir: directory for the JSON file and the run's working directory; a temporary directory
            (deleted afterwards) when ``None``.
        stderr_tail_lines: how many trailing lines of the run's stderr a failure message includes.
        env: environment variables set for the run on top of the inherited ones.

    Raises:
        JobError: non-zero exit status, timeout, or no results file; the message holds the command
            and the tail of stderr.
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="commsgd_run_") as tmp:
            return run_job(
                job,
                args,
                timeout_s=timeout_s,
                workdir=Path(tmp),
                stderr_tail_lines=stderr_tail_lines,
                env=env,
            )

    workdir.mkdir(parents=True, exist_ok=True)
    # A fresh name per run: rank 0 creates the file, so its existence afterwards proves the run got
    # that far, even when several runs share one workdir.
    json_path = workdir / f"result_{uuid.uuid4().hex}.json"
    cmd = [sys.executable, "-m", job, *args, "--json", str(json_path)]
    printable = " ".join(cmd)

    # A new session makes the run's ranks one process group: on timeout we kill all of them, not just
    # rank 0, whose orphaned peers would otherwise sit in a collective until gloo's own timeout.
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=_child_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        raise JobError(
            f"timed out after {timeout_s:.0f} s: {printable}\n--- stderr (tail) ---\n"
            f"{_tail(stderr, stderr_tail_lines)}"
        ) from None
    if proc.returncode != 0:
        raise JobError(
            f"exit status {proc.returncode}: {printable}\n--- stderr (tail) ---\n"
            f"{_tail(stderr, stderr_tail_lines)}"
        )
    if not json_path.exists():
        raise JobError(
            f"no results written to {json_path}: {printable}\n--- stderr (tail) ---\n"
            f"{_tail(stderr, stderr_tail_lines)}"
        )
    return json.loads(json_path.read_text())


def add_training_args(parser: argparse.ArgumentParser, *, devices: int, max_steps: int) -> None:
    """The options every benchmark passes on to the digits job (model, data, budget, repeats)."""
    parser.add_argument("--devices", type=int, default=devices, help="CPU processes per run")
    parser.add_argument("--hidden", type=int, default=512, help="width of the hidden layers")
    parser.add_argument("--depth", type=int, default=3, help="number of hidden layers")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size per process")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (constant)")
    parser.add_argument("--max-steps", type=int, default=max_steps, help="optimizer steps per run")
    parser.add_argument(
        "--repeat-data",
        type=int,
        default=16,
        help="repeat the training set per epoch (the job's --repeat), so the step budget binds",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (medians reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed shared by all runs")
