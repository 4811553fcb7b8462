"""Single-process reference of local SGD / PR-SGD-Momentum, written independently of the package.

p replicas of one model live in one process; each steps on its own batches with its own optimizer;
every tau steps the parameters (and, per momentum mode, the optimizer state, and floating buffers)
are replaced by their mean. Deliberately naive (stack and mean, per tensor) so that a bug in the
package's flat buffers, step counting or state handling cannot be mirrored here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lightning_commsgd.payload import payload_codec, rounding_generator

__all__ = ["flat_params", "lowp_mean_reference", "simulate_local_sgd", "simulate_overlap_local_sgd"]

_MOMENT_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_SIGNED_MOMENTS = ("momentum_buffer", "exp_avg")
_NONNEGATIVE_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def _split_buffers(module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """``(signed, nonnegative)`` floating buffers: BatchNorm's running_var is the non-negative kind."""
    variances = {id(m.running_var) for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)}
    floating = [b for b in module.buffers() if torch.is_floating_point(b)]
    return [b for b in floating if id(b) not in variances], [b for b in floating if id(b) in variances]


def flat_params(module: nn.Module) -> Tensor:
    """All parameters of ``module`` as one detached float64 vector (comparison helper)."""
    return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])


def lowp_mean_reference(rows: Sequence[Tensor], payload: str, seed: int) -> Tensor:
    """The mean of the flat fp32 ``rows`` (one per rank) as ``Communicator.all_reduce_mean_lowp_`` defines
    it. Two ranks: rank r encodes its whole row with the generator of (seed, r, phase 0); the mean is the
    sum of the decoded rows in rank order, / p (the communicator encodes and sends piece by piece; this
    encodes at once, so a difference would show). Three or more: the vector cut into p chunks of ceil(n/p)
    values (zero-padded); rank r encodes its chunks 0..p-1 in order with the generator of (seed, r, phase
    0); chunk j's mean is the sum in rank order of the decoded chunks, / p, encoded by rank j with the
    generator of (seed, j, phase 1) and decoded."""
    codec = payload_codec(payload)
    p, n = len(rows), rows[0].numel()
    cpu = torch.device("cpu")
    if p == 2:
        decoded = [
            codec.decode(codec.encode(row.float(), rounding_generator(codec, seed, r, 0, cpu)), n)
            for r, row in enumerate(rows)
        ]
        return (decoded[0] + decoded[1]) / p
    chunk = -(-n // p)
    padded = [torch.cat([row.float(), row.new_zeros(p * chunk - n, dtype=torch.float32)]) for row in rows]
    decoded = []
    for r in range(p):
        gen = rounding_generator(codec, seed, r, 0, cpu)
        parts = [codec.encode(padded[r][j * chunk : (j + 1) * chunk], gen) for j in range(p)]
        decoded.append([codec.decode(part, chunk) for part in parts])
    means = []
    for j in range(p):
        total = decoded[0][j].clone()
        for r in range(1, p):
            total += decoded[r][j]
        gen = rounding_generator(codec, seed, j, 1, cpu)
        means.append(codec.decode(codec.encode(total / p, gen), chunk))
    return torch.cat(means)[:n]


def _flat_lowp_mean_(
    per_rank: Sequence[Sequence[Tensor]], anchor: Tensor, payload: str, seed: int, nonnegative: int = 0
) -> Tensor:
    """``per_rank[r]``: rank r's tensors in the package's pack order. Each rank's change since the flat
    ``anchor`` is averaged by :func:`lowp_mean_reference`; every tensor is set to anchor + mean, which is
    returned (the next anchor). The last ``nonnegative`` values (second moments, running variances) are
    averaged as values sent in bf16 instead, whatever ``payload``."""
    rows = [torch.cat([t.detach().reshape(-1).float() for t in tensors]) - anchor for tensors in per_rank]
    split = anchor.numel() - nonnegative  # the anchor's non-negative tail is 0: those rows are the values
    mean = lowp_mean_reference([row[:split] for row in rows], payload, seed)
    if nonnegative:
        mean = torch.cat([mean, lowp_mean_reference([row[split:] for row in rows], "bf16", seed)])
    consensus = anchor + mean
    with torch.no_grad():
        for tensors in per_rank:
            offset = 0
            for t in tensors:
                t.copy_(consensus[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
    return consensus


def _mean_(tensors: Sequence[Tensor], weights: Sequence[float] | None = None) -> None:
    """tensors <- their mean, or sum_r w_r t_r / sum_r w_r with ``weights``."""
    if weights is None:
        mean = torch.stack([t.detach() for t in tensors]).sum(0) / len(tensors)
    else:
        mean = torch.stack([t.detach() * w for t, w in zip(tensors, weights)]).sum(0) / sum(weights)
    with torch.no_grad():
        for t in tensors:
            t.copy_(mean)


def simulate_local_sgd(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    batches: Sequence[Sequence[tuple[Tensor, Tensor]]],
    loss_fn: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor],
    tau: int,
    momentum: str = "average",
    average_buffers: bool = True,
    weights: str = "uniform",
    compressor: str | None = None,
    group_size: int | None = None,
    global_every: int = 1,
) -> list[list[Tensor]]:
    """Run local SGD on ``len(batches)`` replicas of ``model``.

    Args:
        model: x_0, copied to every replica.
        make_optimizer: builds one optimizer per replica.
        batches: ``batches[r][t]`` is replica r's batch at step t (all replicas take the same number).
        loss_fn: ``loss_fn(replica, batch)`` returns the loss to backpropagate.
        tau: averaging period.
        momentum: ``"average"``, ``"local"`` or ``"zero"`` (state dropped after each round).
        average_buffers: average floating-point buffers at rounds.
        weights: ``"uniform"`` or ``"samples"`` (each replica weighted by the samples of its batches since
            the latest round, the first dimension of a batch's first tensor).
        compressor: ``"bf16"``/``"fp16"``/``"int8"``: average as the package's ``compressor`` states
            it: each replica's change since the latest consensus (parameters, then the averaged signed
            optimizer state, then the signed buffers, in one flat vector) averaged by
            :func:`lowp_mean_reference` with the round's step as seed and added to the consensus (the
            anchor); the non-negative values (Adam's second moments, then BatchNorm's running variances)
            averaged as values sent in bf16.
        group_size: hierarchical averaging: rounds average within consecutive blocks of this many
            replicas, except every ``global_every``-th round, over all.
        global_every: see ``group_size``.

    Returns:
        ``out[r][t]``: replica r's flat parameters after step t (and after the round ending at t).
    """
    p = len(batches)
    replicas = [copy.deepcopy(model) for _ in range(p)]
    optimizers = [make_optimizer(m) for m in replicas]
    out: list[list[Tensor]] = [[] for _ in range(p)]
    samples = [0.0] * p

    # compressor: the consensus before any round is x_0, the initial buffers and zero optimizer state
    initial = [prm.detach().clone() for prm in replicas[0].parameters()]
    initial_buffers = [b.detach().clone() for b in _split_buffers(replicas[0])[0]]
    anchor: Tensor | None = None

    def packed(r: int) -> tuple[list[Tensor], list[Tensor]]:
        """Replica r's averaged tensors in the package's order: (parameters, signed optimizer state, signed
        buffers), (non-negative optimizer state, running variances)."""
        params = list(replicas[r].parameters())
        signed, nonnegative = [], []
        if momentum == "average":
            for prm in params:
                moments = optimizers[r].state[prm]
                signed.extend(moments[k] for k in _SIGNED_MOMENTS if k in moments)
            for prm in params:
                moments = optimizers[r].state[prm]
                nonnegative.extend(moments[k] for k in _NONNEGATIVE_MOMENTS if k in moments)
        buffers, variances = _split_buffers(replicas[r]) if average_buffers else ([], [])
        return [*params, *signed, *buffers], [*nonnegative, *variances]

    rounds_done = 0
    for t in range(len(batches[0])):
        for r in range(p):
            optimizers[r].zero_grad()
            loss_fn(replicas[r], batches[r][t]).backward()
            optimizers[r].step()
            samples[r] += len(batches[r][t][0])
        if (t + 1) % tau == 0:
            rounds_done += 1
            if group_size is not None and global_every > 1 and rounds_done % global_every:
                for start in range(0, p, group_size):  # a local round: each block on its own
                    block = slice(start, start + group_size)
                    for params in zip(*(m.parameters() for m in replicas[block])):
                        _mean_(params)
                    if average_buffers:
                        for bufs in zip(*(m.buffers() for m in replicas[block])):
                            if torch.is_floating_point(bufs[0]):
                                _mean_(bufs)
                    if momentum == "average":
                        for params in zip(*(m.parameters() for m in replicas[block])):
                            states = [opt.state[prm] for opt, prm in zip(optimizers[block], params)]
                            for key in _MOMENT_KEYS:
                                if all(key in s for s in states):
                                    _mean_([s[key] for s in states])
                    if momentum == "zero":
                        for opt in optimizers[block]:
                            opt.state.clear()
                samples = [0.0] * p
                for r in range(p):
                    out[r].append(flat_params(replicas[r]))
                continue
            w = list(samples) if weights == "samples" else None
            samples = [0.0] * p
            if compressor is not None:
                sections = [packed(r) for r in range(p)]
                per_rank = [signed + nonnegative for signed, nonnegative in sections]
                nonnegative_numel = sum(t.numel() for t in sections[0][1])
                if anchor is None:
                    start_buffers = initial_buffers if average_buffers else []
                    state_numel = sum(t.numel() for t in sections[0][0]) - sum(
                        t.numel() for t in [*initial, *start_buffers]
                    )
                    anchor = torch.cat(
                        [
                            *(t.reshape(-1).float() for t in initial),
                            torch.zeros(state_numel),
                            *(b.reshape(-1).float() for b in start_buffers),
                            torch.zeros(nonnegative_numel),
                        ]
                    )
                anchor = _flat_lowp_mean_(per_rank, anchor, compressor, t + 1, nonnegative_numel)
                anchor[anchor.numel() - nonnegative_numel :] = 0  # those travel as values
            else:
                for params in zip(*(m.parameters() for m in replicas)):
                    _mean_(params, w)
                if average_buffers:
                    for bufs in zip(*(m.buffers() for m in replicas)):
                        if torch.is_floating_point(bufs[0]):
                            _mean_(bufs, w)
                if momentum == "average":
                    for params in zip(*(m.parameters() for m in replicas)):
                        states = [opt.state[prm] for opt, prm in zip(optimizers, params)]
                        for key in _MOMENT_KEYS:
                            if all(key in s for s in states):
                                _mean_([s[key] for s in states], w)
            if momentum == "zero":
                for opt in optimizers:
                    opt.state.clear()
        for r in range(p):
            out[r].append(flat_params(replicas[r]))
    return out


def simulate_overlap_local_sgd(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    batches: Sequence[Sequence[tuple[Tensor, Tensor]]],
    loss_fn: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor],
    tau: int,
    alpha: float,
    beta: float = 0.0,
    lr: float = 0.1,
    compressor: str | None = None,
    correction: str = "pull",
) -> list[list[Tensor]]:
    """Overlap Local-SGD from the paper's description: every tau steps, the anchor becomes the average
    sent at the previous round (x_0 before any), each replica is pulled x <- (1-alpha) x + alpha z, and
    sends z - lr v (v <- beta v + (z - x)/lr; with beta = 0 that is x), whose mean is next round's anchor.
    Optimizer state stays local; parameters and floating buffers are pulled alike.

    Args:
        model: x_0.
        make_optimizer: builds one optimizer per replica.
        batches: ``batches[r][t]``, replica r's batch at step t.
        loss_fn: ``loss_fn(replica, batch)``.
        tau: period.
        alpha: pull strength.
        beta: anchor momentum.
        lr: the learning rate the anchor momentum divides by.
        compressor: ``"bf16"``/``"fp16"``/``"int8"`` payloads as the package states them: each replica's
            change since the anchor (parameters then floating buffers, one flat vector) averaged by
            :func:`lowp_mean_reference` with the round's step as seed; anchor + mean is the next anchor.
        correction: ``"pull"`` (above) or ``"cocod"``: when the average z of the models sent at the
            previous round arrives, x <- x + (z - x_sent) (no pull, no anchor momentum), then x is sent.

    Returns:
        ``out[r][t]``: replica r's flat parameters after step t.
    """
    p = len(batches)
    replicas = [copy.deepcopy(model) for _ in range(p)]
    optimizers = [make_optimizer(m) for m in replicas]

    def pulled(m: nn.Module) -> list[Tensor]:
        return [*m.parameters(), *(b for b in m.buffers() if torch.is_floating_point(b))]

    anchor = [t.detach().clone() for t in pulled(replicas[0])]
    velocity = [[torch.zeros_like(a) for a in anchor] for _ in range(p)]
    in_flight: list[Tensor] | None = None
    snapshots: list[list[Tensor]] | None = None
    out: list[list[Tensor]] = [[] for _ in range(p)]
    for t in range(len(batches[0])):
        for r in range(p):
            optimizers[r].zero_grad()
            loss_fn(replicas[r], batches[r][t]).backward()
            optimizers[r].step()
        if (t + 1) % tau == 0:
            arrived = in_flight is not None
            if in_flight is not None:
                anchor = in_flight
            sent = []
            for r in range(p):
                outgoing = []
                with torch.no_grad():
                    for i, (x, z) in enumerate(zip(pulled(replicas[r]), anchor)):
                        if correction == "cocod":
                            if arrived:
                                assert snapshots is not None
                                x.add_(z - snapshots[r][i])
                            outgoing.append(x.detach().clone())
                            continue
                        x.mul_(1 - alpha).add_(z, alpha=alpha)
                        if beta:
                            velocity[r][i].mul_(beta).add_((z - x) / lr)
                            outgoing.append(z - lr * velocity[r][i])
                        else:
                            outgoing.append(x.detach().clone())
                sent.append(outgoing)
            snapshots = [[part.clone() for part in outgoing] for outgoing in sent]
            if compressor is None:
                in_flight = [torch.stack(parts).sum(0) / p for parts in zip(*sent)]
            else:
                flat_anchor = torch.cat([z.reshape(-1).float() for z in anchor])
                rows = [torch.cat([x.reshape(-1).float() for x in parts]) - flat_anchor for parts in sent]
                consensus = flat_anchor + lowp_mean_reference(rows, compressor, seed=t + 1)
                in_flight, offset = [], 0
                for z in anchor:
                    in_flight.append(consensus[offset : offset + z.numel()].view_as(z))
                    offset += z.numel()
        for r in range(p):
            out[r].append(flat_params(replicas[r]))
    return out
