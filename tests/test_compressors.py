"""Compressors: payload sizes against the analytic formulas, exact round trips, unbiasedness and variance
(statistically, with tolerances derived from the sample count), contraction of the biased ones."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_commsgd.compression import (
    CODEC_NAMES,
    QSGD,
    BlockInt4,
    BlockInt8,
    Cast,
    Identity,
    PNormQuantizer,
    RandomK,
    ScaledSign,
    TopK,
    as_compressor,
    codec_name,
)
from lightning_commsgd.compression.bitpack import pack_bits, unpack_bits
from lightning_commsgd.payload import CompressedPayload, payload_codec, rounding_generator

UNBIASED = [
    PNormQuantizer(float("inf"), 64),
    PNormQuantizer(2, 32),
    PNormQuantizer(1.5, 16),
    QSGD(levels=2, bucket_size=64),
    QSGD(levels=8, bucket_size=512),
    BlockInt8(16),
    BlockInt8(256),
    BlockInt4(5),
    BlockInt4(64),
    RandomK(0.25),
    Identity(),
]
BIASED = [TopK(0.1), TopK(1.0), ScaledSign(), ScaledSign(block_size=10), Cast("bf16")]
SIZES = [1, 7, 64, 65, 1000]


def _vectors(numel: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(numel)
    spike = torch.full((numel,), 1 / (math.sqrt(min(numel, 64)) + 1))
    spike[0] = 1.0  # near the worst case of the inf-norm quantizer's variance
    sparse = torch.zeros(numel)
    sparse[:: max(1, numel // 5)] = 3.0
    return {"gaussian": torch.randn(numel, generator=g), "spike": spike, "sparse": sparse}


@pytest.mark.parametrize("count", [1, 7, 8, 1001, 4096])
@pytest.mark.parametrize("width", range(1, 9))
def test_bit_packing_round_trips_every_width(width, count):
    codes = torch.randint(0, 2**width, (count,), generator=torch.Generator().manual_seed(width))
    packed = pack_bits(codes, width)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * width / 8)
    assert torch.equal(unpack_bits(packed, width, count), codes)
    # the layout: code i at bits [i * width, (i + 1) * width) of the little-endian bit stream
    bits = [(int(packed[b]) >> k) & 1 for b in range(packed.numel()) for k in range(8)]
    expected = [(int(c) >> k) & 1 for c in codes for k in range(width)]
    assert bits[: len(expected)] == expected and not any(bits[len(expected) :])


def test_scratch_buffers_are_reused_per_thread_and_not_kept_when_large(monkeypatch):
    import threading

    from lightning_commsgd.compression import base

    first = base.scratch("test", 100, torch.float32, torch.device("cpu"))
    again = base.scratch("test", 50, torch.int64, torch.device("cpu"))
    assert again.data_ptr() == first.data_ptr() and again.dtype == torch.int64 and again.numel() == 50
    other: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: other.append(base.scratch("test", 100, torch.float32, "cpu")))
    thread.start()
    thread.join()
    assert other[0].data_ptr() != first.data_ptr()  # the helper thread encodes into its own buffers
    monkeypatch.setattr(base, "SCRATCH_MAX_BYTES", 100)
    big = base.scratch("test", 100, torch.float32, torch.device("cpu"))
    assert big.data_ptr() != first.data_ptr() and big.numel() == 100


@pytest.mark.parametrize("numel", SIZES)
def test_payload_sizes_equal_the_analytic_formulas(numel):
    expected = {
        PNormQuantizer(float("inf"), 256): 4 * math.ceil(numel / 256) + math.ceil(numel / 4),
        QSGD(levels=4, bucket_size=128): 4 * math.ceil(numel / 128) + math.ceil(numel * 4 / 8),  # 1+3 bits
        QSGD(levels=1, bucket_size=512): 4 * math.ceil(numel / 512) + math.ceil(numel * 2 / 8),
        BlockInt8(256): 4 * math.ceil(numel / 256) + numel,
        BlockInt4(64): 4 * math.ceil(numel / 64) + math.ceil(numel / 2),
        RandomK(0.01): 8 * max(1, math.ceil(0.01 * numel)),
        TopK(0.5): 8 * math.ceil(0.5 * numel),
        ScaledSign(): 4 + math.ceil(numel / 8),
        Identity(): 4 * numel,
        Cast("bf16"): 2 * numel,
        Cast("fp16"): 2 * numel,
    }
    x = torch.randn(numel)
    for compressor, nbytes in expected.items():
        payload = compressor.encode(x, torch.Generator().manual_seed(0))
        assert payload.dtype == torch.uint8 and payload.dim() == 1
        assert payload.numel() == compressor.payload_nbytes(numel) == nbytes, compressor
        assert compressor.decode(payload, numel).shape == (numel,)


def test_pnorm_quantizer_is_16x_smaller_than_fp32_for_large_blocks():
    assert PNormQuantizer(float("inf"), 256).payload_nbytes(1_000_000) / (4 * 1_000_000) < 1 / 15


def test_round_trip_is_exact_for_representable_values():
    ternary = torch.tensor([0.5, -0.5, 0.0, 0.5, -2.0, 0.0, 2.0, 2.0])  # blocks of 4: values in {-m, 0, m}
    assert torch.equal(PNormQuantizer(float("inf"), 4).compress(ternary), ternary)
    single = torch.zeros(10)
    single[3] = -1.25  # one entry per bucket: level s exactly
    assert torch.equal(QSGD(levels=3, bucket_size=10).compress(single), single)
    x = torch.randn(50)
    assert torch.equal(Identity().compress(x), x)
    assert torch.equal(RandomK(1.0).compress(x), x)  # k = d: scale d/k = 1
    sparse = torch.zeros(50)
    sparse[[4, 9, 31]] = torch.tensor([1.0, -2.0, 3.0])
    assert torch.equal(TopK(0.1).compress(sparse), sparse)  # k = 5 >= 3 non-zeros
    signs = torch.tensor([0.75, -0.75, 0.75, 0.75])
    assert torch.equal(ScaledSign().compress(signs), signs)
    on_grid = torch.tensor([127.0, -3.0, 0.0, 64.0, -127.0, 1.0]) * 0.25  # multiples of the scale max/127
    assert torch.equal(BlockInt8(6).compress(on_grid), on_grid)
    on_grid4 = torch.tensor([7.0, -3.0, 0.0, 6.0, -7.0, 1.0, -1.0]) * 0.5  # multiples of max/7, odd length
    assert torch.equal(BlockInt4(7).compress(on_grid4), on_grid4)


@pytest.mark.parametrize(("quantizer", "ratio"), [(BlockInt8(256), 0.26), (BlockInt4(64), 0.141)], ids=repr)
def test_block_int_quantizers_shrink_fp32_and_keep_each_error_below_the_scale(quantizer, ratio):
    """int8 is about a quarter of fp32, int4 a seventh; every value lands within one step of the block's
    scale max|x| / L, also across blocks of very different magnitudes."""
    assert quantizer.payload_nbytes(1_000_000) / (4 * 1_000_000) < ratio
    b = quantizer.block_size
    x = torch.randn(64 * b) * torch.logspace(-4, 1, 64 * b)
    error = (quantizer.compress(x, torch.Generator().manual_seed(0)) - x).abs().view(64, b)
    scale = x.abs().view(64, b).amax(1, keepdim=True) / quantizer.LEVELS
    assert bool((error < scale).all())


def test_block_int4_codes_use_every_nibble_value_and_pack_two_per_byte():
    """The 15 codes -7..7 map to nibbles 0..14, the even-indexed value in the low nibble."""
    x = torch.arange(-7.0, 8.0)  # scale 1: every code once, deterministic (on the grid)
    payload = BlockInt4(15).encode(x)
    codes = payload[4:]
    assert codes.numel() == 8
    assert [int(c) & 0x0F for c in codes] == list(range(0, 15, 2))  # even-indexed values: -7, -5, ..., 7
    assert [int(c) >> 4 for c in codes] == [*range(1, 15, 2), 0]  # odd-indexed ones, then the zero pad


@pytest.mark.parametrize("compressor", UNBIASED, ids=repr)
@pytest.mark.parametrize("numel", [7, 65, 300])
def test_unbiased_compressors_mean_and_variance(compressor, numel):
    """Over N draws of Q(x): E||mean - x||^2 = V / N for an unbiased Q (V = E||Q(x) - x||^2), so
    ||mean - x||^2 <= 10 V / N fails with probability <= 0.1 by Markov (seeded: reproducible), while a
    biased Q (e.g. random-k without its d/k scale) misses by ~||x||^2. The empirical V is <= C ||x||^2."""
    draws = 3000
    g = torch.Generator().manual_seed(7)
    for name, x in _vectors(numel).items():
        samples = torch.stack([compressor.compress(x, g) for _ in range(draws)])
        errors = (samples - x).square().sum(1)
        variance = errors.mean()
        bias_sq = (samples.mean(0) - x).square().sum()
        assert bias_sq <= 10 * variance / draws + 1e-9, (name, compressor, float(bias_sq))
        bound = compressor.variance_bound(numel) * x.square().sum()
        # the sample mean of ||Q - x||^2 fluctuates: 3 standard errors of slack over the bound
        slack = 3 * errors.std() / math.sqrt(draws)
        assert variance <= bound + slack + 1e-6, (name, compressor, float(variance), float(bound))


def test_the_unbiasedness_check_catches_a_missing_scale():
    """The statistic above is sharp enough: random-k without its d/k scale is caught."""

    class UnscaledRandomK(RandomK):
        def encode(self, x, generator=None):
            k = max(1, math.ceil(self.ratio * x.numel()))
            idx = torch.randperm(x.numel(), generator=generator)[:k]
            return self._pack(idx, x.reshape(-1).float()[idx])

    x = torch.randn(65)
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([UnscaledRandomK(0.25).compress(x, g) for _ in range(3000)])
    variance = (samples - x).square().sum(1).mean()
    assert (samples.mean(0) - x).square().sum() > 10 * variance / 3000


def test_variance_bound_is_nearly_attained_by_the_worst_case_vector():
    """C is the paper's constant, not a loose number: the inf-norm quantizer's worst case x reaches it,
    and so do BlockInt8's and BlockInt4's (one value at the scale's L steps, the others f* of a step from
    0, f* = L (sqrt(L^2 + b - 1) - L) / (b - 1): 0.5 for int8, 0.4 for int4 at b = 64)."""
    b = 64
    g = torch.Generator().manual_seed(0)
    worst = {}
    for levels in (127, 7):
        worst[levels] = torch.full((b,), levels * (math.sqrt(levels**2 + b - 1) - levels) / (b - 1))
        worst[levels][0] = float(levels)
    cases = [
        (PNormQuantizer(float("inf"), b), _vectors(b)["spike"]),
        (BlockInt8(b), worst[127]),
        (BlockInt4(b), worst[7]),
    ]
    for quantizer, x in cases:
        samples = torch.stack([quantizer.compress(x, g) for _ in range(4000)])
        ratio = float((samples - x).square().sum(1).mean() / x.square().sum())
        assert ratio == pytest.approx(quantizer.variance_bound(b), rel=0.05), quantizer


@pytest.mark.parametrize("compressor", BIASED, ids=repr)
@pytest.mark.parametrize("numel", SIZES)
def test_biased_compressors_contract(compressor, numel):
    assert not compressor.unbiased and compressor.variance_bound(numel) is None
    delta = compressor.contraction(numel)
    for x in _vectors(numel).values():
        error = (compressor.compress(x) - x).square().sum()
        assert error <= (1 - delta) * x.square().sum() + 1e-5


def test_topk_keeps_the_largest_magnitudes():
    x = torch.tensor([0.1, -5.0, 0.2, 4.0, -0.3, 0.0, 1.0, -0.05, 0.0, 0.0])
    assert TopK(0.2).compress(x).tolist() == [0, -5.0, 0, 4.0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("compressor", [*UNBIASED, *BIASED], ids=repr)
def test_any_floating_dtype_is_computed_in_fp32(compressor, dtype):
    x = torch.randn(130, dtype=dtype)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    out = compressor.compress(x, g1)
    assert out.dtype == torch.float32
    assert torch.equal(out, compressor.compress(x.float(), g2))


def test_same_generator_state_gives_the_same_payload():
    x = torch.randn(500)
    for compressor in UNBIASED:
        a = compressor.encode(x, torch.Generator().manual_seed(11))
        b = compressor.encode(x, torch.Generator().manual_seed(11))
        assert torch.equal(a, b)


def test_zero_vector_compresses_to_zero():
    for compressor in [*UNBIASED, *BIASED]:
        assert torch.equal(compressor.compress(torch.zeros(33)), torch.zeros(33))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: PNormQuantizer(block_size=0), "block_size"),
        (lambda: PNormQuantizer(p=0.5), "`p`"),
        (lambda: PNormQuantizer(p=float("nan")), "`p`"),
        (lambda: QSGD(levels=0), "levels"),
        (lambda: QSGD(levels=128), "levels"),
        (lambda: QSGD(bucket_size=-1), "bucket_size"),
        (lambda: BlockInt8(block_size=0), "block_size"),
        (lambda: RandomK(0.0), "ratio"),
        (lambda: TopK(1.5), "ratio"),
        (lambda: TopK(float("nan")), "ratio"),
        (lambda: ScaledSign(block_size=0), "block_size"),
        (lambda: Cast("int8"), "`dtype`"),
        (lambda: Cast(torch.float32), "`dtype`"),
        (lambda: as_compressor("int3"), r"`compressor` must be one of \('bf16', 'fp16', 'int8', 'int4'\)"),
    ],
)
def test_bad_compressor_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_a_codec_name_is_its_compressor():
    """One vocabulary: the names the averaging strategies take are compressor objects for every strategy."""
    assert CODEC_NAMES == ("bf16", "fp16", "int8", "int4")
    expected = {"bf16": Cast("bf16"), "fp16": Cast("fp16"), "int8": BlockInt8(256), "int4": BlockInt4(64)}
    x = torch.randn(1000)
    for name, compressor in expected.items():
        resolved = as_compressor(name)
        assert repr(resolved) == repr(compressor) and codec_name(resolved) == name
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        assert torch.equal(resolved.encode(x, g1), compressor.encode(x, g2))
    assert codec_name(None) == "fp32" and codec_name(BlockInt4(32)) == "BlockInt4(block_size=32)"
    assert as_compressor(None, allow_none=True) is None
    with pytest.raises(TypeError, match="`model_compressor`"):
        as_compressor(None, "model_compressor")
    with pytest.raises(TypeError, match="`compressor`"):
        as_compressor(torch.bfloat16)


def test_cast_rounds_to_nearest_16_bit_value():
    x = torch.randn(300) * 1e3
    assert torch.equal(Cast("bf16").compress(x), x.to(torch.bfloat16).float())
    assert torch.equal(Cast(torch.float16).compress(x), x.to(torch.float16).float())
    # fp16 overflows above 65504, so it promises no contraction; bf16 keeps fp32's range
    assert Cast("fp16").contraction(10) is None and Cast("fp16").compress(torch.tensor([1e5])).isinf().all()
    assert not Cast("bf16").compress(torch.tensor([1e30])).isinf().any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compressor", [*UNBIASED, *BIASED], ids=repr)
def test_cuda_matches_the_format_and_round_trips(compressor):
    x = torch.randn(1000, device="cuda", dtype=torch.bfloat16)
    payload = compressor.encode(x, torch.Generator(device="cuda").manual_seed(0))
    assert payload.is_cuda and payload.numel() == compressor.payload_nbytes(1000)
    assert compressor.decode(payload, 1000).is_cuda


@pytest.mark.parametrize("payload", ["int8", "int4", "bf16"])
def test_payload_encoded_in_aligned_pieces_decodes_like_the_whole(payload):
    """Two ranks' low-precision mean encodes and sends the buffer piece by piece (pieces a multiple of the
    codec's segment_align values, one generator in order): the decoded pieces equal the whole vector encoded
    at once, bit for bit, and the pieces' payloads add up to the whole's bytes. A compressor that encodes the
    whole vector at once (QSGD's norm) has no alignment and is never cut."""
    codec = payload_codec(payload)
    align = codec.segment_align
    assert align == {"int8": 256, "int4": 64, "bf16": 1}[payload]
    values = torch.randn(10 * 256 + 77) * torch.logspace(-2, 2, 10 * 256 + 77)
    whole_gen = rounding_generator(codec, 5, 1, 0, torch.device("cpu"))
    whole = codec.decode(codec.encode(values, whole_gen), values.numel())
    piece_gen = rounding_generator(codec, 5, 1, 0, torch.device("cpu"))
    cuts = [0, 3 * 256, 4 * 256, 9 * 256, values.numel()]
    payloads = [codec.encode(values[a:b], piece_gen) for a, b in zip(cuts, cuts[1:])]
    pieces = [codec.decode(pay, b - a) for pay, (a, b) in zip(payloads, zip(cuts, cuts[1:]))]
    assert torch.equal(torch.cat(pieces), whole)
    assert sum(codec.nbytes(pay) for pay in payloads) == codec.payload_nbytes(values.numel())
    assert CompressedPayload(QSGD(levels=4)).segment_align is None


def test_topk_breaks_ties_by_the_lowest_index_and_sends_indices_in_order():
    """The documented tie rule: among entries equal to the k-th largest magnitude the lowest indices win
    (torch's topk alone picks an arbitrary subset), +0.0 and -0.0 tie, and the indices travel sorted."""
    compressor = TopK(0.3)  # k = 3 of 10
    x = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0, 0.0, 2.0, -2.0, 1.0])
    payload = compressor.encode(x)
    indices = payload[:12].view(torch.int32).long()
    assert indices.tolist() == [1, 2, 4]
    assert torch.equal(compressor.decode(payload, 10), torch.tensor([0, -2.0, 2.0, 0, -2.0, 0, 0, 0, 0, 0]))
    flat_ties = torch.ones(100_000)
    assert TopK(5 / 100_000).encode(flat_ties)[:20].view(torch.int32).tolist() == [0, 1, 2, 3, 4]
    zeros = torch.tensor([-0.0, 0.0, 0.0, 7.0])  # fewer non-zeros than k = 2: the first zero is kept
    assert TopK(0.5).encode(zeros)[:8].view(torch.int32).tolist() == [0, 3]
    with_nan = torch.tensor([1.0, float("nan"), 5.0, 2.0])  # NaN ranks as an infinite magnitude
    assert TopK(0.5).encode(with_nan)[:8].view(torch.int32).tolist() == [1, 2]


def test_scaled_sign_sends_an_exact_zero_as_plus_one_and_scales_a_partial_block_by_its_length():
    """As documented: Q(x)_j = (||x_B||_1 / n_B) s(x_j) with s(0) = s(-0.0) = +1 and n_B the real values of
    the block (4 in the full blocks, 1 in the partial last one); a block of zeros decodes to zeros."""
    x = torch.tensor([3.0, -1.0, 0.0, 4.0, -0.0, 2.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, -5.0])
    expected = torch.tensor([2.0, -2.0, 2.0, 2.0, 1.0, 1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0, -5.0])
    q = ScaledSign(block_size=4).compress(x)
    assert torch.equal(q, expected)
    # the error identity the docstring states, per block: ||Q - x||^2 = ||x||^2 - ||x||_1^2 / n_B
    for block, n in ((slice(0, 4), 4), (slice(4, 8), 4), (slice(12, 13), 1)):
        err = (q[block] - x[block]).square().sum()
        assert err == pytest.approx(float(x[block].square().sum() - x[block].abs().sum() ** 2 / n))
    doc = ScaledSign.__doc__ or ""
    assert "+1" in doc and "partial last block" in doc
    assert "lowest indices" in (TopK.__doc__ or "")


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("compressor", [*UNBIASED, *BIASED], ids=repr)
def test_decode_into_writes_exactly_what_decode_returns(compressor, numel):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    payload = compressor.encode(x, torch.Generator().manual_seed(1))
    out = torch.full((numel,), float("nan"))
    result = compressor.decode_into(payload, numel, out)
    assert result.data_ptr() == out.data_ptr()  # written in place, nothing left of the old contents
    assert torch.equal(out, compressor.decode(payload, numel))
