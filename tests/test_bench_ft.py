"""bench_ft's accounting, without a cluster: useful group-steps, goodput and the parser."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_ft


def _events(tmp_path, rows):
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return bench_ft.read_events(path)


def test_ft_counts_the_contributors_of_each_committed_round_once(tmp_path):
    rows = [
        {"t": 0.0, "group": 0, "kind": "joined", "step": 0, "healed": False, "groups": 3},
        {"t": 1.0, "group": 0, "kind": "round", "step": 4, "contributors": 3, "contributed": True},
        {"t": 1.0, "group": 1, "kind": "round", "step": 4, "contributors": 3, "contributed": True},
        {"t": 2.0, "group": 1, "kind": "round", "step": 8, "contributors": 2, "contributed": True},
        {"t": 2.5, "group": 2, "kind": "joined", "step": 8, "healed": True, "groups": 3},
        {"t": 3.0, "group": 0, "kind": "done", "step": 8, "accuracy": 0.9, "bytes_sent": 1},
    ]
    summary = bench_ft.summarize(_events(tmp_path, rows), groups=3, tau=4, mode="ft")
    assert summary["useful"] == 3 * 4 + 2 * 4 and summary["elapsed"] == 2.0 and summary["rounds"] == 2
    # 20 useful of the 3 x 2.0 / 0.25 = 24 group-steps the cluster could have run
    assert bench_ft.goodput(summary["useful"], 3, summary["elapsed"], 0.25) == pytest.approx(20 / 24)


def test_restart_counts_only_the_trajectory_that_survived(tmp_path):
    rows = [
        {"t": 0.0, "group": 0, "kind": "joined", "step": 0, "healed": False, "groups": 2},
        {"t": 1.0, "group": 0, "kind": "round", "step": 4, "contributors": 2, "contributed": True},
        {"t": 2.0, "group": 0, "kind": "round", "step": 8, "contributors": 2, "contributed": True},
        # a failure: the job restarted from step 4, and step 8 ran again
        {"t": 5.0, "group": 0, "kind": "joined", "step": 4, "healed": False, "groups": 2},
        {"t": 6.0, "group": 0, "kind": "round", "step": 8, "contributors": 2, "contributed": True},
        {"t": 7.0, "group": 0, "kind": "round", "step": 12, "contributors": 2, "contributed": True},
    ]
    summary = bench_ft.summarize(_events(tmp_path, rows), groups=2, tau=4, mode="restart")
    assert summary["useful"] == 2 * 12 and summary["elapsed"] == 7.0
    with pytest.raises(RuntimeError, match="no rounds"):
        bench_ft.summarize([], groups=2, tau=4, mode="ft")


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench_ft.main(["--groups", "1"])
