"""Single-process simulation of ``ft_group_worker.py`` runs for a given membership history.

Each group g runs optimizer step s while it is live (``first_step[g] <= s < last_step[g]``); the round after
step T (T a multiple of tau) averages the pseudo-gradients of the groups in ``contributors(T)`` and steps the
one shared anchor with the outer optimizer; every group live after the round restarts from the anchor. A
group that joins in the round after step T (healing) takes the anchor and the inner momentum of the group it
healed from, and runs from step T on. No torchft, no processes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from ft_group_worker import batch as worker_batch
from ft_group_worker import build_model
from torch import nn


def simulate(
    *,
    groups: int,
    steps: int,
    tau: int,
    contributors: Callable[[int], list[int]],
    last_step: dict[int, int] | None = None,
    joins: dict[int, tuple[int, int]] | None = None,
    outer: str = "diloco",
    batch: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]] = worker_batch,
    momentum: str = "local",
) -> dict[int, list[torch.Tensor]]:
    """Final parameters of every group live at the end.

    Args:
        groups: groups at the start.
        steps: the run's optimizer steps.
        tau: H.
        contributors: the groups whose pseudo-gradients the round after step T averages (ascending order).
        last_step: g -> the steps g completed before it died (its steps 0 .. last_step - 1 ran).
        joins: g -> (T, source): g (re)joins in the round after step T, healing from group ``source``.
        outer: ``"diloco"`` (SGD lr 0.7, momentum 0.9, Nesterov) or ``"average"`` (SGD lr 1).
        batch: ``(group, step) -> (x, y)``, what group g trains on at step s (default: the plain worker's).
        momentum: ``"local"`` (each group keeps its inner momentum) or ``"average"`` (PR-SGD-Momentum: after
            a round every live group takes the contributors' mean momentum).
    """
    last_step, joins = last_step or {}, joins or {}
    models = {g: build_model() for g in range(groups)}
    inner = {g: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for g, m in models.items()}
    anchor = [p.detach().clone() for p in build_model().parameters()]
    if outer == "average":
        outer_opt = torch.optim.SGD(anchor, lr=1.0)
    else:
        outer_opt = torch.optim.SGD(anchor, lr=0.7, momentum=0.9, nesterov=True)
    live = set(range(groups))
    for s in range(steps):
        for g in sorted(live):
            x, y = batch(g, s)
            inner[g].zero_grad()
            nn.functional.mse_loss(models[g](x), y).backward()
            inner[g].step()
        step = s + 1
        live -= {g for g, last in last_step.items() if step == last}  # died (until it rejoins, if it does)
        if step % tau:
            continue
        members = contributors(step)
        with torch.no_grad():
            for i, a in enumerate(anchor):
                total = sum((a - list(models[g].parameters())[i]) for g in members)
                a.grad = total / len(members)
            outer_opt.step()
            for a in anchor:
                a.grad = None
            mean_momentum = None
            if momentum == "average":
                buffers = [
                    [inner[g].state[p]["momentum_buffer"] for p in models[g].parameters()] for g in members
                ]
                mean_momentum = [sum(column) / len(members) for column in zip(*buffers)]
            for g, (join_step, source) in joins.items():
                if join_step == step:
                    models[g] = build_model()
                    inner[g] = torch.optim.SGD(models[g].parameters(), lr=0.1, momentum=0.9)
                    source_params = list(models[source].parameters())
                    for p, q in zip(models[g].parameters(), source_params):
                        inner[g].state[p]["momentum_buffer"] = (
                            inner[source].state[q]["momentum_buffer"].clone()
                        )
                    live.add(g)
            for g in live:
                for p, a in zip(models[g].parameters(), anchor):
                    p.copy_(a)
                if mean_momentum is not None:
                    for p, m in zip(models[g].parameters(), mean_momentum):
                        inner[g].state[p]["momentum_buffer"] = m.clone()
    return {g: [p.detach().clone() for p in models[g].parameters()] for g in sorted(live)}


def simulate_streaming(
    *,
    groups: int,
    steps: int,
    tau: int,
    fragments: list[list[int]],
    sync_delay: int,
    local_weight: float,
    contributors: Callable[[int], list[int]],
    last_step: dict[int, int] | None = None,
) -> dict[int, list[torch.Tensor]]:
    """Streaming DiLoCo between groups (no joins): fragment f (indices into the model's parameters) syncs
    after steps (f + 1) H / F - d + k H, averaging the pseudo-gradients of ``contributors(send step)``; its
    mean lands d steps later (the outer step of its anchor, then x_f = lerp(anchor_f, x_f, w)); at the end
    the fragment in flight lands and every fragment takes a final sync merged with weight 0."""
    last_step = last_step or {}
    models = {g: build_model() for g in range(groups)}
    inner = {g: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for g, m in models.items()}
    start = list(build_model().parameters())
    anchors = [[start[i].detach().clone() for i in fragment] for fragment in fragments]
    outer = [torch.optim.SGD(a, lr=0.7, momentum=0.9, nesterov=True) for a in anchors]
    live, in_flight = set(range(groups)), None  # in flight: (fragment, apply step, mean)

    def params(g: int, f: int) -> list[torch.Tensor]:
        every = list(models[g].parameters())
        return [every[i] for i in fragments[f]]

    def send(f: int, members: list[int]) -> list[torch.Tensor]:
        return [
            sum(a - p.detach() for p in column) / len(members)
            for a, column in zip(anchors[f], zip(*(params(g, f) for g in members)))
        ]

    def land(f: int, mean: list[torch.Tensor], weight: float) -> None:
        with torch.no_grad():
            for a, m in zip(anchors[f], mean):
                a.grad = m.clone()
            outer[f].step()
            for a in anchors[f]:
                a.grad = None
            for g in live:
                for p, a in zip(params(g, f), anchors[f]):
                    p.copy_(torch.lerp(a, p, weight))

    per = tau // len(fragments)
    for s in range(steps):
        for g in sorted(live):
            x, y = worker_batch(g, s)
            inner[g].zero_grad()
            nn.functional.mse_loss(models[g](x), y).backward()
            inner[g].step()
        step = s + 1
        live -= {g for g, last in last_step.items() if step == last}
        if in_flight is not None and in_flight[1] == step:
            land(in_flight[0], in_flight[2], local_weight)
            in_flight = None
        for f in range(len(fragments)):
            offset = (f + 1) * per - sync_delay
            if step >= offset and (step - offset) % tau == 0:
                in_flight = (f, step + sync_delay, send(f, contributors(step)))
                if sync_delay == 0:
                    land(f, in_flight[2], local_weight)
                    in_flight = None
    if in_flight is not None:
        land(in_flight[0], in_flight[2], local_weight)
    for f in range(len(fragments)):
        land(f, send(f, sorted(live)), 0.0)
    return {g: [p.detach().clone() for p in models[g].parameters()] for g in sorted(live)}
