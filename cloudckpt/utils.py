"""Small helpers: futures (as in the seed), sizes and durations with units."""

from __future__ import annotations

import contextlib
import gc
import math
import re
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

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


def wrap_future(original_result: Any) -> Future[None]:
    """A future that completes with ``None`` when ``original_result`` (a future or not) does."""
    masked: Future[None] = Future()
    if isinstance(original_result, Future):

        def on_complete(_: Future[Any]) -> None:
            try:
                original_result.result()
                masked.set_result(None)
            except Exception as e:
                masked.set_exception(e)

        original_result.add_done_callback(on_complete)
    else:
        masked.set_result(None)
    return masked


_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a hot loop.

    A save or load of 20,000 tensors creates ~100,000 short-lived objects; with the collector on,
    its generation scans of the (large) live heap cost about 3x the loop itself. Nested and
    concurrent pauses are counted; the collector comes back as it was when the last one ends.
    """
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()
