"""Rounds in flight: means over ranks that run while the training loop goes on, finished by ``wait()``.

Its one job: the handles that :meth:`~lightning_commsgd.comm.communicator.Communicator.all_reduce_mean_async`
(a collective started without waiting) and
:meth:`~lightning_commsgd.comm.communicator.Communicator.all_reduce_mean_lowp_async` (the low-precision
messages, sent by a helper thread over the communicator's background duplicate) return, and the ledger
record each makes when it is waited for.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_commsgd.comm.lowp import lowp_mean_
from lightning_commsgd.payload import PayloadCodec

if TYPE_CHECKING:
    from lightning_commsgd.comm.communicator import Communicator

__all__ = ["PendingLowpMean", "PendingMean"]


class _PendingRound:
    """A round in flight: :meth:`wait` blocks until it has arrived (at once when it already has), records
    it in the ledger with the seconds spent *waiting*, and returns the buffer, which holds the mean."""

    def __init__(self, communicator: Communicator, buffer: Tensor, tag: str) -> None:
        self.communicator, self.buffer, self.tag = communicator, buffer, tag
        self.done = not communicator.is_distributed

    def _complete(self) -> tuple[int, int, str]:
        """Block until the collectives are done and the buffer holds the mean; (bytes sent, collectives,
        ledger kind)."""
        raise NotImplementedError

    def wait(self) -> Tensor:
        """Block until the mean has arrived (at once when it already has); returns the buffer."""
        if self.done:
            return self.buffer
        start = time.perf_counter()
        self.done = True
        with self.communicator._collective(self.tag):
            nbytes, collectives, kind = self._complete()
        seconds = self.communicator._finish(self.buffer, start)
        self.communicator.ledger.record(
            self.tag, sent=nbytes, received=nbytes, seconds=seconds, collectives=collectives, kind=kind
        )
        return self.buffer


class PendingMean(_PendingRound):
    """A mean over ranks in flight (see :meth:`Communicator.all_reduce_mean_async`)."""

    def __init__(self, communicator: Communicator, buffer: Tensor, tag: str) -> None:
        super().__init__(communicator, buffer, tag)
        self._work: Any = None if self.done else communicator._all_reduce_sum_async(buffer)

    def _complete(self) -> tuple[int, int, str]:
        assert self._work is not None
        self._work.wait()
        self.buffer.div_(self.communicator.world_size)
        return self.buffer.numel() * self.buffer.element_size(), 1, "all_reduce"


class PendingLowpMean(_PendingRound):
    """A low-precision (16- or 8-bit) mean over ranks in flight on a helper thread (see
    :meth:`Communicator.all_reduce_mean_lowp_async`), its messages sent over the communicator's background
    duplicate (same ranks, own group). A failure on the thread is raised by :meth:`wait`."""

    def __init__(
        self,
        communicator: Communicator,
        buffer: Tensor,
        codec: PayloadCodec,
        tag: str,
        seed: int,
        nonnegative: int = 0,
    ) -> None:
        super().__init__(communicator, buffer, tag)
        self._nbytes = self._collectives = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if not self.done:
            self._thread = threading.Thread(
                target=self._run, args=(codec, seed, nonnegative), name=f"commsgd-{tag}", daemon=True
            )
            self._thread.start()

    def _run(self, codec: PayloadCodec, seed: int, nonnegative: int) -> None:
        try:
            owner = self.communicator
            transport = owner._background
            assert transport is not None, "all_reduce_mean_lowp_async creates the background communicator"
            self._nbytes, self._collectives = lowp_mean_(
                transport, self.buffer, codec, seed, nonnegative, segment_bytes=owner.SEGMENT_BYTES
            )
        except BaseException as error:  # re-raised on the training thread by wait()
            self._error = error

    def _complete(self) -> tuple[int, int, str]:
        assert self._thread is not None
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(
                f"The background average (tag {self.tag!r}) failed: {self._error}"
            ) from self._error
        return self._nbytes, self._collectives, ""
