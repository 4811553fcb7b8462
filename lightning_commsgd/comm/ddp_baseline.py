"""The DDP baseline: Lightning's ``DDPStrategy`` traffic, counted in a Communicator's ledger.

Its one job: a DDP communication hook equal to DDP's default (a mean all-reduce of each gradient bucket)
that records every bucket, so that DDP can be compared side by side with the package's strategies.
"""

# No ``from __future__ import annotations`` here: DDP checks a hook's annotations against
# ``dist.GradBucket`` and ``torch.futures.Future[torch.Tensor]`` themselves, and postponed annotations are
# strings.

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from lightning_commsgd.comm.communicator import Communicator

__all__ = ["counting_ddp_allreduce_hook"]


def counting_ddp_allreduce_hook(
    communicator: Communicator,
) -> Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]:
    """A DDP communication hook equal to DDP's default (mean all-reduce of each gradient bucket over
    ``communicator``'s group) that records every bucket in ``communicator``'s ledger under the tag
    ``"ddp_gradients"``.

    Register with ``ddp_model.register_comm_hook(None, counting_ddp_allreduce_hook(communicator))`` to count
    what Lightning's ``DDPStrategy`` sends, for side-by-side comparisons.
    """

    def hook(_state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        start = time.perf_counter()
        future = communicator._all_reduce_sum_async(buffer).get_future()
        nbytes = buffer.numel() * buffer.element_size()

        def finish(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            communicator.ledger.record(
                "ddp_gradients",
                sent=nbytes,
                received=nbytes,
                seconds=time.perf_counter() - start,
                kind="all_reduce",
            )
            return fut.value()[0].div_(communicator.world_size)

        return future.then(finish)

    return hook
