"""Keeping Python's cyclic garbage collector from rescanning the live heap during a save's or
load's hot loop (:func:`paused_gc`), without switching it off in the training process."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

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


def freeze_survivors() -> None:
    """Freeze what the running loop has built to keep (a parsed index, the tensors a load
    returns), so the collections its next phase triggers scan only that phase's objects. Does
    nothing unless :func:`paused_gc` froze the heap itself; unfrozen with the rest when the last
    loop ends."""
    with _gc_lock:
        if _gc_users and _gc_mode == "frozen":
            gc.freeze()
