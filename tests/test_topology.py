"""Gossip topologies: W's properties for every named graph, closed-form zetas, one-peer exactness, errors."""

from __future__ import annotations

import cmath
import math

import pytest
import torch

from lightning_commsgd.topology import TOPOLOGY_NAMES, Topology, make_topology

SIZES = range(1, 9)


def _defined(name: str, m: int) -> bool:
    return name != "torus" or math.isqrt(m) ** 2 == m


NAMED = [(name, m) for name in TOPOLOGY_NAMES for m in SIZES if _defined(name, m)]


def _strongly_connected(support: torch.Tensor) -> bool:
    """Reference check by transitive closure (independent of the module's graph search)."""
    m = support.shape[0]
    reach = (support | torch.eye(m, dtype=torch.bool)).to(torch.float64)
    for _ in range(m):
        reach = ((reach @ reach) > 0).to(torch.float64)
    return bool((reach > 0).all())


def _average(m: int) -> torch.Tensor:
    return torch.full((m, m), 1.0 / m, dtype=torch.float64)


@pytest.mark.parametrize(("name", "m"), NAMED)
def test_named_topology_is_a_valid_mixing_matrix(name, m):
    topo = make_topology(name, m)
    assert topo.world_size == m
    union = torch.zeros(m, m, dtype=torch.bool)
    for k in range(topo.num_phases):
        w = topo.weights(k)
        assert w.dtype == torch.float64 and w.shape == (m, m)
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(0), torch.ones(m, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(w.sum(1), torch.ones(m, dtype=torch.float64), rtol=0, atol=1e-12)
        union |= w > 0
        # The neighbour lists are W read in the X <- X W orientation: column i in, row i out.
        for i in range(m):
            incoming = topo.in_neighbours(i, k)
            assert [j for j, _ in incoming] == sorted(j for j in range(m) if j != i and w[j, i] > 0)
            assert all(weight == w[j, i].item() for j, weight in incoming)
            assert topo.out_neighbours(i, k) == [j for j in range(m) if j != i and w[i, j] > 0]
            assert topo.self_weight(i, k) == w[i, i].item()
            assert topo.self_weight(i, k) + sum(weight for _, weight in incoming) == pytest.approx(
                1, abs=1e-12
            )
        assert topo.max_degree(k) == max(len(topo.out_neighbours(i, k)) for i in range(m))
    assert _strongly_connected(union)
    assert topo.max_degree() == max(topo.max_degree(k) for k in range(topo.num_phases))
    # The phase is taken modulo the cycle length.
    torch.testing.assert_close(topo.weights(topo.num_phases), topo.weights(0), rtol=0, atol=0)
    if m == 1:
        assert topo.zeta == 0.0
    else:
        assert 0.0 <= topo.zeta < 1.0
    assert repr(topo).startswith(f"Topology(name={name!r}, world_size={m}")


@pytest.mark.parametrize(
    ("name", "m"), [(n, m) for n, m in NAMED if n in ("ring", "torus", "complete", "star")]
)
def test_undirected_topologies_are_symmetric(name, m):
    topo = make_topology(name, m)
    w = topo.weights()
    assert torch.equal(w, w.T)
    for i in range(m):
        assert [j for j, _ in topo.in_neighbours(i)] == topo.out_neighbours(i)


def test_degrees():
    assert make_topology("ring", 1).max_degree() == 0
    assert make_topology("ring", 2).out_neighbours(0) == [1]
    assert make_topology("ring", 2).in_neighbours(1) == [(0, 0.5)]
    assert make_topology("ring", 5).out_neighbours(0) == [1, 4]
    for m, degree in [(4, 2), (9, 4), (16, 4)]:
        torus = make_topology("torus", m)
        assert {len(torus.out_neighbours(i)) for i in range(m)} == {degree}
    assert make_topology("torus", 16).out_neighbours(5) == [1, 4, 6, 9]  # (1,1): up, left, right, down
    assert make_topology("torus", 9).out_neighbours(0) == [1, 2, 3, 6]  # wrap-around both ways
    star = make_topology("star", 6)
    assert star.out_neighbours(0) == [1, 2, 3, 4, 5] and star.out_neighbours(3) == [0]
    assert star.max_degree() == 5
    assert make_topology("complete", 7).max_degree() == 6


def test_torus_needs_a_square_world_size():
    for m, below, above in ((2, 1, 4), (3, 1, 4), (6, 4, 9), (8, 4, 9), (12, 9, 16)):
        with pytest.raises(
            ValueError,
            match=rf"torus needs a square world size \(1, 4, 9, 16, \.\.\.: a side x side grid\), got {m}, "
            rf"which is not a square; run {below} or {above} ranks",
        ):
            make_topology("torus", m)


def test_torus_on_one_rank_is_a_single_node():
    """1 = 1 x 1 is a square: ``gossip_torus`` on one device runs (W = [[1]]), as ring and complete do."""
    torus = make_topology("torus", 1)
    assert torus.world_size == 1 and torus.out_neighbours(0) == []
    assert torch.equal(torus.weights(), torch.ones(1, 1, dtype=torch.float64))


def test_metropolis_and_uniform_weights():
    ring = make_topology("ring", 6).weights()
    assert ring[0, 1] == ring[0, 5] == 1 / 3 and ring[0, 0] == pytest.approx(1 / 3, abs=1e-15)
    torch.testing.assert_close(make_topology("ring", 6, weights="uniform").weights(), ring, rtol=0, atol=0)
    star = make_topology("star", 5).weights()
    assert star[0, 3] == 1 / 5 and star[0, 0] == pytest.approx(1 / 5) and star[3, 3] == pytest.approx(4 / 5)
    torch.testing.assert_close(
        make_topology("torus", 9, weights="uniform").weights()[0, 1], torch.tensor(0.2).double()
    )
    with pytest.raises(ValueError, match="uniform.* needs a regular graph"):
        make_topology("star", 5, weights="uniform")


def _ring_zeta(m: int) -> float:
    # W = (I + P + P^T)/3 is circulant: eigenvalues (1 + 2 cos(2 pi k/m))/3.
    return max(abs(1 + 2 * math.cos(2 * math.pi * k / m)) / 3 for k in range(1, m))


def _circulant_zeta(m: int, shifts: list[int], weight: float) -> float:
    # Circulant W with first row w[0, s] = weight: eigenvalues weight * (1 + sum_s omega^(k s)); normal, so
    # singular values are their moduli.
    return max(
        abs(weight * (1 + sum(cmath.exp(2j * math.pi * k * s / m) for s in shifts))) for k in range(1, m)
    )


def test_zeta_closed_forms():
    assert make_topology("ring", 4).zeta == pytest.approx(1 / 3, abs=1e-12)  # eigenvalues 1, 1/3, 1/3, -1/3
    assert make_topology("ring", 3).zeta == pytest.approx(0, abs=1e-12)  # the ring on 3 nodes is complete
    assert make_topology("ring", 2).zeta == pytest.approx(0, abs=1e-12)
    for m in range(3, 9):
        assert make_topology("ring", m).zeta == pytest.approx(_ring_zeta(m), abs=1e-12)
    for m in range(1, 9):
        assert make_topology("complete", m).zeta == pytest.approx(0, abs=1e-12)
    for m in range(3, 9):
        # Metropolis star: eigenvalues 1, 1 - 1/m (m - 2 times, leaf vectors summing to 0) and 0 (trace).
        assert make_topology("star", m).zeta == pytest.approx(1 - 1 / m, abs=1e-12)
    # 3x3 torus: (1 + 2 cos(2 pi a/3) + 2 cos(2 pi b/3))/5, largest modulus 2/5 at (a, b) = (1, 0).
    assert make_topology("torus", 9).zeta == pytest.approx(2 / 5, abs=1e-12)
    assert make_topology("torus", 4).zeta == pytest.approx(1 / 3, abs=1e-12)  # the 4-cycle
    for m in range(2, 9):
        shifts = [2**k for k in range(m) if 2**k < m]
        expected = _circulant_zeta(m, shifts, 1 / (len(shifts) + 1))
        assert make_topology("exponential", m).zeta == pytest.approx(expected, abs=1e-12)


def test_zeta_of_a_non_symmetric_matrix_is_its_second_singular_value():
    # Doubly stochastic, not normal: eigenvalues 1, 1/4, 0 but singular values 1, 1/2, 0.
    w = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5], [0.25, 0.25, 0.5]], dtype=torch.float64)
    topo = make_topology(w, 3)
    assert topo.out_neighbours(0) == [1] and topo.in_neighbours(0) == [(1, 0.25), (2, 0.25)]
    assert sorted(torch.linalg.eigvals(w).abs().tolist())[1] == pytest.approx(0.25, abs=1e-12)
    assert topo.zeta == pytest.approx(0.5, abs=1e-12)
    # Why singular values: one mixing shrinks the spread around the average by zeta and no more; the
    # second eigenvalue modulus (1/4) would overstate the contraction.
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mixed = x @ w
    torch.testing.assert_close(mixed.mean(1), x.mean(1))  # rows sum to 1: the average is preserved
    spread = (x - x.mean(1, keepdim=True)).norm()
    assert (mixed - mixed.mean(1, keepdim=True)).norm() <= topo.zeta * spread + 1e-12
    u, _, _ = torch.linalg.svd(w - 1 / 3)
    worst = u[:, 0:1].T  # a left singular vector, orthogonal to 1: a spread with zero mean
    assert (worst @ w).norm().item() == pytest.approx(0.5 * worst.norm().item(), abs=1e-12)


def test_static_exponential_graph():
    topo = make_topology("exponential", 8)
    assert topo.num_phases == 1
    assert topo.out_neighbours(0) == [1, 2, 4]
    assert [j for j, _ in topo.in_neighbours(0)] == [4, 6, 7]  # 0 - 1, 0 - 2, 0 - 4 (mod 8)
    assert topo.self_weight(0) == 0.25 and all(weight == 0.25 for _, weight in topo.in_neighbours(0))
    assert make_topology("exponential", 5).out_neighbours(0) == [1, 2, 4]
    assert make_topology("exponential", 2).out_neighbours(1) == [0]
    assert not torch.equal(topo.weights(), topo.weights().T)  # directed
    # Fixed weights: the rule is ignored.
    torch.testing.assert_close(make_topology("exponential", 8, weights="uniform").weights(), topo.weights())


@pytest.mark.parametrize("m", range(1, 9))
def test_one_peer_exponential_phases(m):
    topo = make_topology("one_peer_exponential", m)
    tau = math.ceil(math.log2(m)) if m > 1 else 1
    assert topo.num_phases == tau
    for k in range(tau):
        shift = 2**k if m > 1 else 0
        for i in range(m):
            if m > 1:
                assert topo.out_neighbours(i, k) == [(i + shift) % m]
                assert topo.in_neighbours(i, k) == [((i - shift) % m, 0.5)]
                assert topo.self_weight(i, k) == 0.5
        assert topo.max_degree(k) == (1 if m > 1 else 0)
    # Phases cycle: round tau uses W_0 again.
    torch.testing.assert_close(topo.weights(tau + 1), topo.weights(1 % tau), rtol=0, atol=0)


def _cycle_product(topo: Topology) -> torch.Tensor:
    product = torch.eye(topo.world_size, dtype=torch.float64)
    for k in range(topo.num_phases):
        product = product @ topo.weights(k)
    return product


@pytest.mark.parametrize("m", [2, 4, 8])
def test_one_peer_exponential_averages_exactly_for_powers_of_two(m):
    topo = make_topology("one_peer_exponential", m)
    torch.testing.assert_close(_cycle_product(topo), _average(m), rtol=0, atol=1e-12)
    assert topo.zeta == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("m", [3, 5, 6])
def test_one_peer_exponential_is_not_exact_otherwise(m):
    topo = make_topology("one_peer_exponential", m)
    product = _cycle_product(topo)
    # 2^tau_m > m terms (1/2^tau_m) P^t: some shifts are counted twice.
    assert (product - _average(m)).abs().max() > 1e-2
    assert 0 < topo.zeta < 1
    assert topo.zeta == pytest.approx(torch.linalg.svdvals(product - _average(m)).max().item(), abs=1e-12)


def test_user_matrix_accepted_as_tensor_or_lists():
    w = [[0.5, 0.5, 0.0], [0.5, 0.25, 0.25], [0.0, 0.25, 0.75]]
    topo = make_topology(w, 3)
    assert topo.name == "custom" and topo.num_phases == 1
    torch.testing.assert_close(topo.weights(), torch.tensor(w, dtype=torch.float64), rtol=0, atol=0)
    assert topo.in_neighbours(1) == [(0, 0.5), (2, 0.25)]
    assert make_topology(torch.tensor(w, dtype=torch.float32), 3).weights().dtype == torch.float64
    assert make_topology([[1.0]], 1).zeta == 0.0
    # weights() is a copy: editing it does not change the topology.
    topo.weights()[0, 0] = 7.0
    assert topo.self_weight(0) == 0.5


def test_topology_instance_as_spec():
    ring = make_topology("ring", 4)
    assert make_topology(ring, 4) is ring
    with pytest.raises(ValueError, match="world size 4 but the world size is 5"):
        make_topology(ring, 5)


@pytest.mark.parametrize(
    ("matrix", "m", "message"),
    [
        ([1.0, 0.0], 2, r"W must be a 2-D square matrix, got shape \(2,\)"),
        ([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]], 2, r"W must be a 2-D square matrix, got shape \(2, 3\)"),
        ([[1, 0], [0]], 2, "W must be a 2-D square matrix"),
        (torch.eye(3), 4, "W is 3x3 but the world size is 4"),
        ([[0.5, float("nan")], [0.5, 0.5]], 2, r"finite entries, got W\[0, 1\] = nan"),
        ([[0.5, float("inf")], [0.5, 0.5]], 2, r"finite entries, got W\[0, 1\] = inf"),
        ([[1.1, -0.1], [-0.1, 1.1]], 2, r"non-negative .* W\[0, 1\] = -0.1"),
        ([[0.5, 0.5], [0.5, 0.4]], 2, "not doubly stochastic: row 1 sums to 0.9 "),
        # Row-stochastic but not column-stochastic.
        (
            [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.4, 0.5, 0.1]],
            3,
            "not doubly stochastic: column 0 sums to 1.4 ",
        ),
        ([[0.4, 0.3, 0.3], [0.3, 0.4, 0.3], [0.3, 0.3, 0.3]], 3, "not doubly stochastic: row 2 sums to 0.9 "),
        (
            [[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]],
            4,
            r"not connected: nodes \{2,3\} cannot be reached from node 0",
        ),
        (torch.eye(3), 3, r"not connected: nodes \{1,2\} cannot be reached from node 0"),
    ],
)
def test_invalid_matrix_raises(matrix, m, message):
    with pytest.raises(ValueError, match=message):
        make_topology(matrix, m)


def test_column_sum_message_matches_the_spec_example():
    # Rows all sum to 1 (checked first); column 2 sums to 0.9 and column 3 to 1.1, the first is named.
    w = [[0.25] * 4, [0.25] * 4, [0.25] * 4, [0.25, 0.25, 0.15, 0.35]]
    with pytest.raises(
        ValueError, match=r"not doubly stochastic: column 2 sums to 0.9 \(every row and column"
    ):
        make_topology(w, 4)


def test_validation_order():
    # Wrong size wins over non-finite, non-finite over negative, negative over sums.
    with pytest.raises(ValueError, match="W is 2x2 but the world size is 3"):
        make_topology([[float("nan"), -1.0], [0.0, 0.0]], 3)
    with pytest.raises(ValueError, match="finite"):
        make_topology([[float("nan"), -1.0], [0.0, 0.0]], 2)
    with pytest.raises(ValueError, match="non-negative"):
        make_topology([[2.0, -1.0], [0.0, 0.0]], 2)
    # Within the tolerance is accepted as is.
    make_topology([[0.5 + 5e-7, 0.5 - 5e-7], [0.5 - 5e-7, 0.5 + 5e-7]], 2)


def test_bad_arguments():
    with pytest.raises(
        ValueError, match="Unknown topology 'hypercube'; valid names: complete, exponential, "
    ):
        make_topology("hypercube", 4)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=r"`world_size` must be an int >= 1 \(the number of nodes m, "):
            make_topology("ring", bad)
    for bad in (2.0, True, "4"):
        with pytest.raises(TypeError, match=r"`world_size` must be an int >= 1 \(the number of nodes m"):
            make_topology("ring", bad)
    with pytest.raises(ValueError, match="`weights` must be one of"):
        make_topology("ring", 4, weights="max_degree")
    with pytest.raises(TypeError, match="`weights` must be a str"):
        make_topology("ring", 4, weights=None)
    with pytest.raises(TypeError, match="`spec` must be"):
        make_topology(3, 4)
    assert make_topology("One-Peer-Exponential", 4).name == "one_peer_exponential"
    ring = make_topology("ring", 4)
    with pytest.raises(ValueError, match=r"`rank` must be in \[0, 3\], got 4"):
        ring.out_neighbours(4)
    with pytest.raises(ValueError, match=r"`rank` must be an int >= 0 \(a node of the graph\)"):
        ring.in_neighbours(-1)
    with pytest.raises(TypeError, match="`phase` must be an int"):
        ring.weights(0.5)


def test_time_varying_topology_validates_each_phase_and_the_union():
    m = 4
    shift = torch.roll(torch.eye(m, dtype=torch.float64), 1, dims=1)
    # Each phase alone is disconnected (pairs {0,1}, {2,3} then {1,2}, {3,0}), the union is a ring.
    a = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]]).double()
    b = shift @ a @ shift.T
    topo = Topology([a, b], name="alternating")
    assert topo.num_phases == 2 and topo.max_degree() == 1
    assert Topology(torch.stack([a, b])).num_phases == 2
    with pytest.raises(ValueError, match="the union of W_0 ... W_{K-1} is not connected"):
        Topology([a, a])
    with pytest.raises(ValueError, match="W_1 is not doubly stochastic"):
        Topology([a, a * 0.9])
    with pytest.raises(ValueError, match="W_1 is 3x3 but W_0 is 4x4"):
        Topology([a, torch.eye(3, dtype=torch.float64)])
