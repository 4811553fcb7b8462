"""Gossip topologies: the (possibly time-varying) mixing matrix ``W`` of decentralized SGD.

Convention (Cooperative SGD, Wang & Joshi): the ``m`` local models are the columns of ``X`` (``d x m``)
and one gossip round is ``X <- X W``, so node ``i``'s new model is ``sum_j W[j, i] x_j``. Hence

- column ``i`` of ``W`` holds the weights node ``i`` applies;
- node ``i`` *receives* from its in-neighbours ``{j != i : W[j, i] > 0}``;
- node ``i`` *sends* to its out-neighbours ``{j != i : W[i, j] > 0}``.

For a symmetric ``W`` (every undirected graph here) the two lists coincide; the exponential graphs are
directed, and there the orientation matters.

Every ``W`` must be doubly stochastic. Both halves are needed: columns summing to 1 make each new model
a weighted average (a consensus ``X = x 1^T`` is left unchanged), rows summing to 1 make the network
average preserved (``X W 1/m = X 1/m``). Symmetry is not required; a symmetric ``W`` is the common case.

The spectral quantity of the paper is ``zeta`` (see :attr:`Topology.zeta`): the smaller, the faster
gossip contracts the models towards their average; sparser graphs have a larger ``zeta``.

Named topologies (:func:`make_topology`): ``"ring"``, ``"torus"``, ``"complete"``, ``"star"`` (undirected,
Metropolis-Hastings or uniform weights), ``"exponential"`` and ``"one_peer_exponential"`` (Ying et al.,
"Exponential Graph is Provably Efficient for Decentralized Deep Training", NeurIPS 2021; weights as in
the authors' Bluefog ``topology_util.py``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["TOPOLOGY_NAMES", "WEIGHT_RULES", "Topology", "make_topology"]

#: The names :func:`make_topology` accepts.
TOPOLOGY_NAMES: tuple[str, ...] = ("complete", "exponential", "one_peer_exponential", "ring", "star", "torus")
#: The edge-weight rules for the undirected named topologies.
WEIGHT_RULES: tuple[str, ...] = ("metropolis", "uniform")

# Tolerance on the row and column sums of a user matrix: loose enough for weights typed by hand as
# decimals or computed in float32, tight enough that the average drifts by < 1e-6 per round.
_STOCHASTIC_ATOL = 1e-6


def _check_int(value: Any, name: str, minimum: int, meaning: str) -> int:
    # bool is an int subclass, but True as a world size or rank is a bug, not a request.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Arg `{name}` must be an int >= {minimum} ({meaning}), got {value!r}.")
    if value < minimum:
        raise ValueError(f"Arg `{name}` must be an int >= {minimum} ({meaning}), got {value}.")
    return int(value)


def _check_phase(phase: Any) -> int:
    # Any int is accepted (it is taken modulo num_phases), so a caller can pass its round counter.
    if isinstance(phase, bool) or not isinstance(phase, numbers.Integral):
        raise TypeError(f"Arg `phase` must be an int (taken modulo num_phases), got {phase!r}.")
    return int(phase)


def _as_matrix(value: Any, label: str) -> torch.Tensor:
    """``value`` as a float64 CPU tensor that is 2-D and square (the first property checked)."""
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise TypeError(f"{label} must be a real matrix, got dtype {value.dtype}.")
        matrix = value.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            matrix = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"{label} must be a 2-D square matrix of real numbers; could not read it: {err}"
            ) from err
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{label} must be a 2-D square matrix, got shape {tuple(matrix.shape)}.")
    return matrix.clone()


def _check_entries(matrix: torch.Tensor, label: str) -> None:
    """Finite, non-negative, doubly stochastic: checked in this order, the first failure raised."""
    bad = (~torch.isfinite(matrix)).nonzero()
    if len(bad):
        i, j = bad[0].tolist()
        raise ValueError(f"{label} must have finite entries, got {label}[{i}, {j}] = {matrix[i, j].item()}.")
    negative = (matrix < 0).nonzero()
    if len(negative):
        i, j = negative[0].tolist()
        raise ValueError(
            f"{label} must be non-negative (weights >= 0), got {label}[{i}, {j}] = "
            f"{matrix[i, j].item():.10g}."
        )
    for axis, what in ((1, "row"), (0, "column")):
        sums = matrix.sum(dim=axis)
        off = ((sums - 1.0).abs() > _STOCHASTIC_ATOL).nonzero()
        if len(off):
            k = int(off[0])
            raise ValueError(
                f"{label} is not doubly stochastic: {what} {k} sums to {sums[k].item():.10g} "
                f"(every row and column must sum to 1 within {_STOCHASTIC_ATOL:g})."
            )


def _reachable(adjacency: list[list[int]], start: int) -> set[int]:
    seen, stack = {start}, [start]
    while stack:
        for nxt in adjacency[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _fmt_nodes(nodes: set[int]) -> str:
    return "{" + ",".join(str(n) for n in sorted(nodes)) + "}"


def _check_connected(support: torch.Tensor, label: str) -> None:
    """Raise unless the directed graph ``j -> i`` for ``support[j, i]`` (information flows from ``j`` to
    ``i``) is strongly connected. One node is trivially connected."""
    m = support.shape[0]
    forward: list[list[int]] = [[] for _ in range(m)]
    backward: list[list[int]] = [[] for _ in range(m)]
    for j, i in support.nonzero().tolist():
        if i != j:
            forward[j].append(i)
            backward[i].append(j)
    unreached = set(range(m)) - _reachable(forward, 0)
    if unreached:
        raise ValueError(
            f"{label} is not connected: nodes {_fmt_nodes(unreached)} cannot be reached from node 0 "
            "(the directed graph of its non-zero entries must be strongly connected)."
        )
    # For a doubly stochastic matrix every weakly connected component is strongly connected, so this
    # cannot fire after _check_entries; it stays so the function means what its name says on its own.
    unreaching = set(range(m)) - _reachable(backward, 0)
    if unreaching:
        raise ValueError(
            f"{label} is not connected: node 0 cannot be reached from nodes {_fmt_nodes(unreaching)} "
            "(the directed graph of its non-zero entries must be strongly connected)."
        )


def _contraction(matrix: torch.Tensor) -> float:
    """``zeta`` of one doubly stochastic matrix, see :attr:`Topology.zeta`."""
    m = matrix.shape[0]
    # W 1 = 1 and 1^T W = 1^T, so W = J + (W - J) splits orthogonally along 1: the spectrum (symmetric
    # case) or singular values (general case) of W are {1} plus those of W - J on 1's complement.
    # Working with W - J avoids deciding which of several unit-modulus eigenvalues is "the" 1.
    deviation = matrix - torch.full_like(matrix, 1.0 / m)
    if torch.equal(matrix, matrix.T):
        return float(torch.linalg.eigvalsh(deviation).abs().max())
    return float(torch.linalg.svdvals(deviation).max())


class Topology:
    """A (possibly time-varying) mixing matrix over ``world_size`` nodes.

    A static topology has one matrix ``W``; a time-varying one cycles through ``W_0, ..., W_{K-1}``
    (``K = num_phases``) and gossip round ``k`` mixes with ``W_{k mod K}``, i.e. ``X <- X W_k``. The phase
    is therefore the gossip-round counter, not the optimizer step.

    Every ``W_k`` must be finite, non-negative and doubly stochastic (rows and columns sum to 1 within
    1e-6), and the union over the cycle of the graphs of their non-zero entries must be strongly
    connected (a single ``W_k`` of a time-varying topology need not be: one-peer exponential graphs are
    not). These are checked here, so every :class:`Topology` is valid.

    Args:
        matrices: ``W`` as a 2-D ``m x m`` tensor, or the cycle ``W_0, ..., W_{K-1}`` as a sequence of
            such tensors or a ``K x m x m`` tensor. Stored as float64 copies.
        name: a label for :meth:`__repr__` (``"custom"`` for user matrices).

    Raises:
        ValueError: a matrix is not square, the matrices differ in size, an entry is not finite or
            negative, a row or column sum is off, or the graph is not connected.
    """

    def __init__(self, matrices: torch.Tensor | Sequence[torch.Tensor], *, name: str = "custom") -> None:
        if not isinstance(name, str):
            raise TypeError(f"Arg `name` must be a str, got {name!r}.")
        if isinstance(matrices, torch.Tensor) and matrices.dim() == 3:
            matrices = list(matrices.unbind(0))
        elif isinstance(matrices, torch.Tensor) or not isinstance(matrices, Sequence) or not matrices:
            matrices = [matrices]  # a single W (or something _as_matrix will reject with a clear message)
        elif not isinstance(matrices[0], torch.Tensor):
            matrices = [matrices]  # a nested list of numbers is one matrix, not a cycle
        labels = ["W"] if len(matrices) == 1 else [f"W_{k}" for k in range(len(matrices))]
        phases = [_as_matrix(w, label) for w, label in zip(matrices, labels)]
        m = phases[0].shape[0]
        if m == 0:
            raise ValueError("W must have at least one node (size >= 1), got a 0x0 matrix.")
        for w, label in zip(phases, labels):
            if w.shape[0] != m:
                raise ValueError(f"{label} is {w.shape[0]}x{w.shape[0]} but {labels[0]} is {m}x{m}.")
            _check_entries(w, label)
        union = torch.stack(phases).gt(0).any(dim=0)
        _check_connected(union, "W" if len(phases) == 1 else "the union of W_0 ... W_{K-1}")

        self.name = name
        self._phases = phases
        # Neighbour lists are asked for every gossip round; the matrices never change, so build them once.
        self._in: list[list[list[tuple[int, float]]]] = []
        self._out: list[list[list[int]]] = []
        for w in phases:
            rows = w.tolist()
            self._in.append(
                [[(j, rows[j][i]) for j in range(m) if j != i and rows[j][i] > 0] for i in range(m)]
            )
            self._out.append([[j for j in range(m) if j != i and rows[i][j] > 0] for i in range(m)])
        self._zeta: float | None = None

    @property
    def world_size(self) -> int:
        """The number of nodes ``m``."""
        return self._phases[0].shape[0]

    @property
    def num_phases(self) -> int:
        """``K``: 1 for a static graph, else the number of distinct ``W_k`` (the cycle length)."""
        return len(self._phases)

    def _index(self, phase: int) -> int:
        return _check_phase(phase) % self.num_phases

    def _rank(self, rank: Any) -> int:
        rank = _check_int(rank, "rank", 0, "a node of the graph")
        if rank >= self.world_size:
            raise ValueError(f"Arg `rank` must be in [0, {self.world_size - 1}], got {rank}.")
        return rank

    def weights(self, phase: int = 0) -> torch.Tensor:
        """``W_k`` for ``k = phase mod num_phases``: a float64 ``m x m`` copy (``X <- X W_k``).

        Args:
            phase: the gossip-round counter ``k`` (any int).
        """
        return self._phases[self._index(phase)].clone()

    def in_neighbours(self, rank: int, phase: int = 0) -> list[tuple[int, float]]:
        """Whom ``rank`` (node ``i``) receives from in round ``phase``, with the weight it applies.

        Args:
            rank: the node ``i``, in ``[0, m)``.
            phase: the gossip-round counter ``k`` (any int).

        Returns:
            ``[(j, W_k[j, i])]`` for every ``j != i`` with ``W_k[j, i] > 0``, sorted by ``j``. Together
            with :meth:`self_weight` these are column ``i`` of ``W_k``.
        """
        return list(self._in[self._index(phase)][self._rank(rank)])

    def out_neighbours(self, rank: int, phase: int = 0) -> list[int]:
        """Whom ``rank`` (node ``i``) sends its model to in round ``phase``.

        Args:
            rank: the node ``i``, in ``[0, m)``.
            phase: the gossip-round counter ``k`` (any int).

        Returns:
            every ``j != i`` with ``W_k[i, j] > 0`` (row ``i`` of ``W_k``), sorted.
        """
        return list(self._out[self._index(phase)][self._rank(rank)])

    def self_weight(self, rank: int, phase: int = 0) -> float:
        """``W_k[i, i]``: the weight node ``i = rank`` gives its own model in round ``phase``.

        Args:
            rank: the node ``i``, in ``[0, m)``.
            phase: the gossip-round counter ``k`` (any int).
        """
        rank = self._rank(rank)
        return float(self._phases[self._index(phase)][rank, rank])

    def max_degree(self, phase: int | None = None) -> int:
        """The largest out-degree (models one node sends per round), for byte accounting.

        Args:
            phase: the gossip-round counter ``k``; ``None`` for the maximum over all phases.
        """
        indices = range(self.num_phases) if phase is None else [self._index(phase)]
        return max(len(out) for k in indices for out in self._out[k])

    @property
    def zeta(self) -> float:
        """The paper's ``zeta``: how much one mixing (one cycle, if time-varying) contracts the models
        towards their average; in ``[0, 1]``, ``< 1`` for the named topologies with ``m > 1``.

        For a static symmetric ``W`` it is ``max(|lambda_2|, |lambda_m|)``: the second largest eigenvalue
        modulus (eigenvalues sorted by modulus, the largest is 1). For a non-symmetric ``W`` it is the
        second largest *singular value* ``sigma_2(W)``, because that, not the eigenvalue modulus, bounds
        the contraction ``||X W - xbar 1^T||_F <= sigma_2(W) ||X - xbar 1^T||_F`` for a doubly stochastic
        ``W``. Both are ``||W - 11^T/m||_2``; they agree for normal ``W`` (e.g. the circulant exponential
        graph). For a time-varying topology it is the ``zeta`` (always by singular values unless the
        product is symmetric) of the product over one cycle, ``W_0 W_1 ... W_{K-1}`` (the order of
        ``X <- X W_0``, then ``X W_0 W_1``, ...). ``m = 1`` gives 0.
        """
        if self._zeta is None:
            product = self._phases[0]
            for w in self._phases[1:]:
                product = product @ w
            self._zeta = _contraction(product)
        return self._zeta

    def __repr__(self) -> str:
        return (
            f"Topology(name={self.name!r}, world_size={self.world_size}, num_phases={self.num_phases}, "
            f"max_degree={self.max_degree()}, zeta={self.zeta:.4g})"
        )


def _undirected(name: str, neighbours: list[set[int]], rule: str) -> Topology:
    """``W`` of an undirected graph from each node's neighbour set, with ``rule``'s edge weights."""
    m = len(neighbours)
    degree = [len(n) for n in neighbours]
    if rule == "uniform" and len(set(degree)) > 1:
        raise ValueError(
            f"Arg `weights`='uniform' needs a regular graph (every node of equal degree); {name} with "
            f"world size {m} has degrees {min(degree)}..{max(degree)}. Use weights='metropolis'."
        )
    w = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        for j in neighbours[i]:
            # Metropolis-Hastings: symmetric by construction and each row's off-diagonal sum is
            # d_i / (1 + max(...)) < 1, so W_ii > 0 on any graph. Uniform 1/(d + 1) is the same on
            # regular graphs only (ring: 1/3), which is why it is restricted to them.
            w[i, j] = 1.0 / (1 + max(degree[i], degree[j])) if rule == "metropolis" else 1.0 / (degree[i] + 1)
        w[i, i] = 1.0 - w[i].sum()
    return Topology(w, name=name)


def _ring(m: int) -> list[set[int]]:
    return [{(i + 1) % m, (i - 1) % m} - {i} for i in range(m)]


def _torus(m: int) -> list[set[int]]:
    side = math.isqrt(m)
    if side * side != m:
        below, above = side * side, (side + 1) ** 2
        raise ValueError(
            f"torus needs a square world size (1, 4, 9, 16, ...: a side x side grid), got {m}, which is not "
            f"a square; run {below} or {above} ranks, or pick another topology (e.g. 'ring')."
        )
    if m == 1:
        return [set()]  # a 1 x 1 torus is a single node, as the ring and the complete graph are at m = 1
    neighbours = []
    for i in range(m):
        r, c = divmod(i, side)
        around = {((r + 1) % side) * side + c, ((r - 1) % side) * side + c}
        around |= {r * side + (c + 1) % side, r * side + (c - 1) % side}
        neighbours.append(around)  # a set: on a side-2 torus up == down and left == right, merged
    return neighbours


def _complete(m: int) -> list[set[int]]:
    return [set(range(m)) - {i} for i in range(m)]


def _star(m: int) -> list[set[int]]:
    return [set(range(1, m))] + [{0} for _ in range(1, m)]


def _exponential(m: int) -> Topology:
    # Node i sends to i + 2^k for every 2^k < m: these are ceil(log2 m) distinct nodes ((m-1).bit_length()
    # of them, integer arithmetic so no float log2 rounding). Self and each get 1/(ceil(log2 m) + 1).
    # The matrix is circulant, so rows and columns both sum to 1: doubly stochastic but not symmetric.
    shifts = [1 << k for k in range((m - 1).bit_length())]
    w = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        w[i, i] = 1.0 / (len(shifts) + 1)
        for s in shifts:
            w[i, (i + s) % m] = 1.0 / (len(shifts) + 1)
    return Topology(w, name="exponential")


def _one_peer_exponential(m: int) -> Topology:
    # Phase k: node i sends to i + 2^k, receives from i - 2^k, and keeps (x_i + x_{i - 2^k}) / 2, i.e.
    # W_k = (I + P^(2^k)) / 2 with W_k[i, i + 2^k] = 1/2. tau_m = ceil(log2 m) phases; m = 1 has none, so
    # a single identity phase stands in.
    tau = (m - 1).bit_length()
    phases = []
    for k in range(max(tau, 1)):
        w = torch.eye(m, dtype=torch.float64)
        if m > 1:
            w.mul_(0.5)
            for i in range(m):
                w[i, (i + (1 << k)) % m] += 0.5
        phases.append(w)
    return Topology(phases, name="one_peer_exponential")


def make_topology(
    spec: str | Topology | torch.Tensor | Sequence[Sequence[float]],
    world_size: int,
    *,
    weights: str = "metropolis",
) -> Topology:
    """Build (or check) the gossip topology over ``world_size`` nodes.

    Named topologies (``spec`` a string; case and ``-``/``_`` are not significant):

    - ``"ring"``: ``i ~ i +- 1 mod m`` (``m = 2``: one neighbour; ``m = 1``: a single node).
    - ``"torus"``: 2-D torus on a ``sqrt(m) x sqrt(m)`` grid, 4 neighbours with wrap-around (2 on a
      ``2 x 2`` grid, where they coincide; ``m = 1``: a single node); ``m`` must be a perfect square.
    - ``"complete"``: everyone with everyone (Metropolis or uniform weights give ``W = 11^T/m``).
    - ``"star"``: node 0 is the hub.
    - ``"exponential"``: static exponential graph (Ying et al. 2021): node ``i`` sends to
      ``(i + 2^k) mod m`` for every ``2^k < m``; self and each out-neighbour weighted
      ``1 / (ceil(log2 m) + 1)``. Directed and circulant, hence doubly stochastic but not symmetric.
    - ``"one_peer_exponential"``: time-varying with ``tau_m = ceil(log2 m)`` phases (1 identity phase
      for ``m = 1``): in phase ``k`` node ``i`` sends to ``(i + 2^k) mod m`` and receives from
      ``(i - 2^k) mod m``, weighting itself and the received model 1/2 each. After ``tau_m`` rounds
      the product ``W_0 ... W_{tau_m - 1} = (1/2^tau_m) sum_{t < 2^tau_m} P^t`` is the exact average
      ``11^T/m`` only when ``m`` is a power of 2; otherwise some shifts count twice and the models are
      only close to the average (``zeta`` of the cycle is ``> 0``).

    The undirected graphs (ring, torus, complete, star) take their edge weights from ``weights``:
    ``"metropolis"`` (Metropolis-Hastings, ``W_ij = 1/(1 + max(d_i, d_j))``, ``W_ii = 1 - sum``) or
    ``"uniform"`` (``W_ij = 1/(d + 1)``, only for regular graphs; a star with ``m >= 3`` raises). The
    exponential graphs have fixed weights and ignore ``weights`` (it is still checked to be valid).

    A matrix ``spec`` (tensor or nested lists) is ``W`` itself, validated in this order: 2-D and square;
    size equal to ``world_size``; finite; non-negative; rows, then columns, summing to 1 within 1e-6;
    strongly connected. Symmetry is not required: the mixing preserves the average and leaves a
    consensus unchanged iff ``W`` is doubly stochastic; symmetric ``W`` is the common case. A
    :class:`Topology` ``spec`` is returned as is after checking its world size. ``weights`` is ignored for
    both.

    Args:
        spec: a name from :data:`TOPOLOGY_NAMES`, a :class:`Topology`, or the mixing matrix ``W``.
        world_size: the number of nodes ``m`` (an int >= 1).
        weights: the edge-weight rule for the undirected named topologies, one of :data:`WEIGHT_RULES`.

    Returns:
        The :class:`Topology`.

    Raises:
        TypeError: ``world_size``, ``weights`` or ``spec`` has the wrong type.
        ValueError: an unknown name, a topology not defined at ``world_size`` (torus), ``"uniform"`` on a
            non-regular graph, or an invalid matrix (the message names the failing property).
    """
    m = _check_int(world_size, "world_size", 1, "the number of nodes m, one per rank")
    if not isinstance(weights, str):
        raise TypeError(f"Arg `weights` must be a str, one of {WEIGHT_RULES}, got {weights!r}.")
    if weights not in WEIGHT_RULES:
        raise ValueError(f"Arg `weights` must be one of {WEIGHT_RULES}, got {weights!r}.")

    if isinstance(spec, Topology):
        if spec.world_size != m:
            raise ValueError(
                f"Topology {spec.name!r} has world size {spec.world_size} but the world size is {m}."
            )
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_")
        if key == "exponential":
            return _exponential(m)
        if key == "one_peer_exponential":
            return _one_peer_exponential(m)
        builders = {"ring": _ring, "torus": _torus, "complete": _complete, "star": _star}
        if key not in builders:
            raise ValueError(
                f"Unknown topology {spec!r}; valid names: {', '.join(TOPOLOGY_NAMES)} "
                "(or pass a doubly stochastic matrix or a Topology)."
            )
        return _undirected(key, builders[key](m), weights)
    if isinstance(spec, torch.Tensor) or isinstance(spec, Sequence):
        matrix = _as_matrix(spec, "W")
        if matrix.shape[0] != m:
            raise ValueError(f"W is {matrix.shape[0]}x{matrix.shape[1]} but the world size is {m}.")
        return Topology(matrix, name="custom")
    raise TypeError(
        f"Arg `spec` must be a topology name ({', '.join(TOPOLOGY_NAMES)}), a Topology or a square matrix, "
        f"got {type(spec).__name__}."
    )
