"""The resumable training loader (lightning_commsgd.resumable): where a resumed epoch starts."""

from __future__ import annotations

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, TensorDataset

from lightning_commsgd.resumable import ResumableBatchSampler, resumable_loader

DATA = TensorDataset(torch.arange(40.0))


def batches(sampler: ResumableBatchSampler) -> list[list[int]]:
    return [list(b) for b in sampler]


def make(epoch: int = 0) -> ResumableBatchSampler:
    inner = DistributedSampler(DATA, num_replicas=2, rank=1, shuffle=True, seed=0)
    inner.set_epoch(epoch)
    return ResumableBatchSampler(BatchSampler(inner, batch_size=4, drop_last=False))


def test_a_resumed_epoch_continues_at_the_next_batch_and_the_next_epoch_is_whole():
    full = make(2)
    whole = batches(full)
    assert len(whole) == 5 and full.state_dict() == {"epoch": 2, "position": 5}
    resumed = make(2)
    resumed.load_state_dict({"epoch": 2, "position": 3})
    assert batches(resumed) == whole[3:] and resumed.position == 5
    resumed.sampler.set_epoch(3)  # Lightning sets the next epoch on the inner sampler
    assert batches(resumed) == batches(make(3))


def test_nothing_is_skipped_for_another_epoch_or_a_finished_one():
    other = make(1)
    other.load_state_dict({"epoch": 0, "position": 3})
    assert batches(other) == batches(make(1))
    finished = make(0)
    finished.load_state_dict({"epoch": 0, "position": 5})  # saved at the epoch's last batch
    assert batches(finished) == batches(make(0))


def test_the_loader_keeps_its_settings_and_only_map_style_plain_loaders_are_wrapped():
    loader = DataLoader(DATA, batch_size=4, shuffle=True, collate_fn=lambda b: b, drop_last=True)
    wrapped = resumable_loader(loader)
    assert wrapped is not None and isinstance(wrapped.batch_sampler, ResumableBatchSampler)
    assert wrapped.collate_fn is loader.collate_fn and len(wrapped) == len(loader) == 10

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(3))

    class MyLoader(DataLoader):
        pass

    assert resumable_loader(DataLoader(Stream(), batch_size=2)) is None
    assert resumable_loader(MyLoader(DATA, batch_size=4)) is None
