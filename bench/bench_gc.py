"""The garbage collector during a save and load of many small tensors, with a trainer-sized heap.

    python bench/bench_gc.py freeze    # what cloudckpt does now (gc.freeze around the hot loop)
    python bench/bench_gc.py pause     # the former process-wide gc.disable()
    python bench/bench_gc.py nopause   # the collector left alone

20,000 tensors of 256 floats saved to and loaded from /dev/shm, four times each, next to a live
heap of 300,000 small objects; prints the middle two times of each.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import tempfile
import time
from collections.abc import Iterator

import torch

import cloudckpt
import cloudckpt.checkpoint_reader as reader
import cloudckpt.checkpoint_writer as writer


@contextlib.contextmanager
def _pause() -> Iterator[None]:
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "freeze"
    if mode == "pause":
        writer.paused_gc = reader.paused_gc = _pause  # type: ignore[assignment]
    elif mode == "nopause":
        writer.paused_gc = reader.paused_gc = contextlib.nullcontext  # type: ignore[assignment]
    sd = {f"p{i}": torch.randn(256) for i in range(20_000)}
    heap = [{"a": [i, str(i)]} for i in range(300_000)]  # a trainer's live objects
    root = tempfile.mkdtemp(dir="/dev/shm")
    saves, loads = [], []
    for i in range(4):
        t = time.perf_counter()
        cloudckpt.save(f"{root}/c{i}", sd)
        saves.append(time.perf_counter() - t)
        t = time.perf_counter()
        cloudckpt.load(f"{root}/c{i}")
        loads.append(time.perf_counter() - t)
    print(f"{mode}: save {sorted(saves)[1:3]} load {sorted(loads)[1:3]} ({len(heap)} live objects)")


if __name__ == "__main__":
    main()
