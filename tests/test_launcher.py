"""The popen launcher's child observer in report-only mode (parameter-server strategies): a dead child is
reported once, also when it died after the observer's last poll."""

from __future__ import annotations

import pytest

from lightning_commsgd.strategies.launcher import _ChildObserver

pytestmark = pytest.mark.lightning_smoke


class _FakeChild:
    def __init__(self, code: int | None) -> None:
        self.code = code

    def poll(self) -> int | None:
        return self.code


def test_the_last_look_reports_a_child_the_polling_thread_never_saw(capsys):
    children = [_FakeChild(None), _FakeChild(None)]
    observer = _ChildObserver(children, 1, lambda: None, grace=0.0, end_job=False, poll=3600.0)
    observer.report_failed_children()
    assert capsys.readouterr().err == ""  # both still running
    children[1].code = -9  # rank 2 dies; the thread (never started here) does not poll again
    children[0].code = 0  # rank 1 ends normally: not reported
    observer.report_failed_children()
    observer.report_failed_children()  # the atexit look after the thread's report: no second line
    assert capsys.readouterr().err == "[lightning_commsgd] rank 2's process ended with -9.\n"
