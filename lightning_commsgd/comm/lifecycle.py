"""The process group's lifecycle at the end of a run: an ordered shutdown, and destruction at exit.

Its one job: release the default process group when a run ends (normally or not) without a rank
leaving while a peer still talks to it, and without gloo's threads aborting the interpreter's exit.
"""

from __future__ import annotations

import atexit
import warnings

import torch.distributed as dist

__all__ = ["destroy_process_group_at_exit", "shutdown_process_group", "skip_group_destruction_at_exit"]


def shutdown_process_group() -> None:
    """End a run's process group in order: every rank waits for the others (one uncounted barrier), then
    destroys the group. Scripts that keep collectives running after ``fit`` (gathering results,
    ``validate``) call it last, so that no rank exits while a peer still talks to it."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


_exit_handler_registered = False
_leave_group_at_exit = True


def destroy_process_group_at_exit() -> None:
    """Destroy the process group when the interpreter exits after a run that ended normally.

    Gloo's worker threads keep references to finished work; left to interpreter finalization, their
    destruction can abort the process with SIGABRT ("terminate called without an active exception",
    pytorch/pytorch#190489) after a run that succeeded. Lightning registers this only for NCCL. Idempotent;
    a run that failed skips it (:func:`skip_group_destruction_at_exit`): a peer may still hold the group in
    a collective, and the failure watchdog, not a destructor that waits, ends such a process."""
    global _exit_handler_registered
    if not _exit_handler_registered:
        atexit.register(_destroy_at_exit)
        _exit_handler_registered = True


def skip_group_destruction_at_exit() -> None:
    """This process failed: leave the process group to the operating system at exit."""
    global _leave_group_at_exit
    _leave_group_at_exit = False


def _destroy_at_exit() -> None:
    if _leave_group_at_exit and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as error:  # exiting anyway: say why the group could not be released
            warnings.warn(f"The process group could not be destroyed at exit: {error}", stacklevel=1)
