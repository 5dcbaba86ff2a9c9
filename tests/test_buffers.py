"""cloudckpt.storage.buffers: cutting and filling lists of byte views without copies."""

from __future__ import annotations

import random
from collections import deque

from cloudckpt.storage import buffers

MiB = 1 << 20


def _chunks(sizes: list[int]) -> list[bytes]:
    rng = random.Random(sum(sizes))
    return [rng.randbytes(n) for n in sizes]


def test_exact_parts_keep_every_byte_in_order() -> None:
    chunks = _chunks([10, 3000, 1, 5000, 0, 777])
    parts = list(buffers.iter_parts(chunks, 1024))
    sizes = [buffers.total(p) for p in parts]
    assert sizes[:-1] == [1024] * (len(parts) - 1) and 0 < sizes[-1] <= 1024
    assert b"".join(bytes(v) for p in parts for v in p) == b"".join(chunks)


def test_flexible_parts_send_large_chunks_as_single_views() -> None:
    part, least = 8 * MiB, 5 * MiB
    chunks = _chunks([100, 16 * MiB, 16 * MiB, 3 * MiB, 200, 20 * MiB, 50])
    parts = list(buffers.iter_parts(chunks, part, min_part=least))
    sizes = [buffers.total(p) for p in parts]
    assert all(least <= s < part + least for s in sizes[:-1]), sizes
    assert b"".join(bytes(v) for p in parts for v in p) == b"".join(chunks)
    single = [p for p in parts if len(p) == 1]
    # only the parts that gather small chunks (or a chunk's head and tail) hold several views
    assert sum(buffers.total(p) for p in single) >= 0.6 * sum(sizes)
    for p in single:  # views into the caller's memory, not copies
        assert isinstance(p[0].obj, bytes)


def test_skip_window_split_and_scatter() -> None:
    data = bytes(range(200))
    views = [memoryview(data)[:50], memoryview(data)[50:120], memoryview(data)[120:]]
    assert b"".join(buffers.skip(views, 60)) == data[60:]
    assert b"".join(buffers.window(views, 40, 100)) == data[40:140]
    groups = buffers.split(views, 64)
    assert [buffers.total(g) for g in groups] == [64, 64, 64, 8]
    out = [bytearray(30), bytearray(90), bytearray(80)]
    targets = deque(memoryview(b) for b in out)
    assert buffers.scatter(data[:100], targets) == 100
    assert buffers.scatter(data[100:], targets) == 100
    assert not targets and b"".join(out) == data
