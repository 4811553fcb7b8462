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
