"""The parameter server at work: threads and messages around :class:`ParameterServer`'s decisions.

Processes: one server rank and P workers (the server rank may also be a worker: it then runs the server
in a background thread beside its training loop, and its own pushes and pulls are in-process and cost no
bytes). Two process groups over all ranks, created at setup, keep the directions apart: the *uplink*
carries pushes (worker -> server), the *downlink* models (server -> worker). Both have a long timeout
because their receivers wait for the next message by design; the deadline that matters is ``timeout``:
a worker that waits longer than that for its model, or a server that sees no event for that long, fails.

Messages, each counted by the :class:`~lightning_commsgd.comm.Communicator` under the tag ``"ps"``:

- push: a header (4 int64: kind, model version, sequence, 0) and the flat fp32 gradient;
- leave: a header only (the worker has stopped: the server may drop it);
- model: a header (kind, version, stop flag, 0) and the flat fp32 model.

On the server rank one receiver thread per remote worker turns its messages into events on one queue;
the server thread applies them in arrival order, so the order of ``events`` is the order of the updates,
and a replay of ``events`` on a fresh :class:`ParameterServer` repeats them. A worker whose process dies
shows up as a failed receive ("Connection closed by peer") and becomes a ``lose`` event. On a worker a
receiver thread puts every model it gets into a mailbox, which the training thread reads.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_commsgd.algorithms.parameter_server import (
    ParameterServer,
    ParameterServerError,
    ServerReply,
    clone_optimizer,
    clone_scheduler,
)
from lightning_commsgd.comm import Communicator

__all__ = ["Link", "ParameterServerError", "ServerLostError", "ServerRuntime", "WorkerClient", "connect"]

TAG = "ps"
PUSH, LEAVE, MODEL = 1, 2, 3
HEADER = 4  # int64 values
LONG_TIMEOUT = 7 * 24 * 3600.0  # the receivers' groups: waiting for the next message is their job


class ServerLostError(ParameterServerError):
    """A worker lost its parameter server (the server rank's process is gone)."""


@dataclass(frozen=True)
class Event:
    """One thing that happened at the server: ``kind`` is ``"push"``, ``"leave"`` or ``"lose"``."""

    kind: str
    worker: int
    version: int = 0
    grad: Tensor | None = None
    reason: str = ""


@dataclass(frozen=True)
class ModelMessage:
    """A model the server sent: its version, the stop flag and the flat values (``None``: the server
    failed, ``error`` says why)."""

    version: int
    stop: bool
    model: Tensor | None
    error: BaseException | None = None


class Groups:
    """The two communicators of a parameter-server job, each over its own process group of all ranks
    (:meth:`Communicator.duplicate`, sharing ``comm``'s ledger; collective to create: every rank, same order).
    Gloo groups whatever the job's backend: messages are CPU tensors (a GPU worker copies its gradient
    to the host once per push), and NCCL has no receive that waits for the next message indefinitely."""

    def __init__(self, comm: Communicator) -> None:
        self.up = comm.duplicate(timeout=LONG_TIMEOUT, backend="gloo")
        self.down = comm.duplicate(timeout=LONG_TIMEOUT, backend="gloo")


class ServerRuntime:
    """Runs ``server`` on this rank.

    Args:
        server: the server's decisions, model and optimizer.
        comm: the communicator whose ledger counts the messages.
        groups: the uplink and downlink groups (``None`` for a single process).
        server_rank: this rank's global rank.
        remote_workers: global ranks of the workers in other processes.
        timeout: seconds without any event after which the server fails (``sync_timeout``).
        on_update: called with each update's reply under the server lock (e.g. to log).
    """

    def __init__(
        self,
        server: ParameterServer,
        comm: Communicator,
        groups: Groups | None,
        server_rank: int,
        remote_workers: list[int],
        *,
        timeout: float = 600.0,
        on_update: Callable[[ServerReply], None] | None = None,
    ) -> None:
        self.server, self.comm, self.groups = server, comm, groups
        self.server_rank, self.remote_workers, self.timeout = server_rank, remote_workers, timeout
        self.on_update = on_update
        self.lock = threading.Lock()  # held while the server's state changes (snapshots take it too)
        self.events: list[Event] = []  # applied, in order (gradients dropped from the record: see replay)
        self.failure: BaseException | None = None
        # the server thread's time handling events (applying gradients, sending models), not waiting for
        # them: what a co-located server takes from rank 0's training
        self.busy_seconds = 0.0
        self._queue: queue.Queue[Event] = queue.Queue()
        self._local: dict[int, queue.Queue[ModelMessage]] = {}
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._progress = threading.Condition()  # notified after every event (see wait_for_version)

    # -- local workers (same process) -----------------------------------------------------------------------
    def local_link(self, worker: int) -> Link:
        """The link of a worker that lives in this process: pushes go straight onto the event queue."""
        mailbox: queue.Queue[ModelMessage] = queue.Queue()
        self._local[worker] = mailbox
        return Link(worker, mailbox, push=self._push_local, leave=self._leave_local)

    def _push_local(self, worker: int, version: int, grad: Tensor) -> None:
        self._queue.put(Event("push", worker, version, grad.detach().clone()))

    def _leave_local(self, worker: int) -> None:
        self._queue.put(Event("leave", worker))

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the receiver threads and the server thread."""
        for worker in self.remote_workers:
            threading.Thread(
                target=self._receive, args=(worker,), daemon=True, name=f"ps-recv-{worker}"
            ).start()
        self._thread = threading.Thread(target=self._serve_safely, daemon=True, name="ps-server")
        self._thread.start()

    def run(self) -> None:
        """Start the receivers and serve in this thread until every worker has stopped; raises the
        server's failure."""
        for worker in self.remote_workers:
            threading.Thread(
                target=self._receive, args=(worker,), daemon=True, name=f"ps-recv-{worker}"
            ).start()
        self._serve_safely()
        if self.failure is not None:
            raise self.failure

    def join(self, timeout: float | None = None) -> None:
        """Wait for the server thread to finish; raises the server's failure."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self.failure is not None:
            raise self.failure

    @property
    def done(self) -> bool:
        """The server has finished (every worker stopped) or failed."""
        return self._done.is_set()

    def wait_for_version(self, after: int, timeout: float) -> int:
        """Block until the server's version exceeds ``after`` or the server is done (or ``timeout``
        seconds pass); returns the version."""
        with self._progress:
            self._progress.wait_for(lambda: self.server.version > after or self.done, timeout=timeout)
        return self.server.version

    # -- the server thread --------------------------------------------------------------------------------
    def _serve_safely(self) -> None:
        try:
            self._serve()
        except BaseException as error:  # noqa: BLE001  # handed to the training thread, which raises it
            self.failure = (
                error
                if isinstance(error, ParameterServerError)
                else ParameterServerError(f"the parameter server failed: {type(error).__name__}: {error}")
            )
            if not isinstance(error, ParameterServerError):
                self.failure.__cause__ = error
            for mailbox in self._local.values():
                mailbox.put(ModelMessage(self.server.version, True, None, self.failure))
        finally:
            self._done.set()
            with self._progress:
                self._progress.notify_all()

    def _serve(self) -> None:
        # until every worker has said its last word (leave) or is gone: pushes that crossed a stop message
        # are then still applied (ignored) and recorded, in order
        gone: set[int] = set()
        while not (self.server.finished and gone >= set(self.server.workers)):
            try:
                event = self._queue.get(timeout=self.timeout)
            except queue.Empty:
                raise ParameterServerError(
                    f"no worker pushed a gradient for {self.timeout:g} s (sync_timeout) at update "
                    f"{self.server.version}; workers still expected: {sorted(self.server.active)}"
                ) from None
            if event.kind != "push":
                gone.add(event.worker)
            busy_from = time.perf_counter()
            with self.lock:
                was_active = event.worker in self.server.active
                if event.kind == "push":
                    reply = self.server.offer(event.worker, event.version, event.grad)
                elif event.kind == "leave":
                    reply = self.server.leave(event.worker)
                else:
                    if was_active:
                        print(
                            f"[lightning_commsgd] parameter server: lost worker {event.worker} at update "
                            f"{self.server.version} ({event.reason}); workers left: "
                            f"{sorted(self.server.active - {event.worker})}",
                            file=sys.stderr,
                            flush=True,
                        )
                    reply = self.server.lose(event.worker, event.reason)
                self.events.append(Event(event.kind, event.worker, event.version, None, event.reason))
                if reply.updated and self.on_update is not None:
                    self.on_update(reply)
                model = self.server.flat_model() if reply.send_to or event.kind == "leave" else None
            targets = list(reply.send_to)
            if event.kind == "leave" and was_active and event.worker not in targets:
                # the leaver's receiver waits for one last message: tell it to stop
                self._deliver([event.worker], ModelMessage(reply.version, True, model))
            self._deliver(targets, ModelMessage(reply.version, reply.stop, model))
            self.busy_seconds += time.perf_counter() - busy_from
            if reply.updated:
                with self._progress:
                    self._progress.notify_all()

    def _deliver(self, workers: list[int], message: ModelMessage) -> None:
        works = []
        wire = message.model.cpu() if message.model is not None else None
        for worker in workers:
            if worker in self._local:
                assert message.model is not None
                self._local[worker].put(ModelMessage(message.version, message.stop, message.model.clone()))
                continue
            header = torch.tensor([MODEL, message.version, int(message.stop), 0], dtype=torch.int64)
            try:
                works.append(
                    (worker, self.groups.down.isend(header, worker, tag=TAG, msg_tag=0))
                )
                works.append(
                    (
                        worker,
                        self.groups.down.isend(wire, worker, tag=TAG, msg_tag=1),
                    )
                )
            except RuntimeError as error:
                self._queue.put(Event("lose", worker, reason=_first_line(error)))
        for worker, work in works:
            try:
                work.wait()
            except RuntimeError as error:
                self._queue.put(Event("lose", worker, reason=_first_line(error)))

    # -- receiver threads -----------------------------------------------------------------------------------
    def _receive(self, worker: int) -> None:
        header = torch.empty(HEADER, dtype=torch.int64)
        while True:
            try:
                self.groups.up.recv_(header, worker, tag=TAG, msg_tag=0, timed=False)
                kind, version = int(header[0]), int(header[1])
                if kind == LEAVE:
                    self._queue.put(Event("leave", worker))
                    return
                grad = torch.empty(self.server.numel, dtype=torch.float32)
                self.groups.up.recv_(grad, worker, tag=TAG, msg_tag=1)
                self._queue.put(Event("push", worker, version, grad))
            except RuntimeError as error:
                if not self._done.is_set():
                    self._queue.put(Event("lose", worker, reason=_first_line(error)))
                return

    # -- checkpoint ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A consistent snapshot of the server (taken between two events)."""
        with self.lock:
            return self.server.state_dict()


class Link:
    """A worker's connection to the server: push a gradient, leave, and a mailbox of models."""

    def __init__(
        self,
        worker: int,
        mailbox: queue.Queue[ModelMessage],
        *,
        push: Callable[[int, int, Tensor], None],
        leave: Callable[[int], None],
    ) -> None:
        self.worker, self.mailbox, self._push, self._leave = worker, mailbox, push, leave

    @classmethod
    def remote(cls, comm: Communicator, groups: Groups, worker: int, server_rank: int, numel: int) -> Link:
        """The link of a worker in another process than the server: a receiver thread fills the mailbox."""
        mailbox: queue.Queue[ModelMessage] = queue.Queue()

        def lost(error: RuntimeError) -> ServerLostError:
            why = _first_line(error)
            return ServerLostError(f"worker {worker} lost the parameter server (rank {server_rank}): {why}")

        def push(worker: int, version: int, grad: Tensor) -> None:
            header = torch.tensor([PUSH, version, 0, 0], dtype=torch.int64)
            payload = grad.detach().float().cpu().contiguous()
            try:
                groups.up.send(header, server_rank, tag=TAG, msg_tag=0)
                groups.up.send(payload, server_rank, tag=TAG, msg_tag=1)
            except RuntimeError as error:  # the server's process is gone (connection closed or reset)
                raise lost(error) from error

        def leave(worker: int) -> None:
            header = torch.tensor([LEAVE, 0, 0, 0], dtype=torch.int64)
            try:
                groups.up.send(header, server_rank, tag=TAG, msg_tag=0)
            except RuntimeError as error:
                raise lost(error) from error

        def receive() -> None:
            header = torch.empty(HEADER, dtype=torch.int64)
            while True:
                try:
                    groups.down.recv_(header, server_rank, tag=TAG, msg_tag=0, timed=False)
                    model = torch.empty(numel, dtype=torch.float32)
                    groups.down.recv_(model, server_rank, tag=TAG, msg_tag=1)
                except RuntimeError as error:
                    mailbox.put(ModelMessage(-1, True, None, lost(error)))
                    return
                stop = bool(header[2])
                mailbox.put(ModelMessage(int(header[1]), stop, model))
                if stop:
                    return

        threading.Thread(target=receive, daemon=True, name=f"ps-model-{worker}").start()
        return cls(worker, mailbox, push=push, leave=leave)


class WorkerClient:
    """A worker's side of the protocol, for its training loop.

    Args:
        link: the connection to the server.
        mode: the server's mode (``"sync"`` workers drop a gradient whose model was replaced meanwhile).
        timeout: seconds a worker waits for its model before it fails (``sync_timeout``).
    """

    def __init__(self, link: Link, mode: str, timeout: float = 600.0) -> None:
        self.link, self.mode, self.timeout = link, mode, timeout
        self.version = 0
        self.stopped = False
        self.pushes = 0
        self.cancelled = 0  # K-sync gradients not sent because a newer model arrived first
        self.left = False

    def _take(self, message: ModelMessage, load: Callable[[Tensor], None]) -> None:
        if message.error is not None:
            self.stopped = True
            raise message.error
        assert message.model is not None
        if message.version >= self.version:
            load(message.model)
            self.version = message.version
        self.stopped = self.stopped or message.stop

    def newer_model(self, load: Callable[[Tensor], None], wait: float = 0.0) -> bool:
        """Take every model that has arrived (waiting up to ``wait`` seconds for the first); True when one
        did (or the server said stop): a K-sync worker then drops the gradient it is computing."""
        got = False
        try:
            message = self.link.mailbox.get(timeout=wait) if wait > 0 else self.link.mailbox.get_nowait()
            while True:
                self._take(message, load)
                got = True
                message = self.link.mailbox.get_nowait()
        except queue.Empty:
            return got

    def step(self, grad: Tensor, load: Callable[[Tensor], None], delay: float = 0.0) -> bool:
        """One worker iteration after its gradient ``grad`` (flat fp32, of model ``self.version``) is
        computed: an emulated straggler ``delay`` (seconds; a K-sync worker stops waiting when a newer model
        arrives), then push it and wait for the model to continue from, which ``load`` copies in. Returns
        whether the gradient was pushed (False: cancelled, K-sync)."""
        if self.stopped:
            return False
        if self.mode == "sync":
            if self.newer_model(load, wait=delay):  # the first k were faster: this computation is cancelled
                self.cancelled += 1
                return False
        elif delay > 0:
            time.sleep(delay)
        self.link._push(self.link.worker, self.version, grad)
        self.pushes += 1
        try:
            message = self.link.mailbox.get(timeout=self.timeout)
        except queue.Empty:
            raise ParameterServerError(
                f"worker {self.link.worker} waited {self.timeout:g} s (sync_timeout) for its model after "
                f"pushing a gradient of version {self.version}"
            ) from None
        self._take(message, load)
        self.newer_model(load)  # K-sync: later broadcasts may already be here
        return True

    def leave(self) -> None:
        """Tell the server this worker stops (always the last message it sends)."""
        if not self.left:
            self.left = True
            self.link._leave(self.link.worker)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    # gloo appends advice to its "Connection closed by peer [addr]" message: the address says enough
    return text[0].split(". This is typically")[0][:300] if text else type(error).__name__


def connect(
    comm: Communicator,
    params: list[Tensor],
    optimizer: Any,
    *,
    k: int,
    mode: str,
    server_rank: int = 0,
    server_trains: bool = True,
    staleness_lr: Any = None,
    max_updates: int | None = None,
    schedulers: tuple[Any, ...] = (),
    timeout: float = 600.0,
    start: bool = True,
) -> tuple[ServerRuntime | None, WorkerClient | None]:
    """Set up a parameter-server job from a plain PyTorch loop. Collective: every rank calls it at the
    same point, with its model's ``params`` (the optimizer's parameters, group after group) equal on
    every rank (the server starts from them).

    Returns ``(runtime, client)``: ``runtime`` on the server rank (already serving in a background thread
    when ``server_trains`` and ``start``; call ``runtime.start()`` or, for a server that does not train,
    ``runtime.run()`` otherwise), ``client`` on every rank that trains.
    """
    ranks = list(range(comm.world_size))
    workers = [r for r in ranks if server_trains or r != server_rank]
    groups = Groups(comm) if comm.is_distributed else None
    numel = sum(p.numel() for p in params)
    runtime = client = None
    if comm.rank == server_rank:
        server_params = [p.detach().clone() for p in params]
        server_optimizer = clone_optimizer(optimizer, server_params)
        server = ParameterServer(
            server_params,
            server_optimizer,
            k=k,
            mode=mode,  # type: ignore[arg-type]
            workers=workers,
            staleness_lr=staleness_lr,
            max_updates=max_updates,
            schedulers=[clone_scheduler(s, optimizer, server_optimizer) for s in schedulers],
        )
        remote = [w for w in workers if w != server_rank]
        runtime = ServerRuntime(server, comm, groups, server_rank, remote, timeout=timeout)
        if server_trains:
            client = WorkerClient(runtime.local_link(server_rank), mode, timeout)
            if start:
                runtime.start()
    elif comm.rank in workers:
        assert groups is not None
        client = WorkerClient(Link.remote(comm, groups, comm.rank, server_rank, numel), mode, timeout)
    return runtime, client
