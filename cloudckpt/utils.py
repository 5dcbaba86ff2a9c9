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
_gc_users = 0
_gc_mode = ""  # what the first user did: "paused", "frozen" or "" (nothing)
_own_process = False


def own_process_gc() -> None:
    """Say that this process exists only to write checkpoints (the writer process): there
    :func:`paused_gc` may switch the collector off, as nobody else runs Python here."""
    global _own_process
    _own_process = True


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Keep Python's cyclic garbage collector from rescanning the live heap during a hot loop.

    A save or load of 20,000 tensors creates ~100,000 short-lived objects; each collection they
    trigger also scans the (large) live heap of a training process, about half the loop's time.
    In the writer process the collector is paused. Everywhere else it stays on for every
    thread: the objects alive when the loop starts are frozen (:func:`gc.freeze`), so
    collections meanwhile scan only what is new, and are unfrozen when the last loop ends. A
    process that froze objects itself is left alone. Nested and concurrent loops are counted.
    """
    global _gc_users, _gc_mode
    with _gc_lock:
        if _gc_users == 0:
            if _own_process and gc.isenabled():
                gc.disable()
                _gc_mode = "paused"
            elif gc.get_freeze_count() == 0:
                gc.freeze()
                _gc_mode = "frozen"
            else:
                _gc_mode = ""
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0:
                if _gc_mode == "paused":
                    gc.enable()
                elif _gc_mode == "frozen":
                    gc.unfreeze()
                _gc_mode = ""
