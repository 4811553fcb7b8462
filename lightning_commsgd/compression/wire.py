"""Wire formats: how a compressor's payload travels, losslessly.

A :class:`~lightning_commsgd.compression.base.Compressor` writes a fixed-size payload: codes packed at a
fixed width (2 bits per ternary value, 1 + 3 bits per QSGD-4 value, 4 per int4 value) and 32-bit indices
for the sparsifiers. Those codes are far from uniformly distributed: the ternary codes of the inf-norm
quantizer are mostly zeros, QSGD levels are mostly 0 and 1, int4 codes cluster around 7, and sorted
indices differ by small gaps. A wire format turns the payload into the bytes that cross the link and back,
bit for bit, so every algorithm's trajectory is the same under any wire format; only bytes and time change.

- ``"packed"`` (:class:`PackedWire`): the payload itself (fixed size; the default).
- ``"entropy"`` (:class:`EntropyWire`): the payload through a lossless transform that exposes its
  redundancy (sorted indices as gaps; multi-byte words split into byte planes, so the high bytes of small
  gaps and the exponent bytes of floats sit together) and then Zstandard (``zstandard``, the reference
  library's binding) at level 1, whose Huffman stage codes the bytes at close to their empirical entropy.
  Four ternary codes share a byte, so the byte's Huffman code sees their joint distribution. One leading
  byte says whether the rest is coded or, where coding would not make it smaller (tiny or incompressible
  payloads), the payload as it is: a message is never more than one byte longer than the payload.
  Measured sizes against the codes' empirical entropy: ``python -m benchmarks.bench_codecs``.

The entropy format's messages differ in length between ranks and steps, so they travel through
:mod:`lightning_commsgd.comm.varlen` (a length, then the message padded to the longest rank's). Zstandard runs
on the CPU: CUDA payloads go through host memory.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_commsgd.compression.base import Compressor, Identity, num_blocks
from lightning_commsgd.compression.bitpack import pack_bits, unpack_bits
from lightning_commsgd.compression.cast import Cast
from lightning_commsgd.compression.quantizers import QSGD
from lightning_commsgd.compression.sparsifiers import _Sparse

__all__ = ["WIRE_FORMATS", "EntropyWire", "PackedWire", "WireFormat", "WireName", "as_wire_format"]

#: the wire format names :func:`as_wire_format` accepts
WIRE_FORMATS: tuple[str, ...] = ("packed", "entropy")
WireName = Literal["packed", "entropy"]


class WireFormat(ABC):
    """A lossless map payload -> bytes on the link -> payload."""

    name: str
    #: whether the bytes' length depends on the values (then they travel through ``comm.varlen``)
    variable_size: bool

    @abstractmethod
    def pack(self, payload: Tensor, compressor: Compressor, numel: int) -> Tensor:
        """The ``uint8`` bytes that travel for ``compressor``'s ``payload`` of ``numel`` values."""

    @abstractmethod
    def unpack(self, data: Tensor, compressor: Compressor, numel: int) -> Tensor:
        """The payload, bit for bit, on ``data``'s device."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PackedWire(WireFormat):
    """The compressor's payload as it is: fixed size, no work."""

    name = "packed"
    variable_size = False

    def pack(self, payload: Tensor, compressor: Compressor, numel: int) -> Tensor:
        return payload

    def unpack(self, data: Tensor, compressor: Compressor, numel: int) -> Tensor:
        return data


# a message's first byte: the payload follows as it is, or Zstandard-coded
_STORED, _CODED = 0, 1


def _straddles_bytes(compressor: Compressor) -> bool:
    """QSGD codes of 3, 5, 6 or 7 bits: packed, they straddle byte boundaries."""
    return isinstance(compressor, QSGD) and 8 % compressor._width != 0


def _slot_bits(compressor: QSGD) -> int:
    """The byte-aligned slot a straddling code travels in: two 3-bit codes per byte, else one code."""
    return 4 if compressor._width <= 4 else 8


def _planes(data: Tensor, width: int) -> Tensor:
    """Words of ``width`` bytes split into byte planes (all first bytes, then all second bytes, ...)."""
    return data.view(-1, width).t().contiguous().view(-1)


def _words(planes: Tensor, width: int) -> Tensor:
    return planes.view(width, -1).t().contiguous().view(-1)


class EntropyWire(WireFormat):
    """Zstandard over a transform that exposes each payload's redundancy (see the module docstring).

    Transforms, by compressor: the sparsifiers' int32 indices become gaps to the previous index (the first
    one itself), split into 4 byte planes, and their fp32 values into 4 byte planes; 16-bit casts and fp32
    values (``Cast``, ``Identity``) into byte planes; QSGD codes of 3 bits into nibbles, of 5, 6 or 7 bits
    into bytes (whole codes per byte); every other payload (codes packed 1, 2, 4 or 8 bits wide behind a
    few fp32 block scales) goes to Zstandard as it is.

    Args:
        level: Zstandard's compression level, 1 (fastest; default) to 22. Level 1 already codes the bytes
            with Huffman tables; higher levels search for repeats, which quantized gradients hardly have.
    """

    name = "entropy"
    variable_size = True

    def __init__(self, level: int = 1) -> None:
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 22:
            raise ValueError(f"Arg `level` must be an int in [1, 22] (Zstandard's levels), got {level!r}.")
        self.level = level
        self._local = threading.local()  # zstandard's (de)compressor objects are not thread-safe

    def __repr__(self) -> str:
        return f"EntropyWire(level={self.level})"

    def __getstate__(self) -> dict[str, Any]:
        return {"level": self.level}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["level"])  # type: ignore[misc]

    def _zstd(self) -> tuple[Any, Any]:
        import zstandard

        if not hasattr(self._local, "pair"):
            self._local.pair = (zstandard.ZstdCompressor(level=self.level), zstandard.ZstdDecompressor())
        return self._local.pair

    def pack(self, payload: Tensor, compressor: Compressor, numel: int) -> Tensor:
        flat = payload.detach().reshape(-1)
        transformed = self._transform(flat.cpu(), compressor, numel)
        compressed = self._zstd()[0].compress(transformed.numpy())
        if len(compressed) >= flat.numel():  # incompressible, or too small for a frame's header
            return torch.cat([flat.new_full((1,), _STORED), flat])
        message = torch.empty(1 + len(compressed), dtype=torch.uint8)
        message[0] = _CODED
        message[1:] = torch.frombuffer(bytearray(compressed), dtype=torch.uint8)
        return message.to(payload.device)

    def unpack(self, data: Tensor, compressor: Compressor, numel: int) -> Tensor:
        flat = data.reshape(-1)
        kind = int(flat[0])
        if kind == _STORED:
            return flat[1:]
        if kind != _CODED:
            raise ValueError(f"EntropyWire: a message starts with {kind}, neither stored (0) nor coded (1).")
        data = flat[1:]
        expected = compressor.payload_nbytes(numel)
        if _straddles_bytes(compressor):  # the codes travelled one per byte
            slots = -(-numel * _slot_bits(compressor) // 8)
            expected = 4 * num_blocks(numel, compressor.bucket_size) + slots  # type: ignore[attr-defined]
        raw = self._zstd()[1].decompress(data.detach().cpu().numpy().tobytes(), max_output_size=expected)
        if len(raw) != expected:
            raise ValueError(
                f"EntropyWire: a message decoded to {len(raw)} bytes, expected {expected} for "
                f"{compressor!r} over {numel} values (a message of another compressor or size?)."
            )
        transformed = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return self._inverse(transformed, compressor, numel).to(data.device)

    @staticmethod
    def _transform(payload: Tensor, compressor: Compressor, numel: int) -> Tensor:
        if isinstance(compressor, _Sparse):
            k = payload.numel() // 8
            indices = payload[: 4 * k].view(torch.int32)
            gaps = torch.empty_like(indices)
            gaps[:1] = indices[:1]
            torch.sub(indices[1:], indices[:-1], out=gaps[1:])
            return torch.cat([_planes(gaps.view(torch.uint8), 4), _planes(payload[4 * k :], 4)])
        if isinstance(compressor, Cast):
            return _planes(payload, 2)
        if isinstance(compressor, Identity):
            return _planes(payload, 4)
        if _straddles_bytes(compressor):  # whole codes per byte: Huffman then codes codes, not pieces
            assert isinstance(compressor, QSGD)
            head = 4 * num_blocks(numel, compressor.bucket_size)
            codes = unpack_bits(payload[head:], compressor._width, numel)
            return torch.cat([payload[:head], pack_bits(codes, _slot_bits(compressor))])
        return payload

    @staticmethod
    def _inverse(transformed: Tensor, compressor: Compressor, numel: int) -> Tensor:
        if isinstance(compressor, _Sparse):
            k = transformed.numel() // 8
            gaps = _words(transformed[: 4 * k], 4).view(torch.int32)
            indices = torch.cumsum(gaps, 0, dtype=torch.int32)
            return torch.cat([indices.view(torch.uint8), _words(transformed[4 * k :], 4)])
        if isinstance(compressor, Cast):
            return _words(transformed, 2)
        if isinstance(compressor, Identity):
            return _words(transformed, 4)
        if _straddles_bytes(compressor):
            assert isinstance(compressor, QSGD)
            head = 4 * num_blocks(numel, compressor.bucket_size)
            codes = unpack_bits(transformed[head:], _slot_bits(compressor), numel)
            return torch.cat([transformed[:head], pack_bits(codes, compressor._width)])
        return transformed


def as_wire_format(value: Any, name: str = "wire") -> WireFormat:
    """The wire format ``value`` names (``"packed"``, ``"entropy"``) or is; a ValueError / TypeError naming
    ``name`` otherwise."""
    if isinstance(value, WireFormat):
        return value
    if isinstance(value, str):
        if value == "packed":
            return PackedWire()
        if value == "entropy":
            return EntropyWire()
        raise ValueError(f"Arg `{name}` must be one of {WIRE_FORMATS} or a WireFormat, got {value!r}.")
    raise TypeError(
        f"Arg `{name}` must be one of {WIRE_FORMATS} or a lightning_commsgd.compression.WireFormat, "
        f"got {type(value).__name__}."
    )
