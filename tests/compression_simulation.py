"""Single-process references of DORE and compressed-gradient SGD, written from the papers' pseudocode
independently of the package's algorithm classes (they share only the compressors, tested on their own).

All n workers hold the same model x_hat, so one network suffices: worker i's gradient is taken on x_hat
with worker i's batch, and worker i draws from its own generator (seed + 1 + i), the master from ``seed``,
exactly the streams the package uses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["simulate_compressed_sgd", "simulate_dore", "simulate_sgd_on_mean_gradient"]


def _flat(tensors) -> Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def _set(params: Sequence[Tensor], flat: Tensor, grad: bool = False) -> None:
    offset = 0
    with torch.no_grad():
        for p in params:
            chunk = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if grad:
                p.grad = chunk.clone()
            else:
                p.copy_(chunk)


def _grads(net: nn.Module, batches, loss_fn, t: int) -> list[Tensor]:
    out = []
    for worker_batches in batches:
        net.zero_grad()
        loss_fn(net, worker_batches[t]).backward()
        out.append(_flat(p.grad if p.grad is not None else torch.zeros_like(p) for p in net.parameters()))
    return out


def simulate_dore(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    batches: Sequence[Sequence],
    loss_fn: Callable,
    compressor,
    model_compressor,
    *,
    alpha: float,
    beta: float,
    eta: float,
    seed: int = 0,
) -> list[Tensor]:
    """x_hat (fp32, flat) after each step of DORE with ``len(batches)`` workers."""
    n = len(batches)
    net = copy.deepcopy(model)
    params = list(net.parameters())
    optimizer = make_optimizer(net)
    x_hat = _flat(params)
    d = x_hat.numel()
    h_workers = [torch.zeros(d) for _ in range(n)]
    h, e = torch.zeros(d), torch.zeros(d)
    worker_gen = [torch.Generator().manual_seed(seed + 1 + i) for i in range(n)]
    master_gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(len(batches[0])):
        grads = _grads(net, batches, loss_fn, t)
        deltas = [
            compressor.decode(compressor.encode(g - h_i, gen), d)
            for g, h_i, gen in zip(grads, h_workers, worker_gen)
        ]
        mean = torch.zeros(d)
        for delta in deltas:
            mean += delta
        mean /= n
        g_hat = h + mean
        h += alpha * mean
        _set(params, x_hat)
        _set(params, g_hat, grad=True)
        optimizer.step()
        q = _flat(params) - x_hat + eta * e
        q_hat = model_compressor.decode(model_compressor.encode(q, master_gen), d)
        e = q - q_hat
        x_hat += beta * q_hat
        for i in range(n):
            h_workers[i] += alpha * deltas[i]
        _set(params, x_hat)
        out.append(x_hat.clone())
    return out


def simulate_compressed_sgd(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    batches: Sequence[Sequence],
    loss_fn: Callable,
    compressor,
    *,
    error_feedback: bool,
    server_compressor=None,
    seed: int = 0,
) -> list[Tensor]:
    """x after each step of QSGD (no error feedback) / MEM-SGD (error feedback) / DoubleSqueeze (with a
    server compressor and its own error feedback)."""
    n = len(batches)
    net = copy.deepcopy(model)
    params = list(net.parameters())
    optimizer = make_optimizer(net)
    d = _flat(params).numel()
    memory = [torch.zeros(d) for _ in range(n)]
    gens = [torch.Generator().manual_seed(seed + 1 + i) for i in range(n)]
    master_gen = torch.Generator().manual_seed(seed)
    delta = torch.zeros(d)
    out = []
    for t in range(len(batches[0])):
        grads = _grads(net, batches, loss_fn, t)
        total = torch.zeros(d)
        for i in range(n):
            v = grads[i] + memory[i] if error_feedback else grads[i]
            compressed = compressor.decode(compressor.encode(v, gens[i]), d)
            if error_feedback:
                memory[i] = v - compressed
            total += compressed
        aggregate = total / n
        if server_compressor is not None:
            v = aggregate + delta
            aggregate = server_compressor.decode(server_compressor.encode(v, master_gen), d)
            delta = v - aggregate
        _set(params, aggregate, grad=True)
        optimizer.step()
        out.append(_flat(params))
    return out


def simulate_sgd_on_mean_gradient(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    batches: Sequence[Sequence],
    loss_fn: Callable,
) -> list[Tensor]:
    """Plain synchronous SGD: the optimizer steps with (1/n) sum_i g_i."""
    net = copy.deepcopy(model)
    params = list(net.parameters())
    optimizer = make_optimizer(net)
    out = []
    for t in range(len(batches[0])):
        grads = _grads(net, batches, loss_fn, t)
        _set(params, torch.stack(grads).mean(0), grad=True)
        optimizer.step()
        out.append(_flat(params))
    return out
