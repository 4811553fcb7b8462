"""The codecs by name: one vocabulary for what travels, in every strategy's ``compressor`` argument.

``"bf16"`` / ``"fp16"`` (:class:`~lightning_commsgd.compression.cast.Cast`, 2 bytes per value),
``"int8"`` (:class:`BlockInt8` with blocks of 256: 1.016 bytes per value, unbiased) and ``"int4"``
(:class:`BlockInt4` with blocks of 64: 0.5625 bytes per value, unbiased). A name is shorthand for the
compressor object: ``compressor="int4"`` and ``compressor=BlockInt4(block_size=64)`` run bitwise alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning_commsgd.compression.base import Compressor
from lightning_commsgd.compression.cast import Cast
from lightning_commsgd.compression.quantizers import BlockInt4, BlockInt8

__all__ = ["CODEC_NAMES", "as_compressor", "codec_name"]

# Blocks of 64 for int4: 4 bits leave 7 levels each side, so a smaller block keeps one large value from
# flattening its neighbours to 0 (tight worst-case variance constant 0.26 instead of 0.75 at 256).
_FACTORIES: dict[str, Callable[[], Compressor]] = {
    "bf16": lambda: Cast("bf16"),
    "fp16": lambda: Cast("fp16"),
    "int8": lambda: BlockInt8(block_size=256),
    "int4": lambda: BlockInt4(block_size=64),
}
CODEC_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def as_compressor(value: Any, name: str = "compressor", *, allow_none: bool = False) -> Compressor | None:
    """The compressor ``value`` names (one of :data:`CODEC_NAMES`) or is; ``None`` if ``allow_none``.

    Raises a ValueError (an unknown name) or TypeError (anything else), naming the argument ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, Compressor):
        return value
    if isinstance(value, str):
        if value in _FACTORIES:
            return _FACTORIES[value]()
        raise ValueError(f"Arg `{name}` must be one of {CODEC_NAMES} or a Compressor, got {value!r}.")
    allowed = "None, " if allow_none else ""
    raise TypeError(
        f"Arg `{name}` must be {allowed}one of {CODEC_NAMES} or a lightning_commsgd.compression.Compressor "
        f"(e.g. PNormQuantizer(), QSGD(), TopK(0.01)), got {type(value).__name__}."
    )


def codec_name(compressor: Compressor | None) -> str:
    """A short label for logs and result tables: the codec's name where it has one, else its repr;
    ``"fp32"`` for ``None`` (exact)."""
    if compressor is None:
        return "fp32"
    for label, factory in _FACTORIES.items():
        candidate = factory()
        if type(candidate) is type(compressor) and vars(candidate) == vars(compressor):
            return label
    return repr(compressor)
