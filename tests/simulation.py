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

__all__ = ["simulate_local_sgd", "flat_params"]

_MOMENT_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def flat_params(module: nn.Module) -> Tensor:
    """All parameters of ``module`` as one detached float64 vector (comparison helper)."""
    return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])


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
    payload_dtype: torch.dtype | None = None,
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
        payload_dtype: average in 16 bits as the package's ``payload_dtype`` states it: each replica's
            change since the latest consensus, rounded to this dtype, summed over replicas in fp32,
            divided by p, rounded again, added to the consensus (the anchor).
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
    anchors: dict[tuple[str, int, str], Tensor] = {}

    def mean_(kind: str, index: int, key: str, tensors: Sequence[Tensor], w) -> None:
        if payload_dtype is None:
            _mean_(tensors, w)
            return
        # the consensus before any round: x_0 / the initial buffers, zero optimizer state
        anchor = anchors.get((kind, index, key))
        if anchor is None:
            anchor = initial[(kind, index)].clone() if kind != "state" else torch.zeros_like(tensors[0])
        deltas = torch.stack([(t.detach() - anchor).to(payload_dtype) for t in tensors])
        mean = (deltas.to(torch.float32).sum(0) / p).to(payload_dtype).to(torch.float32)
        anchors[(kind, index, key)] = anchor + mean
        with torch.no_grad():
            for t in tensors:
                t.copy_(anchors[(kind, index, key)])

    initial = {("param", i): prm.detach().clone() for i, prm in enumerate(replicas[0].parameters())}
    initial.update({("buffer", i): b.detach().clone() for i, b in enumerate(replicas[0].buffers())})
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
            for i, params in enumerate(zip(*(m.parameters() for m in replicas))):
                mean_("param", i, "", params, w)
            if average_buffers:
                for i, bufs in enumerate(zip(*(m.buffers() for m in replicas))):
                    if torch.is_floating_point(bufs[0]):
                        mean_("buffer", i, "", bufs, w)
            if momentum == "average":
                for i, params in enumerate(zip(*(m.parameters() for m in replicas))):
                    states = [opt.state[prm] for opt, prm in zip(optimizers, params)]
                    for key in _MOMENT_KEYS:
                        if all(key in s for s in states):
                            mean_("state", i, key, [s[key] for s in states], w)
            elif momentum == "zero":
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
    payload_dtype: torch.dtype | None = None,
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
        payload_dtype: 16-bit payloads as the package states them: each replica sends its change since
            the anchor rounded to this dtype; the sum over replicas in fp32, divided by p, rounded again,
            added to the anchor, is the next anchor.
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
            if payload_dtype is None:
                in_flight = [torch.stack(parts).sum(0) / p for parts in zip(*sent)]
            else:
                in_flight = []
                for z, parts in zip(anchor, zip(*sent)):
                    deltas = torch.stack([(part - z).to(payload_dtype) for part in parts])
                    mean = (deltas.to(torch.float32).sum(0) / p).to(payload_dtype).to(torch.float32)
                    in_flight.append(z + mean)
        for r in range(p):
            out[r].append(flat_params(replicas[r]))
    return out
