"""Replica groups that fail and rejoin while training goes on, on torchft (``pip install
lightning_commsgd[ft]``).

Each replica group is its own training job; the rounds *between* groups (DiLoCo's outer steps, local SGD's
averaging) run through a torchft ``Manager``, with a quorum per round. A group that dies is left out of the
next round and the others go on; a restarted group heals from a live peer and joins the next round.

- :class:`ReplicaGroupSettings`, :class:`GroupConnection`, :func:`start_lighthouse` (:mod:`.connect`): where
  and how a group meets the others;
- :class:`QuorumRounds` (:mod:`.quorum`): quorum, all-reduce and commit of one round, counted in the ledger;
- :class:`GroupOuterStep` (:mod:`.groups`): DiLoCo / local SGD between groups on top of them;
- :func:`connect_replica_group` (:mod:`.replica_group`): all of it in one call;
- :class:`ReplicaGroups` (:mod:`.config`): the same as an algorithm config, for the adapters;
- :class:`ReplicaGroupStrategy` (:mod:`lightning_commsgd.strategies.replica_groups`, an adapter: imported
  from here on first use, so that plain loops need no Lightning): one group under the Lightning Trainer (a
  healing group takes its peer's loop position too).

Importing this package does not import torchft; building a connection does (with a clear error when the
extra is missing).
"""

from lightning_commsgd.ft._torchft import TORCHFT_VERSION, require_torchft
from lightning_commsgd.ft.config import ReplicaGroups
from lightning_commsgd.ft.connect import GroupConnection, ReplicaGroupSettings, start_lighthouse
from lightning_commsgd.ft.groups import GroupOuterStep, averaging_outer_optimizer, fingerprint_mismatch
from lightning_commsgd.ft.quorum import (
    Membership,
    QuorumEvent,
    QuorumRounds,
    QuorumUnavailableError,
    ReplicaGroupError,
)
from lightning_commsgd.ft.replica_group import connect_replica_group

__all__ = [
    "TORCHFT_VERSION",
    "GroupConnection",
    "GroupOuterStep",
    "Membership",
    "QuorumEvent",
    "QuorumRounds",
    "QuorumUnavailableError",
    "ReplicaGroupError",
    "ReplicaGroupSettings",
    "ReplicaGroupStrategy",
    "ReplicaGroups",
    "averaging_outer_optimizer",
    "connect_replica_group",
    "fingerprint_mismatch",
    "require_torchft",
    "start_lighthouse",
]


def __getattr__(name: str) -> object:
    # the Trainer adapter lives in the adapter layer; importing this package must not import Lightning
    if name == "ReplicaGroupStrategy":
        from lightning_commsgd.strategies.replica_groups import ReplicaGroupStrategy

        return ReplicaGroupStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
