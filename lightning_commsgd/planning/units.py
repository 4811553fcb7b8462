"""Human units for the planner's inputs: link rates (``100mbit``), durations (``0.5ms``) and counts
(``1.3e6``, ``1.3M``); each parser raises a ValueError that says what it accepts."""

from __future__ import annotations

import math
import re

__all__ = ["format_bytes", "format_rate", "format_seconds", "parse_count", "parse_duration", "parse_rate"]

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_RATE = re.compile(rf"^{_NUMBER}\s*([kmgt]?)(bit|bits|bps|bit/s|b/s)?$")
_BYTE_RATE = re.compile(rf"^{_NUMBER}\s*([kKmMgGtT]?)B/s$")
_DURATION = re.compile(rf"^{_NUMBER}\s*(ns|us|µs|ms|s|min)?$")
_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, None: 1.0}
_COUNT = re.compile(rf"^{_NUMBER}\s*([kKmMgGbBtT]?)$")
_COUNT_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}


def _finite_positive(value: float, text: str, what: str) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be > 0, got {text!r}.")
    return value


def parse_rate(text: str | float) -> float:
    """A link rate in bits per second: ``100mbit``, ``1gbit``, ``10gbit``, ``2.5Gbps``, ``400kbit/s``,
    a plain number (bits/s), or bytes per second with a capital B, ``12MB/s`` (= 96 Mbit/s). Prefixes are
    decimal (k = 1e3, m = 1e6, g = 1e9, t = 1e12), as in ``tc``'s ``mbit``."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return _finite_positive(float(text), str(text), "A link rate")
    raw = str(text).strip()
    match = _BYTE_RATE.match(raw)
    if match:
        value = float(match.group(1)) * _PREFIX[match.group(2).lower()] * 8
        return _finite_positive(value, raw, "A link rate")
    match = _RATE.match(raw.lower())
    if not match:
        raise ValueError(
            f"Cannot read the link rate {raw!r}: use e.g. 100mbit, 1gbit, 10gbit, 2.5gbps (bits per second) "
            "or 12MB/s (bytes per second)."
        )
    return _finite_positive(float(match.group(1)) * _PREFIX[match.group(2)], raw, "A link rate")


def parse_duration(text: str | float, *, allow_zero: bool = False) -> float:
    """A duration in seconds: ``0.5ms``, ``50us``, ``5ms``, ``1.2s``, ``100ns``, ``2min``, or a plain number
    of seconds; ``allow_zero`` accepts 0 (a latency may be 0)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, raw = float(text), str(text)
    else:
        raw = str(text).strip()
        match = _DURATION.match(raw.lower())
        if not match:
            raise ValueError(f"Cannot read the duration {raw!r}: use e.g. 0.2ms, 50us, 5ms, 1.5s.")
        value = float(match.group(1)) * _SECONDS[match.group(2)]
    if allow_zero and value == 0:
        return 0.0
    return _finite_positive(value, raw, "A duration" + (" (or 0)" if allow_zero else ""))


def parse_count(text: str | float) -> int:
    """A positive whole count: ``1300000``, ``1.3e6``, ``1.3M``, ``470k``, ``7B`` (= 7e9; ``G`` too)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, raw = float(text), str(text)
    else:
        raw = str(text).strip()
        match = _COUNT.match(raw)
        if not match:
            raise ValueError(f"Cannot read the count {raw!r}: use e.g. 1300000, 1.3e6, 1.3M, 470k, 7B.")
        value = float(match.group(1)) * _COUNT_PREFIX[match.group(2).lower()]
    _finite_positive(value, raw, "A count")
    count = round(value)
    if abs(value - count) > 1e-6 * max(1.0, value) or count < 1:
        raise ValueError(f"A count must be a whole number >= 1, got {raw!r}.")
    return count


def format_rate(bits_per_second: float) -> str:
    """``1e8`` -> ``100 Mbit/s``."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if bits_per_second >= scale:
            return f"{bits_per_second / scale:g} {prefix}bit/s"
    return f"{bits_per_second:g} bit/s"


def format_seconds(seconds: float) -> str:
    """A duration with a unit that keeps 3 significant digits: ``0.0002`` -> ``200 us``."""
    if seconds == 0:
        return "0 s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_bytes(nbytes: float) -> str:
    """Decimal units, 3 significant digits: ``5.2e6`` -> ``5.2 MB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"
