"""RI-SGD placement and samplers against an independent statement of the reference semantics."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DistributedSampler

from lightning_commsgd.samplers import RedundantBatchSampler, RedundantDistributedSampler, RedundantPlacement

CASES = [(2, 0.0), (2, 0.5), (3, 1 / 3), (3, 0.5), (4, 0.25), (4, 0.3), (4, 0.75), (5, 0.5), (6, 0.1)]


def _held_by(x: int, worker: int, p: int, mu: float) -> bool:
    """The reference, per sample: x lives in shard x % p at position x // p; worker i holds it when the
    shard is its own or one of the next floor(mu p) (mod p), or the next one after those and x's position
    is a multiple of ceil(1/r), r the fractional part of mu p."""
    q = mu * p
    full = math.floor(q + 1e-9)
    r = q - full if q - full > 1e-9 else 0.0
    offset = (x % p - worker) % p
    if offset <= full:
        return True
    return bool(r) and offset == full + 1 and (x // p) % math.ceil(1 / r - 1e-9) == 0


@pytest.mark.parametrize(("p", "mu"), CASES)
@pytest.mark.parametrize("n", [37, 40])
def test_index_sets_and_multiplicity_match_the_reference(p, mu, n):
    placement = RedundantPlacement(n, p, mu)
    for worker in range(p):
        expected = [x for x in range(n) if _held_by(x, worker, p, mu)]
        assert placement.indices(worker).tolist() == expected
    counts = torch.zeros(n, dtype=torch.long)
    for worker in range(p):
        counts[placement.indices(worker)] += 1
    q = mu * p
    full = math.floor(q + 1e-9)
    r = q - full
    for x in range(n):
        extra = 1 if r > 1e-9 and (x // p) % math.ceil(1 / r - 1e-9) == 0 else 0
        assert counts[x] == 1 + full + extra  # the exact multiplicity stated in the module docstring
    assert counts.min() >= 1 + full


def test_zero_redundancy_is_the_strided_split_of_distributed_sampler():
    data = range(40)
    for rank in range(4):
        ours = list(RedundantDistributedSampler(data, 4, rank, redundancy=0.0, shuffle=False))
        theirs = list(DistributedSampler(data, num_replicas=4, rank=rank, shuffle=False))
        assert ours == theirs


@pytest.mark.parametrize(("p", "mu"), CASES)
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_rank_yields_the_same_number_of_batches(p, mu, drop_last):
    data = range(203)
    union = [RedundantDistributedSampler(data, p, r, redundancy=mu, drop_last=drop_last) for r in range(p)]
    assert len({len(list(s)) for s in union}) == 1 and all(len(list(s)) == len(s) for s in union)
    batches = [RedundantBatchSampler(s, batch_size=4 if mu * p % 1 == 0 else 10) for s in union]
    assert len({len(list(b)) for b in batches}) == 1
    for b in batches:
        assert len(list(b)) == len(b)
        assert all(len(batch) == b.samples_per_batch for batch in b)


def test_stratified_batches_draw_the_reference_share_from_each_held_shard():
    p, mu, b = 4, 0.625, 8  # q = 2.5: two full redundant shards and a half (stride 2) shard
    sampler = RedundantDistributedSampler(range(400), p, 1, redundancy=mu)
    batches = list(RedundantBatchSampler(sampler, batch_size=b))
    assert all(len(batch) == b * 3 + 4 for batch in batches)
    for batch in batches:
        shards = torch.tensor(batch) % p
        assert [int((shards == j).sum()) for j in (1, 2, 3, 0)] == [b, b, b, 4]
        assert all((x // p) % 2 == 0 for x in batch if x % p == 0)  # partial part: every 2nd of shard 0
    own = torch.tensor([x for batch in batches for x in batch if x % p == 1])
    assert own.unique().numel() == 100  # one epoch covers the own shard exactly once


def test_shuffling_differs_per_epoch_and_is_reproducible():
    def epoch_order(epoch, seed=0):
        sampler = RedundantDistributedSampler(range(60), 3, 2, redundancy=0.5, seed=seed)
        sampler.set_epoch(epoch)
        return list(RedundantBatchSampler(sampler, batch_size=4))

    assert epoch_order(0) == epoch_order(0)
    assert epoch_order(0) != epoch_order(1)
    assert epoch_order(0) != epoch_order(0, seed=1)
    assert sorted(x for b in epoch_order(0) for x in b) == sorted(x for b in epoch_order(1) for x in b)


@pytest.mark.parametrize("p", [2, 3, 4, 6])
def test_any_single_failure_keeps_full_coverage_with_mu_at_least_one_over_p(p):
    for failed in range(p):
        placement = RedundantPlacement(97, p, 1 / p, failed_workers=[failed])
        assert placement.coverage == 1.0 and placement.lost_shards() == []
        assert placement.assignment()[failed] == (failed - 1) % p  # its shard now lives with its neighbour
        # the survivors train on it: rank r is the r-th surviving original worker
        RedundantDistributedSampler(
            range(97), p - 1, 0, redundancy=1 / p, original_world_size=p, failed_workers=[failed]
        )


def test_without_redundancy_a_failure_loses_a_shard_and_refuses_unless_allowed():
    with pytest.raises(ValueError, match=r"shards with no surviving holder: \[2\]"):
        RedundantDistributedSampler(
            range(40), 3, 0, redundancy=0.0, original_world_size=4, failed_workers=[2]
        )
    sampler = RedundantDistributedSampler(
        range(40), 3, 2, redundancy=0.0, original_world_size=4, failed_workers=[2], min_coverage=0.7
    )
    assert sampler.coverage == pytest.approx(3 / 4) and sampler.worker == 3
    assert set(sampler) <= set(range(3, 40, 4))


def test_batch_sampler_resumes_mid_epoch():
    def make():
        sampler = RedundantDistributedSampler(range(90), 3, 1, redundancy=1 / 3)
        sampler.set_epoch(2)
        return RedundantBatchSampler(sampler, batch_size=5)

    full = list(make())
    interrupted = make()
    iterator = iter(interrupted)
    first = [next(iterator) for _ in range(3)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "position": 3}
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # Lightning sets the (same) epoch again on resume: the position stays
    assert first + list(resumed) == full
    assert list(resumed) == full  # a finished epoch starts again from its first batch


def test_a_loop_that_stops_at_the_last_batch_still_gets_every_epoch():
    """Lightning stops after len() batches without exhausting the iterator; the next epoch must still
    yield all its batches (a bug caught by the Lightning trajectory test)."""
    sampler = RedundantDistributedSampler(range(90), 3, 1, redundancy=1 / 3)
    batches = RedundantBatchSampler(sampler, batch_size=5)
    for epoch in range(3):
        batches.set_epoch(epoch)
        iterator = iter(batches)
        got = [next(iterator) for _ in range(len(batches))]  # never asks for one more
        assert len(got) == len(batches) == 6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"redundancy": -0.1}, "redundancy"),
        ({"redundancy": 0.8}, r"1 - 1/p"),
        ({"redundancy": float("nan")}, "finite"),
        ({"redundancy": 0.25, "failed_workers": [4]}, "failed_workers"),
        ({"redundancy": 0.25, "failed_workers": [0, 1, 2, 3], "original_world_size": 4}, "every worker"),
        ({"redundancy": 0.25, "min_coverage": 1.5}, "min_coverage"),
        ({"redundancy": 0.25, "failed_workers": [1]}, "world size"),  # 4 - 1 survivors but 4 ranks
    ],
)
def test_bad_sampler_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RedundantDistributedSampler(range(40), 4, 0, **kwargs)


def test_dataset_smaller_than_p_and_unusable_batch_sizes():
    with pytest.raises(ValueError, match="fewer than the 4 workers"):
        RedundantDistributedSampler(range(3), 4, 0)
    sampler = RedundantDistributedSampler(range(400), 4, 0, redundancy=0.3)  # r = 0.2
    with pytest.raises(ValueError, match="partial shard would never be sampled"):
        RedundantBatchSampler(sampler, batch_size=4)  # int(4 * 0.2) = 0
    with pytest.raises(ValueError, match="larger than its data"):
        RedundantBatchSampler(RedundantDistributedSampler(range(40), 4, 0, drop_last=True), batch_size=11)
    with pytest.raises(ValueError, match="batch_size"):
        RedundantBatchSampler(sampler, batch_size=0)


@pytest.mark.parametrize(("p", "mu"), CASES)
@pytest.mark.parametrize("drop_last", [False, True])
def test_union_batches_are_the_shuffled_union_in_batches_of_b(p, mu, drop_last):
    data = range(203)
    samplers = [RedundantDistributedSampler(data, p, r, redundancy=mu, drop_last=drop_last) for r in range(p)]
    batchers = [RedundantBatchSampler(s, 8, sampling="union") for s in samplers]
    assert len({len(b) for b in batchers}) == 1
    for sampler, batcher in zip(samplers, batchers):
        batches = list(batcher)
        assert len(batches) == len(batcher) and all(len(batch) == 8 for batch in batches)
        flat = [x for batch in batches for x in batch]
        held = set(sampler.placement.indices(sampler.worker).tolist())
        assert set(flat) <= held
        if drop_last:
            assert len(set(flat)) == len(flat)  # no repeat within an epoch
        else:
            assert set(flat) == held  # the whole union is seen (cycled to fill the last batches)
        # the order is the placement sampler's own shuffled (and cycled) union, batched
        k = min(len(flat), len(sampler))
        assert flat[:k] == list(sampler)[:k]


@pytest.mark.parametrize("sampling", ["stratified", "union"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_heterogeneous_batch_sizes_keep_equal_batch_counts(sampling, drop_last):
    p, mu, sizes = 3, 1 / 3, [4, 8, 6]
    data = range(300)
    batchers = [
        RedundantBatchSampler(
            RedundantDistributedSampler(data, p, r, redundancy=mu, drop_last=drop_last), sizes, sampling
        )
        for r in range(p)
    ]
    own = 100 if sampling == "stratified" else 200  # shard size / held samples per rank
    expected = own // 8 if drop_last else math.ceil(own / 4)  # the largest b sets it / the smallest
    assert [len(b) for b in batchers] == [expected] * p
    for rank, batcher in enumerate(batchers):
        batches = list(batcher)
        assert len(batches) == expected
        per_batch = sizes[rank] * (2 if sampling == "stratified" else 1)
        assert all(len(batch) == per_batch for batch in batches) and batcher.samples_per_batch == per_batch
        flat = [x for batch in batches for x in batch]
        if drop_last:
            assert len(set(flat)) == len(flat)
        if not drop_last and rank == 0:
            held = batcher.sampler.placement.indices(batcher.sampler.worker).tolist()
            assert set(flat) == set(held)  # the smallest b sees its data once per epoch
    with pytest.raises(ValueError, match="3 ranks"):
        RedundantBatchSampler(RedundantDistributedSampler(data, p, 0), [4, 8])
    with pytest.raises(ValueError, match="batch_size"):
        RedundantBatchSampler(RedundantDistributedSampler(data, p, 0), [4, 0, 8])


def test_union_batch_sampler_resumes_mid_epoch():
    def make():
        sampler = RedundantDistributedSampler(range(90), 3, 1, redundancy=0.5)
        sampler.set_epoch(1)
        return RedundantBatchSampler(sampler, 4, sampling="union")

    full = list(make())
    interrupted = make()
    iterator = iter(interrupted)
    first = [next(iterator) for _ in range(5)]
    resumed = make()
    resumed.load_state_dict(interrupted.state_dict())
    resumed.set_epoch(1)
    assert first + list(resumed) == full


# -- issue 18, item 2: one placement across a mu sweep, and each holder its own order ---------------------
def _training_loader_of(strategy, loader):
    """``strategy.process_dataloader`` for the training loader of rank 0 in a 4-process CPU Trainer (built,
    never fitted: only the loader the strategy would hand to the fit loop)."""
    from types import SimpleNamespace

    from lightning.pytorch import Trainer

    Trainer(strategy=strategy, accelerator="cpu", devices=4, logger=False)
    strategy._lightning_module = SimpleNamespace(trainer=SimpleNamespace(training=True))
    return strategy.process_dataloader(loader)


@pytest.mark.parametrize("mu", [0.0, 0.25, 0.5])
def test_a_mu_sweep_keeps_one_fixed_strided_placement(mu):
    """redundancy=0.0 given is the mu = 0 point of the same placement as 0.25 and 0.5 (fixed strided shards,
    not Lightning's globally reshuffled DistributedSampler): rank 0's own part of every batch comes from
    shard 0, in every epoch."""
    from torch.utils.data import DataLoader

    from lightning_commsgd import LocalSGDStrategy

    strategy = LocalSGDStrategy(tau=8, redundancy=mu)
    loader = _training_loader_of(strategy, DataLoader(range(400), batch_size=10))
    batches = loader.batch_sampler
    assert isinstance(batches, RedundantBatchSampler) and batches.sampler.placement.mu == mu
    for epoch in range(2):
        batches.set_epoch(epoch)
        seen = torch.tensor([x for batch in batches for x in batch])
        own = seen[seen % 4 == 0]
        assert sorted(own.tolist()) == list(range(0, 400, 4))  # shard 0, exactly once per epoch
        held = {j for j, _ in batches.sampler.placement.holdings(0)}
        assert set((seen % 4).tolist()) == held  # nothing outside the placement
    assert batches.samples_per_batch == 10 * (1 + int(mu * 4))


def test_lightning_sampler_only_when_no_ri_sgd_option_is_given():
    from torch.utils.data import DataLoader

    from lightning_commsgd import LocalSGDStrategy, RedundancyInfusion

    plain = _training_loader_of(LocalSGDStrategy(tau=8), DataLoader(range(400), batch_size=8))
    assert not isinstance(plain.batch_sampler, RedundantBatchSampler)
    assert LocalSGDStrategy(tau=8).redundancy is None  # no RI-SGD option: no placement
    for given in (
        {"redundancy": 0.0},
        {"redundancy": RedundancyInfusion(sampling="stratified")},
        {"redundancy": RedundancyInfusion(sampling="union")},
    ):
        config = LocalSGDStrategy(tau=8, **given).redundancy
        assert isinstance(config, RedundancyInfusion) and config.mu == 0.0, given
    assert LocalSGDStrategy(tau=8, redundancy=0.0).redundancy == RedundancyInfusion(mu=0.0)
    union = _training_loader_of(
        LocalSGDStrategy(tau=8, redundancy=RedundancyInfusion(sampling="union")),
        DataLoader(range(400), batch_size=8),
    )
    assert union.batch_sampler.sampling == "union"
    assert set(union.batch_sampler.sampler) == set(range(0, 400, 4))  # mu = 0: rank 0's own shard
    # a parameter server has no placement: redundancy=0.0 is an RI-SGD option too, refused by name
    from lightning_commsgd import KSyncSGDStrategy

    with pytest.raises(TypeError, match="unexpected argument 'redundancy'"):
        KSyncSGDStrategy(redundancy=0.0)


@pytest.mark.parametrize(("p", "mu"), [(2, 0.5), (4, 0.75), (4, 0.5), (3, 0.5)])
def test_holders_of_a_shard_draw_it_in_their_own_order(p, mu):
    """Stratified mode: two workers holding shard j do not take the same samples of it at the same step
    (the authors' code shuffles each device's copy of a shard independently). At mu = 1 - 1/p (full
    replication) the p workers' batches are p different batches, not one batch computed p times."""
    data = range(40 * p)
    batches = [
        list(RedundantBatchSampler(RedundantDistributedSampler(data, p, r, redundancy=mu), batch_size=4))
        for r in range(p)
    ]
    placement = RedundantPlacement(len(data), p, mu)
    for j in range(p):
        holders = [w for w in range(p) if any(h == j for h, _ in placement.holdings(w))]
        for t in range(len(batches[0])):
            parts = [tuple(sorted(x for x in batches[w][t] if x % p == j)) for w in holders]
            parts = [part for part in parts if part]
            assert len(set(parts)) == len(parts), (j, t, parts)  # no two holders share a step's draw
    if mu == 1 - 1 / p:
        for t in range(len(batches[0])):
            assert len({tuple(sorted(batches[r][t])) for r in range(p)}) == p
    for r in range(p):  # each worker still sees each complete shard it holds exactly once per epoch
        flat = [x for batch in batches[r] for x in batch]
        for j, complete in placement.holdings(r):
            if complete:
                assert sorted(x for x in flat if x % p == j) == placement.shard(j).tolist()


def test_redundant_order_resumes_mid_epoch_per_worker():
    """The per-worker order is a function of (seed, epoch, original worker): a resumed rank continues it."""

    def make(rank):
        sampler = RedundantDistributedSampler(range(120), 4, rank, redundancy=0.75)
        sampler.set_epoch(3)
        return RedundantBatchSampler(sampler, batch_size=5)

    for rank in range(4):
        full = list(make(rank))
        interrupted = make(rank)
        iterator = iter(interrupted)
        first = [next(iterator) for _ in range(2)]
        resumed = make(rank)
        resumed.load_state_dict(interrupted.state_dict())
        resumed.set_epoch(3)
        assert first + list(resumed) == full
