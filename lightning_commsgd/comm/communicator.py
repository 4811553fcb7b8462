"""The Communicator: counted collectives and point-to-point messages over one process group.

Every method is one *round* (one synchronisation point), issues exactly the collectives it names,
and records payload bytes, collectives and time in a :class:`~lightning_commsgd.ledger.CommLedger`.
Algorithms hand it one flat buffer per round (see :class:`~lightning_commsgd.flat.FlatBuffer`), never
one tensor per parameter. With a world size of 1 every method returns its input untouched and
records nothing: nothing crossed a network.

A sub-group is a Communicator, not a raw group: :meth:`Communicator.split` (blocks of ranks) and
:meth:`Communicator.duplicate` (a second group over the same ranks) return communicators that share
their parent's ledger and monitor, and every method acts on its own communicator's group. Together with
the other modules of :mod:`lightning_commsgd.comm`, this is the one place in the package that calls
``torch.distributed``; the low-precision mean (:mod:`~lightning_commsgd.comm.lowp`), the rounds in
flight (:mod:`~lightning_commsgd.comm.background`) and the DDP baseline
(:mod:`~lightning_commsgd.comm.ddp_baseline`) reach the network through this class only.
"""

from __future__ import annotations

import io
import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch import Tensor

from lightning_commsgd.comm.background import PendingLowpMean, PendingMean
from lightning_commsgd.comm.lowp import lowp_mean_, pieces
from lightning_commsgd.internals import set_group_timeout
from lightning_commsgd.ledger import CommLedger
from lightning_commsgd.payload import PayloadCodec, payload_codec

if TYPE_CHECKING:
    from lightning_commsgd.compression.base import Compressor
    from lightning_commsgd.watchdog import FailureWatchdog

__all__ = ["Communicator", "ReduceKind"]

ReduceKind = Literal["sum", "mean", "max", "min"]

_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "mean": dist.ReduceOp.SUM,  # gloo has no AVG: sum, then divide by the world size
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


class Communicator:
    """Counted collectives over one process group.

    Args:
        group: the process group; ``None`` means the default (world) group when one is initialised,
            else a single-process communicator.
        device: device of the small tensors the communicator creates itself (scalars, object
            payloads); must be a CUDA device for NCCL groups.
        ledger: the ledger to record into (default: a new one); sub-group communicators share their
            parent's.
        timeout: seconds after which any collective of this communicator gives up and raises (the
            ``sync_timeout`` of the strategies): set on ``group`` (the process group's timeout, through
            torch's ``_set_pg_timeout``) and on the groups the communicator creates. ``None`` (default)
            leaves the group's own timeout.
        monitor: a :class:`~lightning_commsgd.watchdog.FailureWatchdog`: every collective reports entering
            and leaving to it, and a failed collective raises its diagnosis
            (:class:`~lightning_commsgd.watchdog.RankFailureError`, naming the failed rank and step). The
            strategies set it; ``None`` re-raises torch's error as it is.
    """

    # gloo moves one message per pair at a time: when two ranks exchange large messages, each side's
    # receive is only posted behind its own send, and the pair runs at about half the link rate (measured
    # on a 100mbit emulated link: 2.6 MB each way in 0.42 s as one message each, 0.23 s, the one-way time,
    # in 10 segments posted send, receive, send, receive, ...). Messages are therefore cut into segments
    # of at most this many bytes and the sends and receives interleaved.
    SEGMENT_BYTES = 256 * 1024

    def __init__(
        self,
        group: Any = None,
        device: torch.device | str = "cpu",
        ledger: CommLedger | None = None,
        *,
        timeout: float | None = None,
        monitor: FailureWatchdog | None = None,
    ) -> None:
        self.device = torch.device(device)
        if dist.is_available() and dist.is_initialized():
            self.group = group if group is not None else dist.group.WORLD
            self.rank = dist.get_rank(self.group)
            self.world_size = dist.get_world_size(self.group)
        else:
            if group is not None:
                raise ValueError("A process group was given but torch.distributed is not initialised.")
            self.group, self.rank, self.world_size = None, 0, 1
        # a sub-group's communicator shares its parent's ledger: one account per rank
        self.ledger = ledger if ledger is not None else CommLedger(world_size=self.world_size)
        # a second communicator over the same ranks for background rounds (all_reduce_mean_lowp_async)
        self._background: Communicator | None = None
        self.monitor = monitor
        self.timeout = timeout
        # point-to-point messages are sent and received from several threads (the parameter server's);
        # duplicates share it with their parent, as they share its ledger
        self._ledger_lock = threading.Lock()
        if timeout is not None and self.is_distributed:
            set_group_timeout(self.group, timeout)

    def _group_timeout(self) -> dict[str, Any]:
        """``timeout=`` for groups this communicator creates (empty: torch's default)."""
        return {} if self.timeout is None else {"timeout": timedelta(seconds=self.timeout)}

    @contextmanager
    def _collective(self, tag: str) -> Iterator[None]:
        """Around every blocking collective: tell the monitor, and turn a failure into its diagnosis."""
        monitor = self.monitor
        if monitor is None:
            yield
            return
        monitor.enter(tag)
        try:
            yield
        except Exception as error:
            failure = monitor.failure(error)
            if failure is error:  # this rank's own error, not the network's: raised as it is
                raise
            raise failure from error
        monitor.leave()

    # -- sub-groups: communicators too ----------------------------------------------------------------
    def split(self, group_size: int) -> Communicator:
        """A communicator over this rank's block of ``group_size`` consecutive ranks (e.g. one node),
        recording into the same ledger. Collective: every rank must call it, at the same point."""
        if not self.is_distributed:
            return self
        if group_size < 1 or self.world_size % group_size:
            raise ValueError(f"group_size {group_size} must divide the world size {self.world_size}.")
        if self.group is not dist.group.WORLD:
            raise ValueError("split() works on the world communicator.")
        subgroup, _ = dist.new_subgroups(group_size, **self._group_timeout())
        return Communicator(subgroup, self.device, ledger=self.ledger, monitor=self.monitor)

    def duplicate(self, timeout: float | None = None, backend: str | None = None) -> Communicator:
        """A communicator over a new process group of this communicator's ranks (same members, same order),
        recording into the same ledger (thread-safely, under the same lock) and reporting to the same
        monitor, so that its messages neither wait behind nor interleave with this communicator's.

        ``timeout``: the new group's, in seconds (``None``: this communicator's); ``backend``: the new
        group's (``None``: the default group's; ``"gloo"`` for CPU messages beside an NCCL job).
        Collective: every rank creates its groups in the same order. A communicator with nobody to talk to
        creates no group; its duplicate is over the same (single-rank) group."""
        seconds = self.timeout if timeout is None else timeout
        group = self.group
        if self.is_distributed:
            ranks = None if self.group is dist.group.WORLD else dist.get_process_group_ranks(self.group)
            kwargs: dict[str, Any] = {} if seconds is None else {"timeout": timedelta(seconds=seconds)}
            if backend is not None:
                kwargs["backend"] = backend
            group = dist.new_group(ranks=ranks, **kwargs)
        twin = Communicator(group, self.device, ledger=self.ledger, monitor=self.monitor)
        twin.timeout = seconds  # the group was created with it: not set a second time
        twin._ledger_lock = self._ledger_lock  # one ledger, one lock
        return twin

    @property
    def is_distributed(self) -> bool:
        """True when there is somebody to talk to (world size > 1)."""
        return self.world_size > 1

    # -- timing ---------------------------------------------------------------------------------
    def _finish(self, tensor: Tensor | None, start: float) -> float:
        # NCCL collectives return once enqueued; wait so the ledger's seconds are real.
        if tensor is not None and tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
        return time.perf_counter() - start

    # -- collectives ------------------------------------------------------------------------------
    def all_reduce_(self, buffer: Tensor, op: ReduceKind = "sum", *, tag: str) -> Tensor:
        """Reduce ``buffer`` in place over all ranks (one collective) and return it.

        ``op="mean"`` divides the sum by the world size (gloo has no native average).
        """
        if op not in _REDUCE_OPS:
            raise ValueError(f"op must be one of {sorted(_REDUCE_OPS)}, got {op!r}.")
        if not self.is_distributed:
            return buffer
        start = time.perf_counter()
        with self._collective(tag):
            dist.all_reduce(buffer, op=_REDUCE_OPS[op], group=self.group)
        if op == "mean":
            if torch.is_floating_point(buffer):
                buffer.div_(self.world_size)
            else:
                buffer.copy_(buffer // self.world_size)
        nbytes = buffer.numel() * buffer.element_size()
        seconds = self._finish(buffer, start)
        self.ledger.record(tag, sent=nbytes, received=nbytes, seconds=seconds, kind="all_reduce")
        return buffer

    def all_reduce_mean_lowp_(
        self,
        buffer: Tensor,
        payload: str | torch.dtype | Compressor | PayloadCodec,
        *,
        tag: str,
        seed: int = 0,
        nonnegative: int = 0,
    ) -> Tensor:
        """Replace the float ``buffer`` by its mean over ranks, sending ``payload``-encoded values (a codec
        name of :mod:`lightning_commsgd.compression.names`: bf16, fp16, int8 or int4; a compressor; or a torch
        dtype) and accumulating in fp32. Every rank decodes the same messages and sums them in rank order, so
        the result is identical on every rank. Stochastic rounding (int8, int4) draws from generators seeded
        by ``seed``, the rank and the phase (:func:`~lightning_commsgd.payload.rounding_seed`).

        - Two ranks: an *all-gather* of the encoded values (each rank encodes its whole buffer once and
          sends it to the other; the mean is (decode(x_0) + decode(x_1)) / 2). One batch of messages, each
          value rounded once. On CPU the buffer is encoded piece by piece and each piece sent as soon as it
          is encoded, the pieces received decoded while later ones travel: the encoding and decoding hide
          behind the link.
        - Three or more ranks: a *reduce-scatter* (rank r encodes chunk j of its values and sends it to rank
          j; each rank decodes its chunk from every rank, sums in fp32 in rank order and divides by p), then
          an *all-gather* of the encoded chunk means: two batches of messages, each value rounded twice.

        Each rank sends and receives (p - 1) payloads of n values (p = 2) or 2 (p - 1) payloads of ceil(n/p)
        values (p >= 3): the fewer bytes of the two forms, which are equal at p = 2. That is half the bytes
        of an fp32 ring all-reduce in 16 bits, about a quarter in int8, about a seventh in int4.
        Point-to-point messages throughout (see :meth:`_p2p_batch` for why not gloo's collectives); the
        messages themselves are :func:`~lightning_commsgd.comm.lowp.lowp_mean_`'s.

        The last ``nonnegative`` values of ``buffer`` (non-negative quantities such as second moments) travel
        in :data:`~lightning_commsgd.payload.NONNEGATIVE_PAYLOAD` instead, by the same messages' scheme, in
        the same round (one ledger entry).
        """
        if not self.is_distributed:
            return buffer
        start = time.perf_counter()
        with self._collective(tag):
            codec = payload_codec(payload)
            nbytes, collectives = lowp_mean_(
                self, buffer, codec, seed, nonnegative, segment_bytes=self.SEGMENT_BYTES
            )
        self.ledger.record(
            tag, sent=nbytes, received=nbytes, seconds=self._finish(buffer, start), collectives=collectives
        )
        return buffer

    def _pieces(self, codec: PayloadCodec, n: int, is_cuda: bool) -> list[tuple[int, int]]:
        """``(start, stop)`` of the pieces a two-rank low-precision mean encodes and sends one at a time,
        with this communicator's :attr:`SEGMENT_BYTES` (see :func:`~lightning_commsgd.comm.lowp.pieces`)."""
        return pieces(codec, n, is_cuda, self.SEGMENT_BYTES)

    def all_reduce_mean_lowp_async(
        self,
        buffer: Tensor,
        payload: str | torch.dtype | Compressor | PayloadCodec,
        *,
        tag: str,
        seed: int = 0,
        nonnegative: int = 0,
    ) -> PendingLowpMean:
        """:meth:`all_reduce_mean_lowp_` in the background: a helper thread sends its two batches of
        messages over a second communicator with the same ranks (:meth:`duplicate`, created at the first
        call, which every rank makes at the same point), so they neither wait behind nor interleave with the
        collectives the training loop issues meanwhile. :meth:`PendingLowpMean.wait` joins it; the ledger
        records the round then, with the seconds spent *waiting*. Until then ``buffer`` must not be
        touched."""
        if self.is_distributed and self._background is None:
            self._background = self.duplicate()
        return PendingLowpMean(self, buffer, payload_codec(payload), tag, seed, nonnegative)

    def all_reduce_mean_async(self, buffer: Tensor, *, tag: str) -> PendingMean:
        """Start the mean over ranks of ``buffer`` in the background (one collective) and return a handle
        whose :meth:`PendingMean.wait` finishes it in place. Until then ``buffer`` must not be touched.
        The ledger records the round when it is waited for, with the seconds spent *waiting* (the
        communication time the overlap did not hide)."""
        return PendingMean(self, buffer, tag)

    def all_reduce_scalars(
        self, values: Sequence[float], op: ReduceKind = "sum", *, tag: str, dtype: torch.dtype = torch.float64
    ) -> list[float]:
        """Reduce a few Python numbers in one collective (float64 by default, so sums stay exact)."""
        buffer = torch.tensor(list(values), dtype=dtype, device=self.device)
        return self.all_reduce_(buffer, op, tag=tag).tolist()

    def broadcast_(self, buffer: Tensor, src: int = 0, *, tag: str) -> Tensor:
        """Overwrite ``buffer`` on every rank with its value on ``src`` (one collective)."""
        if not self.is_distributed:
            return buffer
        start = time.perf_counter()
        with self._collective(tag):
            dist.broadcast(buffer, src=src, group=self.group)
        nbytes = buffer.numel() * buffer.element_size()
        is_src = self.rank == src
        seconds = self._finish(buffer, start)
        self.ledger.record(
            tag, sent=nbytes if is_src else 0, received=0 if is_src else nbytes, seconds=seconds
        )
        return buffer

    def all_gather(self, tensor: Tensor, *, tag: str) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape on all ranks), in rank order (one collective)."""
        if not self.is_distributed:
            return [tensor]
        start = time.perf_counter()
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        with self._collective(tag):
            dist.all_gather(out, tensor.contiguous(), group=self.group)
        nbytes = tensor.numel() * tensor.element_size()
        seconds = self._finish(tensor, start)
        self.ledger.record(tag, sent=nbytes, received=nbytes * (self.world_size - 1), seconds=seconds)
        return out

    def gather(self, tensor: Tensor, dst: int = 0, *, tag: str) -> list[Tensor] | None:
        """Every rank's ``tensor`` (same shape on all ranks) in rank order on ``dst``, ``None`` elsewhere
        (one collective). Payload counted: n sent by each other rank, (p - 1) n received by ``dst``."""
        if not self.is_distributed:
            return [tensor]
        start = time.perf_counter()
        tensor = tensor.contiguous()
        is_dst = self.rank == dst
        out = [torch.empty_like(tensor) for _ in range(self.world_size)] if is_dst else None
        with self._collective(tag):
            dist.gather(tensor, gather_list=out, dst=dst, group=self.group)
        nbytes = tensor.numel() * tensor.element_size()
        seconds = self._finish(tensor, start)
        others = self.world_size - 1
        self.ledger.record(
            tag, sent=0 if is_dst else nbytes, received=nbytes * others if is_dst else 0, seconds=seconds
        )
        return out

    def exchange(
        self, send: Tensor, to: Sequence[int], recv_from: Sequence[int], *, tag: str
    ) -> list[Tensor]:
        """Send ``send`` to every rank in ``to`` and receive a tensor shaped like it from every rank in
        ``recv_from`` (returned in that order): one batch of point-to-point messages, no collective.

        All sends and receives are posted together before any is awaited, so any set of pairings that
        matches across ranks (ring, torus, directed exponential graphs, ...) completes without deadlock.
        Payload counted: ``len(to) n`` sent, ``len(recv_from) n`` received.
        """
        received = [torch.empty_like(send) for _ in recv_from]
        if not to and not recv_from:
            return received
        start = time.perf_counter()
        send = send.contiguous()
        with self._collective(tag):
            self._p2p_batch([(peer, send) for peer in to], list(zip(recv_from, received)))
        nbytes = send.numel() * send.element_size()
        seconds = self._finish(send, start)
        # one torch.distributed call (batch_isend_irecv) carrying every message
        self.ledger.record(tag, sent=nbytes * len(to), received=nbytes * len(recv_from), seconds=seconds)
        return received

    # -- batches of point-to-point messages (uncounted: the caller records the round) ------------------
    def _p2p_batch(
        self,
        sends: Sequence[tuple[int, Tensor]],
        recvs: Sequence[tuple[int, Tensor]],
        segment_bytes: int | None = None,
    ) -> None:
        """Post every send and receive (``(group rank of the peer, contiguous tensor)``) over this
        communicator's group at once, CPU tensors cut into segments of ``segment_bytes`` (default
        :attr:`SEGMENT_BYTES`; segment i travels with tag i), sends and receives interleaved, and wait for
        all. One ``batch_isend_irecv`` call. Any pairing that matches across ranks completes."""
        size = self.SEGMENT_BYTES if segment_bytes is None else segment_bytes
        # P2POp accepts only c10d's own isend/irecv objects (checked by identity): take them from c10d,
        # so a wrapper that a profiler or test puts on torch.distributed.isend cannot break gossip.
        send_ops = self._segment_ops(c10d.isend, sends, size)
        recv_ops = self._segment_ops(c10d.irecv, recvs, size)
        ops = [op for pair in itertools.zip_longest(send_ops, recv_ops) for op in pair if op is not None]
        for request in dist.batch_isend_irecv(ops):
            request.wait()

    def _segment_ops(self, op: Any, pairs: Sequence[tuple[int, Tensor]], segment_bytes: int) -> list[Any]:
        """One ``P2POp`` per segment of each ``(peer, tensor)``, segment by segment across the peers."""
        per_peer = []
        for peer, tensor in pairs:
            flat = tensor.reshape(-1)
            nbytes = flat.numel() * flat.element_size()
            segments = 1 if flat.is_cuda else max(1, -(-nbytes // segment_bytes))
            global_peer = self._global_rank(peer)
            per_peer.append(
                [
                    dist.P2POp(op, piece, global_peer, self.group, tag=i)
                    for i, piece in enumerate(flat.chunk(segments))
                ]
            )
        return [op for segment in itertools.zip_longest(*per_peer) for op in segment if op is not None]

    def _post_irecv(self, tensor: Tensor, src: int, msg_tag: int) -> Any:
        """Post an uncounted receive into ``tensor`` from global rank ``src`` over this communicator's group
        and return its handle (the caller waits for it and records the round)."""
        return dist.irecv(tensor, src, self.group, tag=msg_tag)

    def _post_isend(self, tensor: Tensor, dst: int, msg_tag: int) -> Any:
        """Post an uncounted send of ``tensor`` to global rank ``dst`` over this communicator's group and
        return its handle (the caller waits for it and records the round)."""
        return dist.isend(tensor, dst, self.group, tag=msg_tag)

    def _all_reduce_sum_async(self, buffer: Tensor) -> Any:
        """Start an uncounted sum of ``buffer`` over this communicator's group (one collective) and return
        its work handle (the caller waits for it and records the round)."""
        return dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    # -- point-to-point messages (the parameter server's) ---------------------------------------------
    def send(self, tensor: Tensor, dst: int, *, tag: str, msg_tag: int = 0) -> None:
        """Send ``tensor`` to global rank ``dst`` over this communicator's group (blocking until it is
        taken); ``msg_tag`` tells messages between the same pair apart. Thread-safe."""
        self.isend(tensor, dst, tag=tag, msg_tag=msg_tag).wait()

    def isend(self, tensor: Tensor, dst: int, *, tag: str, msg_tag: int = 0) -> Any:
        """Post a send of ``tensor`` to global rank ``dst`` over this communicator's group and return its
        handle (``wait()`` it before touching ``tensor``). Counted as sent when posted. Thread-safe."""
        tensor = tensor.contiguous()
        work = dist.isend(tensor, dst, group=self.group, tag=msg_tag)
        with self._ledger_lock:
            self.ledger.record(tag, sent=tensor.numel() * tensor.element_size(), received=0, seconds=0.0)
        return work

    def recv_(self, tensor: Tensor, src: int, *, tag: str, msg_tag: int = 0, timed: bool = True) -> Tensor:
        """Receive into ``tensor`` from global rank ``src`` over this communicator's group (blocking).
        ``timed=False`` keeps the wait out of the ledger's seconds (a thread that waits for the next
        message is idle, not communicating). Thread-safe."""
        start = time.perf_counter()
        dist.recv(tensor, src, group=self.group, tag=msg_tag)
        seconds = self._finish(tensor, start) if timed else 0.0
        with self._ledger_lock:
            self.ledger.record(tag, sent=0, received=tensor.numel() * tensor.element_size(), seconds=seconds)
        return tensor

    def global_rank(self, group_rank: int) -> int:
        """The global rank of ``group_rank`` of this communicator's group (itself for the world group)."""
        if self.group is None or self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def _global_rank(self, group_rank: int) -> int:
        """The global rank of peer ``group_rank`` (another rank) of this communicator's group."""
        if not 0 <= group_rank < self.world_size or group_rank == self.rank:
            raise ValueError(f"peer rank must be another rank in [0, {self.world_size}), got {group_rank}.")
        return group_rank if self.group is dist.group.WORLD else dist.get_global_rank(self.group, group_rank)

    def barrier(self, *, tag: str) -> None:
        """Wait for all ranks (one collective, no payload)."""
        if not self.is_distributed:
            return
        start = time.perf_counter()
        with self._collective(tag):
            if dist.get_backend(self.group) == "nccl" and self.device.type == "cuda":
                dist.barrier(group=self.group, device_ids=[self.device.index or 0])
            else:
                dist.barrier(group=self.group)
        self.ledger.record(tag, sent=0, received=0, seconds=time.perf_counter() - start)

    # -- Python objects -----------------------------------------------------------------------------
    def _to_bytes(self, obj: Any) -> Tensor:
        stream = io.BytesIO()
        torch.save(obj, stream)
        return torch.frombuffer(bytearray(stream.getbuffer()), dtype=torch.uint8).to(self.device)

    @staticmethod
    def _from_bytes(payload: Tensor) -> Any:
        return torch.load(io.BytesIO(payload.cpu().numpy().tobytes()), map_location="cpu", weights_only=False)

    def broadcast_object(self, obj: Any, src: int = 0, *, tag: str) -> Any:
        """``obj`` from ``src`` on every rank (two collectives: size, then payload)."""
        if not self.is_distributed:
            return obj
        start = time.perf_counter()
        payload = (
            self._to_bytes(obj) if self.rank == src else torch.empty(0, dtype=torch.uint8, device=self.device)
        )
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        with self._collective(tag):
            dist.broadcast(size, src=src, group=self.group)
            if self.rank != src:
                payload = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
            dist.broadcast(payload, src=src, group=self.group)
        result = obj if self.rank == src else self._from_bytes(payload)
        nbytes = int(size.item()) + size.element_size()
        is_src = self.rank == src
        seconds = self._finish(payload, start)
        self.ledger.record(
            tag,
            sent=nbytes if is_src else 0,
            received=0 if is_src else nbytes,
            seconds=seconds,
            collectives=2,
        )
        return result

    def gather_object(self, obj: Any, dst: int = 0, *, tag: str) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on ``dst``; ``None`` elsewhere (two collectives)."""
        if not self.is_distributed:
            return [obj]
        start = time.perf_counter()
        payload = self._to_bytes(obj)
        mine = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        all_sizes = [torch.empty_like(mine) for _ in range(self.world_size)]
        with self._collective(tag):
            dist.all_gather(all_sizes, mine, group=self.group)
            sizes = [int(s.item()) for s in all_sizes]
            # gather needs equal shapes: pad every payload to the largest one.
            padded = torch.zeros(max(sizes), dtype=torch.uint8, device=self.device)
            padded[: payload.numel()] = payload
            buckets = [torch.empty_like(padded) for _ in sizes] if self.rank == dst else None
            dist.gather(padded, gather_list=buckets, dst=dst, group=self.group)
        others = self.world_size - 1
        sent, received = 8, 8 * others
        if self.rank == dst:
            assert buckets is not None
            result = [
                obj if r == dst else self._from_bytes(b[:n]) for r, (b, n) in enumerate(zip(buckets, sizes))
            ]
            received += padded.numel() * others
        else:
            result = None
            sent += padded.numel()
        self.ledger.record(
            tag, sent=sent, received=received, seconds=self._finish(padded, start), collectives=2
        )
        return result
