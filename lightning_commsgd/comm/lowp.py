"""The low-precision mean over ranks: the point-to-point message schedule behind
:meth:`~lightning_commsgd.comm.communicator.Communicator.all_reduce_mean_lowp_`.

Its one job: encode, exchange, decode and sum a float buffer so that every rank ends with the same mean
(all-gather of the encoded values on two ranks, reduce-scatter then all-gather on three or more). The
messages travel through a :class:`~lightning_commsgd.comm.communicator.Communicator`'s uncounted batches;
the caller counts the round. Nothing here calls ``torch.distributed`` itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_commsgd.payload import NONNEGATIVE_PAYLOAD, PayloadCodec, payload_codec, rounding_generator

if TYPE_CHECKING:
    from lightning_commsgd.comm.communicator import Communicator

__all__ = ["gathered_mean_", "lowp_mean_", "pieces", "scattered_mean_"]


def lowp_mean_(
    comm: Communicator,
    buffer: Tensor,
    codec: PayloadCodec,
    seed: int,
    nonnegative: int = 0,
    *,
    segment_bytes: int,
) -> tuple[int, int]:
    """The messages of :meth:`~lightning_commsgd.comm.communicator.Communicator.all_reduce_mean_lowp_` over
    ``comm``'s group, CPU messages cut into segments of ``segment_bytes``; returns the payload bytes sent (=
    received) by this rank and the ``torch.distributed`` calls made (batches, or single messages)."""
    if nonnegative:
        flat = buffer.view(-1)  # the strategies' packed buffers are contiguous
        split = flat.numel() - nonnegative
        sections = [(flat[:split], codec), (flat[split:], payload_codec(NONNEGATIVE_PAYLOAD))]
        nbytes = calls = 0
        for part, part_codec in sections:
            if part.numel():
                sent, made = lowp_mean_(comm, part, part_codec, seed, segment_bytes=segment_bytes)
                nbytes, calls = nbytes + sent, calls + made
        return nbytes, calls
    if comm.world_size == 2:
        return gathered_mean_(comm, buffer, codec, seed, segment_bytes)
    return scattered_mean_(comm, buffer, codec, seed, segment_bytes), 2


def gathered_mean_(
    comm: Communicator, buffer: Tensor, codec: PayloadCodec, seed: int, segment_bytes: int
) -> tuple[int, int]:
    """All-gather form: every rank's values encoded once (generator of (seed, rank, phase 0)), decoded
    by every rank and summed in rank order, / p. The mean is written over ``buffer`` piece by piece.
    Returns the payload bytes sent and the ``torch.distributed`` calls made."""
    p, me, flat = comm.world_size, comm.rank, buffer.view(-1)  # the strategies' buffers are contiguous
    peers = [r for r in range(p) if r != me]  # group ranks, in rank order
    generator = rounding_generator(codec, seed, me, 0, flat.device)
    spans = pieces(codec, flat.numel(), flat.is_cuda, segment_bytes)
    incoming = [[codec.empty(stop - start, flat.device) for start, stop in spans] for _ in peers]
    own: list[Tensor] = []
    if len(spans) == 1:  # one batch (CUDA: NCCL runs point-to-point operations in the order posted)
        own.append(codec.encode(flat, generator))
        receives = [(r, rows[0]) for r, rows in zip(peers, incoming)]
        comm._p2p_batch([(r, own[0]) for r in peers], receives, segment_bytes)
        waits: list[list[Any]] = [[]]
        calls = 1
    else:
        globals_ = [comm._global_rank(r) for r in peers]
        # every receive posted before any send, so that neither side's sends wait behind the other's
        waits = [
            [comm._post_irecv(rows[i], peer, i) for peer, rows in zip(globals_, incoming)]
            for i in range(len(spans))
        ]
        for i, (start, stop) in enumerate(spans):
            own.append(codec.encode(flat[start:stop], generator))
            # waited for before the piece's values are overwritten by the mean
            waits[i] += [comm._post_isend(own[i], peer, i) for peer in globals_]
        calls = sum(len(works) for works in waits)
    for i, (start, stop) in enumerate(spans):
        for work in waits[i]:
            work.wait()
        rows = [received[i] for received in incoming]
        rows.insert(me, own[i])  # rank order
        out, numel = flat[start:stop], stop - start
        torch.add(codec.decode(rows[0], numel), codec.decode(rows[1], numel), out=out)
        for row in rows[2:]:
            out += codec.decode(row, numel)
        out.div_(p)
    return (p - 1) * sum(codec.nbytes(payload) for payload in own), calls


def pieces(codec: PayloadCodec, n: int, is_cuda: bool, segment_bytes: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the pieces :func:`gathered_mean_` encodes and sends one at a time: about
    ``segment_bytes`` of payload each, a multiple of the codec's ``segment_align`` values; one piece on
    CUDA or for a codec that encodes the whole vector at once (its message is still cut into segments:
    :meth:`~lightning_commsgd.comm.communicator.Communicator._p2p_batch`)."""
    align = codec.segment_align
    if is_cuda or align is None:
        return [(0, n)]
    per_piece = max(align, segment_bytes * align // codec.payload_nbytes(align) // align * align)
    return [(start, min(start + per_piece, n)) for start in range(0, max(n, 1), per_piece)]


def scattered_mean_(
    comm: Communicator, buffer: Tensor, codec: PayloadCodec, seed: int, segment_bytes: int
) -> int:
    """Reduce-scatter, then all-gather of the chunk means (see :func:`lowp_mean_`); returns the payload
    bytes sent (two batches of messages)."""
    p, n, me, device = comm.world_size, buffer.numel(), comm.rank, buffer.device
    chunk = -(-n // p)
    padded = torch.zeros(p, chunk, dtype=torch.float32, device=device)
    padded.view(-1)[:n] = buffer.reshape(-1)
    generator = rounding_generator(codec, seed, me, 0, device)
    outgoing = [codec.encode(padded[r], generator) for r in range(p)]
    incoming = [outgoing[r] if r == me else codec.empty(chunk, device) for r in range(p)]
    peers = [r for r in range(p) if r != me]
    comm._p2p_batch([(r, outgoing[r]) for r in peers], [(r, incoming[r]) for r in peers], segment_bytes)
    total = codec.decode(incoming[0], chunk).clone()  # summed in rank order, in place
    for row in incoming[1:]:
        total += codec.decode(row, chunk)
    mine = codec.encode(total.div_(p), rounding_generator(codec, seed, me, 1, device))
    gathered = [mine if r == me else codec.empty(chunk, device) for r in range(p)]
    comm._p2p_batch([(r, mine) for r in peers], [(r, gathered[r]) for r in peers], segment_bytes)
    flat = buffer.view(-1)  # the strategies' packed buffers are contiguous (view raises otherwise)
    for j, part in enumerate(gathered):  # each chunk decoded straight into its place
        start, stop = j * chunk, min((j + 1) * chunk, n)
        if start < stop:
            flat[start:stop] = codec.decode(part, chunk)[: stop - start]
    return (p - 1) * (codec.nbytes(outgoing[me]) + codec.nbytes(mine))
