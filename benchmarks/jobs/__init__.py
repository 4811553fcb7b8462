"""The benchmarks' jobs: each module trains one workload and writes its results as JSON, run as
``python -m benchmarks.jobs.<job> ... --json FILE`` in a fresh interpreter (see :mod:`benchmarks.runner`).
Lightning's launcher re-runs that same ``-m`` command for every extra local rank.

- :mod:`benchmarks.jobs.digits`: the digits MLP under every strategy, each option a flag; step and
  validation traces;
- :mod:`benchmarks.jobs.synthetic_cnn`: the same options with a small CNN on synthetic images;
- :mod:`benchmarks.jobs.cluster_worker`: one emulated node of ``bench_cluster``;
- :mod:`benchmarks.jobs.overhead`: one timed fit of ``bench_overhead``.
"""

from typing import Any

__all__ = ["BARE_TRAINER"]

# Trainer options of a measured run: nothing but the training steps (no logger, checkpoint, progress bar,
# summary or validation) so that timings measure the strategy, not Lightning's extras.
BARE_TRAINER: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "limit_val_batches": 0,
    "num_sanity_val_steps": 0,
}
