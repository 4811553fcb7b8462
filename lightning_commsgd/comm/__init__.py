"""Communication: the one place in the package that calls ``torch.distributed``, one job per module.

- :mod:`~lightning_commsgd.comm.communicator`: :class:`Communicator`, counted collectives and
  point-to-point messages over one process group; its sub-groups (:meth:`Communicator.split`,
  :meth:`Communicator.duplicate`) are Communicators too.
- :mod:`~lightning_commsgd.comm.lowp`: the message schedule of the low-precision mean
  (:meth:`Communicator.all_reduce_mean_lowp_`).
- :mod:`~lightning_commsgd.comm.background`: rounds in flight (:class:`PendingMean`,
  :class:`PendingLowpMean` and its helper thread).
- :mod:`~lightning_commsgd.comm.lifecycle`: the process group's end (:func:`shutdown_process_group`,
  :func:`destroy_process_group_at_exit`, :func:`skip_group_destruction_at_exit`).
- :mod:`~lightning_commsgd.comm.varlen`: collectives of byte messages whose length differs between ranks
  (entropy-coded payloads).
- :mod:`~lightning_commsgd.comm.ddp_baseline`: :func:`counting_ddp_allreduce_hook`, Lightning's
  ``DDPStrategy`` traffic counted for comparisons.
"""

from lightning_commsgd.comm.background import PendingLowpMean, PendingMean
from lightning_commsgd.comm.communicator import Communicator, ReduceKind
from lightning_commsgd.comm.ddp_baseline import counting_ddp_allreduce_hook
from lightning_commsgd.comm.lifecycle import (
    destroy_process_group_at_exit,
    shutdown_process_group,
    skip_group_destruction_at_exit,
)
from lightning_commsgd.comm.varlen import all_gather_varlen, broadcast_varlen, gather_varlen

__all__ = [
    "Communicator",
    "PendingLowpMean",
    "PendingMean",
    "ReduceKind",
    "all_gather_varlen",
    "broadcast_varlen",
    "counting_ddp_allreduce_hook",
    "destroy_process_group_at_exit",
    "gather_varlen",
    "shutdown_process_group",
    "skip_group_destruction_at_exit",
]
