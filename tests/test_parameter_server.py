"""ParameterServer decisions, the staleness-aware learning rate and the optimizer clone, in one process."""

from __future__ import annotations

import pytest
import torch

from lightning_commsgd.algorithms.parameter_server import (
    ParameterServer,
    StalenessAwareLR,
    TooFewWorkersError,
    clone_optimizer,
    clone_scheduler,
)


def sgd_server(mode: str, k: int, workers=(1, 2, 3), lr: float = 0.1, staleness=None, **kwargs):
    w = torch.zeros(3)
    optimizer = torch.optim.SGD([w], lr=lr)
    return ParameterServer(
        [w], optimizer, k=k, mode=mode, workers=workers, staleness_lr=staleness, **kwargs
    ), w


def test_staleness_aware_rate_is_min_of_c_over_squared_distance_and_eta_max():
    rule = StalenessAwareLR(C=0.5, eta_max=0.2)
    assert rule.rate(0.0, lr=1.0) == 0.2  # fresh gradient: eta_max
    assert rule.rate(1.0, lr=1.0) == 0.2  # C / 1 = 0.5 > 0.2
    assert rule.rate(10.0, lr=1.0) == pytest.approx(0.05)  # C / 10
    assert StalenessAwareLR(C=0.5).rate(10.0, lr=0.01) == 0.01  # eta_max = the optimizer's lr
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="C must be"):
            StalenessAwareLR(C=bad)
    with pytest.raises(ValueError, match="eta_max must be"):
        StalenessAwareLR(C=1.0, eta_max=0.0)


def test_async_staleness_rate_on_a_scripted_model_history():
    """Async SGD (k = 1), plain SGD: each update is w - eta_j g with eta_j from the distance between the
    current model and the one the gradient was computed on, computed here by hand."""
    rule = StalenessAwareLR(C=0.02, eta_max=0.5)
    server, w = sgd_server("async", 1, staleness=rule, lr=0.5)
    history = {0: w.clone()}
    g1, g2, g3 = torch.tensor([1.0, 0, 0]), torch.tensor([0, 2.0, 0]), torch.tensor([0, 0, 3.0])
    server.offer(1, 0, g1)  # fresh: eta = 0.5
    history[1] = w.clone()
    assert torch.allclose(w, history[0] - 0.5 * g1)
    server.offer(2, 0, g2)  # computed on w_0, now w_1: distance^2 = 0.25, eta = min(0.02/0.25, 0.5) = 0.08
    assert torch.allclose(w, history[1] - 0.08 * g2)
    w2 = w.clone()
    server.offer(3, 0, g3)  # on w_0, now w_2: distance^2 = 0.25 + 0.16^2
    d2 = float((w2 - history[0]).pow(2).sum())
    assert torch.allclose(w, w2 - min(0.02 / d2, 0.5) * g3)
    assert [u.staleness for u in server.log] == [[0], [1], [2]]
    assert server.log[1].lr_factors == [[pytest.approx(0.08 / 0.5)]]


def test_ksync_drops_late_gradients_and_sends_every_worker_the_new_model():
    server, w = sgd_server("sync", 2)
    assert server.offer(1, 0, torch.ones(3)).send_to == ()
    reply = server.offer(3, 0, 3 * torch.ones(3))
    assert reply.updated and reply.send_to == (1, 2, 3) and reply.version == 1
    assert torch.allclose(w, -0.1 * 2 * torch.ones(3))  # mean of the first two
    late = server.offer(2, 0, 100 * torch.ones(3))  # computed on w_0: dropped
    assert not late.updated and late.send_to == () and server.dropped == 1
    assert torch.allclose(w, -0.2 * torch.ones(3))


def test_kasync_answers_only_the_k_contributors_and_accepts_stale_gradients():
    server, _ = sgd_server("async", 2)
    server.offer(1, 0, torch.ones(3))
    first = server.offer(2, 0, torch.ones(3))
    assert first.send_to == (1, 2) and server.version == 1
    server.offer(3, 0, torch.ones(3))  # stale by one
    second = server.offer(1, 1, torch.ones(3))
    assert second.send_to == (1, 3) and server.log[-1].staleness == [1, 0]


def test_kbatch_async_answers_at_once_and_counts_mini_batches_from_any_worker():
    server, _ = sgd_server("batch", 3, workers=(1, 2))
    replies = [
        server.offer(1, 0, torch.ones(3)),
        server.offer(1, 0, torch.ones(3)),
        server.offer(2, 0, torch.ones(3)),
    ]
    assert [r.send_to for r in replies] == [(1,), (1,), (2,)]
    assert [r.updated for r in replies] == [False, False, True]
    assert server.log[0].contributors == [(1, 0), (1, 0), (2, 0)]


def test_max_updates_stops_every_worker_once():
    server, _ = sgd_server("async", 1, max_updates=1)
    reply = server.offer(1, 0, torch.ones(3))
    assert reply.stop and reply.send_to == (1,)
    assert server.offer(2, 0, torch.ones(3)).stop  # the next push is answered with stop, unused
    assert server.version == 1 and server.active == {3}
    assert server.offer(1, 1, torch.ones(3)).send_to == ()  # already stopped: ignored


def test_losing_a_worker_continues_async_and_fails_ksync_with_too_few():
    asyncs, _ = sgd_server("async", 2)
    asyncs.lose(3, "Connection closed by peer")
    asyncs.offer(1, 0, torch.ones(3))
    assert asyncs.offer(2, 0, torch.ones(3)).updated
    ksync, _ = sgd_server("sync", 3)
    with pytest.raises(
        TooFewWorkersError, match=r"K-sync SGD \(k=3\) needs 3 live worker\(s\).*rank 2 \(boom\)"
    ):
        ksync.lose(2, "boom")
    batch, _ = sgd_server("batch", 5, workers=(1, 2))
    batch.lose(1, "gone")  # one worker can still make every update
    with pytest.raises(TooFewWorkersError):
        batch.lose(2, "gone")


def test_leaving_workers_end_training_normally():
    server, _ = sgd_server("sync", 2)
    server.offer(1, 0, torch.ones(3))
    assert server.leave(3).send_to == ()  # two workers still make an update
    reply = server.leave(2)
    assert reply.stop and reply.send_to == (1,) and server.finished


@pytest.mark.parametrize(
    ("mode", "k", "error", "match"),
    [
        ("sync", 0, ValueError, r"k must be in \[1, 3\]"),
        ("async", 4, ValueError, r"k must be in \[1, 3\]"),
        ("batch", 0, ValueError, "k must be >= 1"),
        ("sync", 2.0, TypeError, "k must be an integer"),
        ("k-sync", 2, ValueError, "mode must be one of"),
    ],
)
def test_bad_variants_are_refused(mode, k, error, match):
    with pytest.raises(error, match=match):
        sgd_server(mode, k)


def test_clone_optimizer_keeps_groups_and_hyperparameters_and_the_scheduler_follows_the_clone():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD(
        [{"params": [a], "weight_decay": 0.1}, {"params": [b], "lr": 0.5}], lr=0.2, momentum=0.9
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    a.grad, b.grad = torch.ones(2), torch.ones(1)
    opt.step()  # the original has momentum state: the clone must start empty
    copies = [a.detach().clone(), b.detach().clone()]
    clone = clone_optimizer(opt, copies)
    assert [g["params"][0] is c for g, c in zip(clone.param_groups, copies)] == [True, True]
    assert [g["weight_decay"] for g in clone.param_groups] == [0.1, 0]
    assert [g["lr"] for g in clone.param_groups] == [0.2, 0.5] and not clone.state
    server_sched = clone_scheduler(sched, opt, clone)
    clone.step()  # (no gradients: nothing moves) the server steps its optimizer, then its scheduler
    server_sched.step()
    assert [g["lr"] for g in clone.param_groups] == [0.1, 0.25]
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.5]  # the original is untouched
    with pytest.raises(ValueError, match="match the optimizer's parameters"):
        clone_optimizer(opt, copies[:1])


def test_exponential_delays_have_mean_one_over_mu_and_a_stream_per_rank():
    """Y ~ Exp(mu): the sample mean of 4000 draws is within 4 standard errors of 1/mu (sd = 1/mu), the
    fraction above the median ln2/mu is about 1/2, the same seed and rank repeat the stream and ranks
    differ."""
    import math

    from lightning_commsgd.algorithms.straggler import ExponentialDelay

    mu, n = 20.0, 4000
    delay = ExponentialDelay(mu, seed=3, rank=1)
    draws = [delay.next() for _ in range(n)]
    assert abs(sum(draws) / n - 1 / mu) < 4 * (1 / mu) / math.sqrt(n)
    above = sum(d > math.log(2) / mu for d in draws) / n
    assert abs(above - 0.5) < 4 * 0.5 / math.sqrt(n)
    assert min(draws) > 0
    again = ExponentialDelay(mu, seed=3, rank=1)
    assert [again.next() for _ in range(5)] == draws[:5]
    other = ExponentialDelay(mu, seed=3, rank=2)
    assert [other.next() for _ in range(5)] != draws[:5]
    with pytest.raises(ValueError, match="mu must be"):
        ExponentialDelay(0.0)
