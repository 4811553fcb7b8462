"""A single-process simulation of DiLoCo, SlowMo and Streaming DiLoCo, written from the spec
(docs/ALGORITHMS.md, not from the package's code): every replica is a model of its own in this process.

Per inner step t = 1, 2, ... every replica steps its inner optimizer on its batch. With K = H / F, fragment
f sends at t = (f + 1) K - d (mod H) and lands at t = (f + 1) K (mod H): Delta = mean_i (anchor_f - x_i,f)
(exact: the sum in rank order / p; a codec: ``lowp_mean_reference`` with the send step as seed; a biased
compressor with error feedback: mean_i decode(C(Delta_i + e_i)), C seeded by (t, i, phase 2)); at landing
the outer optimizer of f steps its anchor with gradient Delta (SlowMo: Delta / gamma with lr alpha gamma)
and x_f <- lerp(anchor_f, x_f now, w); floating buffers take the mean of the values sent, merged alike.
Inner state is kept ("local") or reset ("zero"). At the end a fragment in flight lands; every fragment
with steps since its last landing at w = 0 takes one more outer step (send and land, seed offset 2^40,
w = 0).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from simulation import lowp_mean_reference
from torch import Tensor, nn

from lightning_commsgd.payload import rounding_seed

FINAL_SEED_OFFSET = 1 << 40


def _fragment_of(name: str, fragments: Sequence[Sequence[str]]) -> int:
    for f, prefixes in enumerate(fragments):
        if any(p == "" or name == p or name.startswith(p + ".") for p in prefixes):
            return f
    raise AssertionError(name)


def simulate_diloco(
    make_net: Callable[[], nn.Module],
    make_inner: Callable[[nn.Module], torch.optim.Optimizer],
    batches: Sequence[Sequence[Any]],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    tau: int,
    make_outer: Callable[[list[Tensor]], torch.optim.Optimizer],
    fragments: Sequence[Sequence[str]] = (("",),),
    sync_delay: int = 0,
    local_weight: float = 0.0,
    compressor: Any = None,
    error_feedback: bool = False,
    momentum: str = "local",
    slowmo: bool = False,
    finalize: bool = True,
    inner_lr_decay: float = 1.0,
) -> list[list[Tensor]]:
    """``records[r][t]``: replica r's flat fp64 parameters after step t+1 (after any landing); the last
    entry after ``finalize`` when it runs. ``batches[r][t]``: replica r's batch at step t."""
    p, steps = len(batches), len(batches[0])
    base = make_net()
    base.train()
    nets = [copy.deepcopy(base) for _ in range(p)]
    inner = [make_inner(net) for net in nets]
    F, d = len(fragments), sync_delay
    K = tau // F
    names = [n for n, _ in base.named_parameters()]
    buffer_names = [n for n, b in base.named_buffers() if torch.is_floating_point(b)]
    members = [[i for i, n in enumerate(names) if _fragment_of(n, fragments) == f] for f in range(F)]
    buf_members = [
        [n for n in buffer_names if _fragment_of(n, fragments) == f] for f in range(F)
    ]  # buffers by the same prefixes
    params = [list(net.parameters()) for net in nets]
    buffers = [dict(net.named_buffers()) for net in nets]
    anchors = [[params[0][i].detach().clone().float() for i in members[f]] for f in range(F)]
    outers = [make_outer(anchors[f]) for f in range(F)]
    slow_lr = [float(o.param_groups[0]["lr"]) for o in outers]
    residuals: list[list[Tensor | None]] = [[None] * F for _ in range(p)]
    fresh = [True] * F
    in_flight: tuple[int, int, Tensor, list[Tensor]] | None = None  # f, land step, mean delta, mean buffers

    def send(f: int, seed: int) -> tuple[Tensor, list[Tensor]]:
        anchor = torch.cat([a.reshape(-1) for a in anchors[f]])
        local = [torch.cat([params[r][i].detach().reshape(-1).float() for i in members[f]]) for r in range(p)]
        rows = [anchor - x for x in local]
        bufs = [[buffers[r][n].detach().float().clone() for n in buf_members[f]] for r in range(p)]
        mean_bufs = [sum(bufs[r][j] for r in range(p)) / p for j in range(len(buf_members[f]))]
        if compressor is None:
            total = rows[0].clone()
            for r in range(1, p):
                total += rows[r]
            return total / p, mean_bufs
        if error_feedback:
            total = torch.zeros_like(rows[0])
            for r in range(p):
                e = residuals[r][f]
                corrected = rows[r] + (e if e is not None else 0.0)
                gen = torch.Generator().manual_seed(rounding_seed(seed, r, 2))
                payload = compressor.encode(corrected, gen)
                decoded = compressor.decode(payload, corrected.numel())
                residuals[r][f] = corrected - decoded
                total += decoded
            return total / p, mean_bufs
        assert not buf_members[f], "codec rounds here: no buffers"
        return lowp_mean_reference(rows, compressor, seed=seed), mean_bufs

    def land(f: int, mean: Tensor, mean_bufs: list[Tensor], weight: float) -> None:
        grad = mean.clone()
        if slowmo:
            gamma = float(inner[0].param_groups[0]["lr"])
            grad /= gamma
            for group in outers[f].param_groups:
                group["lr"] = slow_lr[f] * gamma
        offset = 0
        for a in anchors[f]:
            a.grad = grad[offset : offset + a.numel()].view_as(a).clone()
            offset += a.numel()
        outers[f].step()
        with torch.no_grad():
            for r in range(p):
                for a, i in zip(anchors[f], members[f]):
                    local = params[r][i].detach().float()
                    params[r][i].copy_(torch.lerp(a, local, weight) if weight > 0 else a)
                for n, m in zip(buf_members[f], mean_bufs):
                    local = buffers[r][n].detach().float()
                    buffers[r][n].copy_(torch.lerp(m, local, weight) if weight > 0 else m)
                if momentum == "zero":
                    for i in members[f]:
                        inner[r].state.pop(params[r][i], None)
        fresh[f] = weight == 0

    def flat(r: int) -> Tensor:
        return torch.cat([q.detach().reshape(-1).double() for q in nets[r].parameters()])

    records: list[list[Tensor]] = [[] for _ in range(p)]
    for t in range(1, steps + 1):
        for r in range(p):
            inner[r].zero_grad()
            loss_fn(nets[r], batches[r][t - 1]).backward()
            inner[r].step()
        fresh = [False] * F
        if in_flight is not None and in_flight[1] == t:
            land(in_flight[0], in_flight[2], in_flight[3], local_weight)
            in_flight = None
        for f in range(F):
            offset = (f + 1) * K - d
            if t >= offset and (t - offset) % tau == 0:
                mean, mean_bufs = send(f, t)
                if d == 0:
                    land(f, mean, mean_bufs, local_weight)
                else:
                    in_flight = (f, t + d, mean, mean_bufs)
        for r in range(p):
            records[r].append(flat(r))
            for group in inner[r].param_groups:
                group["lr"] *= inner_lr_decay
    if finalize:
        if in_flight is not None:
            land(in_flight[0], in_flight[2], in_flight[3], local_weight)
        for f in range(F):
            if not fresh[f]:
                mean, mean_bufs = send(f, steps + FINAL_SEED_OFFSET)
                land(f, mean, mean_bufs, 0.0)
        for r in range(p):
            records[r].append(flat(r))
    return records
