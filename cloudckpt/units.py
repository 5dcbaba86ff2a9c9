"""Sizes and durations with units: ``"256MiB"``, ``"1.5GB"``, ``"30s"``, and back to text."""

from __future__ import annotations

import math
import re

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_DURATION_UNITS = {
    "": 1,
    "s": 1,
    "ms": 0.001,
    "m": 60,
    "min": 60,
    "h": 3600,
    "d": 86400,
    "w": 604800,
}
_NUM_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str) -> int:
    """Bytes from ``1048576``, ``"256MiB"``, ``"1.5GB"``; ``ValueError`` says what is accepted."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return value
    m = _NUM_UNIT.match(str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(
            f"expected a size like 268435456, '256MiB' or '1GB' (units B, KB, MB, GB, TB, "
            f"KiB, MiB, GiB, TiB), got {value!r}"
        )
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(value: int | float | str) -> float:
    """Seconds from ``600``, ``"10m"``, ``"1d"``, ``"500ms"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite duration, got {value!r}")
        if value < 0:
            raise ValueError(f"a duration cannot be negative: {value}")
        return float(value)
    m = _NUM_UNIT.match(str(value))
    if not m or m.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(
            f"expected a duration like 600, '10m', '2h' or '1d' (units ms, s, m, h, d, w), "
            f"got {value!r}"
        )
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def format_size(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
