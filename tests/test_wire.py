"""Wire formats (lossless coding of compressor payloads) and the entropy bound they are measured against."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from lightning_commsgd.algorithms import DORE, CompressedSGD
from lightning_commsgd.compression import (
    QSGD,
    BlockInt4,
    BlockInt8,
    Cast,
    Identity,
    PNormQuantizer,
    RandomK,
    ScaledSign,
    TopK,
)
from lightning_commsgd.compression.entropy import empirical_entropy_bits, payload_entropy
from lightning_commsgd.compression.wire import EntropyWire, PackedWire, as_wire_format

COMPRESSORS = [
    PNormQuantizer(),
    PNormQuantizer(2.0, 16),
    QSGD(),
    QSGD(levels=2),  # 3-bit codes: two per byte on the wire
    QSGD(levels=16),  # 6-bit codes: one per byte on the wire
    BlockInt8(),
    BlockInt4(),
    TopK(0.01),
    RandomK(0.05),
    ScaledSign(),
    ScaledSign(block_size=10),
    Cast("bf16"),
    Cast("fp16"),
    Identity(),
]


def _vectors(numel: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(numel)
    sparse = torch.zeros(numel)
    sparse[:: max(1, numel // 7)] = 2.5
    return {"gaussian": torch.randn(numel, generator=g), "zeros": torch.zeros(numel), "sparse": sparse}


@pytest.mark.parametrize("compressor", COMPRESSORS, ids=repr)
@pytest.mark.parametrize("numel", [1, 7, 57, 1000, 40_001])
def test_entropy_wire_round_trips_every_payload_bit_for_bit(compressor, numel):
    wire = EntropyWire()
    g = torch.Generator().manual_seed(1)
    for name, x in _vectors(numel).items():
        payload = compressor.encode(x, g)
        message = wire.pack(payload, compressor, numel)
        assert message.dtype == torch.uint8 and message.dim() == 1
        assert torch.equal(wire.unpack(message, compressor, numel), payload), name
        # never more than one byte (the stored/coded flag) over the payload
        assert message.numel() <= payload.numel() + 1, name


@pytest.mark.parametrize(
    "compressor, packed_bits, most_over_entropy, most_bits",
    [
        # inf-norm ternary codes in blocks of 256 (DORE's): mostly zeros, four codes per byte
        (PNormQuantizer(), 2.125, 1.07, 1.35),
        # QSGD-4: codes sign(x) l + s, mostly s (level 0), two per byte; Huffman's whole bits per byte pair
        # stay about 1.5x over their low entropy (0.8 bits), at 1.2 bits per value
        (QSGD(levels=4), 4.0625, 1.6, 1.3),
        (BlockInt4(), 4.5, 1.02, 4.1),
        # top-k 1%: per kept entry, the gap to the previous index (about log2(e / 0.01) = 8.1 bits) and fp32
        (TopK(0.01), 0.64, 1.0, 0.4),
        (ScaledSign(), 1.0, 1.01, 1.01),  # random signs: nothing to gain
    ],
    ids=lambda v: repr(v) if not isinstance(v, float) else "",
)
def test_coded_sizes_against_the_empirical_entropy(compressor, packed_bits, most_over_entropy, most_bits):
    numel = 1 << 16
    x = torch.randn(numel, generator=torch.Generator().manual_seed(3))
    payload = compressor.encode(x, torch.Generator().manual_seed(4))
    bound = payload_entropy(compressor, payload, numel)
    coded_bits = 8 * EntropyWire().pack(payload, compressor, numel).numel()
    assert bound.packed_bits_per_value == pytest.approx(packed_bits, abs=0.01)
    assert bound.entropy_bits <= bound.packed_bits
    assert coded_bits <= most_over_entropy * bound.entropy_bits
    assert coded_bits / numel <= most_bits


def test_empirical_entropy_of_known_histograms():
    assert empirical_entropy_bits(torch.zeros(100, dtype=torch.int64)) == 0.0
    assert empirical_entropy_bits(torch.arange(4).repeat(25)) == pytest.approx(200.0)  # 2 bits each
    three = torch.tensor([0] * 50 + [1] * 25 + [2] * 25)
    assert empirical_entropy_bits(three) == pytest.approx(100 * 1.5)
    assert empirical_entropy_bits(torch.zeros(0, dtype=torch.int64)) == 0.0


def test_payload_entropy_counts_side_values_at_32_bits():
    numel = 1000
    payload = PNormQuantizer(block_size=100).encode(torch.randn(numel), torch.Generator().manual_seed(0))
    bound = payload_entropy(PNormQuantizer(block_size=100), payload, numel)
    assert bound.side_bits == 32 * 10
    assert 0 < bound.code_entropy_bits <= numel * math.log2(3)
    fp32 = payload_entropy(Identity(), Identity().encode(torch.randn(numel)), numel)
    assert fp32.entropy_bits_per_value == 32.0


def test_a_damaged_or_foreign_message_is_refused():
    wire, compressor = EntropyWire(), PNormQuantizer()
    message = wire.pack(compressor.encode(torch.randn(5000)), compressor, 5000)
    assert int(message[0]) == 1  # coded
    bad = message.clone()
    bad[0] = 7
    with pytest.raises(ValueError, match="neither stored"):
        wire.unpack(bad, compressor, 5000)
    with pytest.raises(ValueError, match="expected"):
        wire.unpack(message, compressor, 4000)  # another size


def test_wire_format_names_objects_and_bad_values():
    assert isinstance(as_wire_format("packed"), PackedWire)
    assert isinstance(as_wire_format("entropy"), EntropyWire)
    custom = EntropyWire(level=3)
    assert as_wire_format(custom) is custom
    with pytest.raises(ValueError, match="`wire`.*packed.*entropy"):
        as_wire_format("zip")
    with pytest.raises(TypeError, match="`wire`"):
        as_wire_format(3)
    with pytest.raises(ValueError, match="`level`"):
        EntropyWire(level=0)
    # strategies are pickled into spawned workers: the thread-local coder objects are rebuilt there
    copy = pickle.loads(pickle.dumps(EntropyWire(level=5)))
    compressor = QSGD()
    payload = compressor.encode(torch.randn(3000))
    assert copy.level == 5 and torch.equal(
        copy.unpack(copy.pack(payload, compressor, 3000), compressor, 3000), payload
    )


def test_the_configs_take_the_wire_format_and_refuse_bad_ones_before_any_process_starts():
    assert isinstance(DORE("int8", wire="entropy").wire, EntropyWire)
    assert isinstance(CompressedSGD("int4").wire, PackedWire)
    with pytest.raises(ValueError, match="`wire`"):
        DORE(PNormQuantizer(), wire="lz4")
    with pytest.raises(ValueError, match="`wire`"):
        CompressedSGD(QSGD(), wire="huffman")
