"""Walking lists of byte views: one implementation for every backend's data path.

A write is a stream of chunks (tensor memory, headers); a read fills a list of destination
views. Local ``writev``/``preadv``, S3 parts, GCS pieces and ranged reads all cut, skip and group
such lists; the helpers here do it without copying a byte.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence

Buffer = bytes | bytearray | memoryview


def byte_view(chunk: Buffer) -> memoryview:
    """``chunk`` as a flat view of unsigned bytes (no copy)."""
    view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def total(views: Iterable[memoryview]) -> int:
    """Bytes in ``views`` together."""
    return sum(v.nbytes for v in views)


def skip(views: Sequence[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes (after a partial ``writev``, a resumed read)."""
    out: list[memoryview] = []
    for v in views:
        if n >= v.nbytes:
            n -= v.nbytes
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


def window(views: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """The slices of ``views`` (concatenated) that cover ``[start, start + length)``."""
    out: list[memoryview] = []
    pos, end = 0, start + length
    for v in views:
        v_end = pos + v.nbytes
        if v_end > start and pos < end:
            out.append(v[max(start, pos) - pos : min(end, v_end) - pos])
        pos = v_end
        if pos >= end:
            break
    return out


def split(views: Sequence[memoryview], size: int) -> list[list[memoryview]]:
    """``views`` cut into consecutive groups of ``size`` bytes (the last may be shorter)."""
    groups: list[list[memoryview]] = []
    cur: list[memoryview] = []
    room = size
    for v in views:
        while v.nbytes:
            take = min(room, v.nbytes)
            cur.append(v[:take])
            v = v[take:]
            room -= take
            if room == 0:
                groups.append(cur)
                cur, room = [], size
    if cur:
        groups.append(cur)
    return groups


def scatter(data: Buffer, targets: deque[memoryview]) -> int:
    """Copy ``data`` into the front of ``targets``; drop filled views from the deque in place.

    Returns the bytes copied (less than ``len(data)`` only when ``targets`` ran out).
    """
    src = byte_view(data)
    copied = 0
    while src.nbytes and targets:
        dst = targets[0]
        n = min(dst.nbytes, src.nbytes)
        dst[:n] = src[:n]
        copied += n
        src = src[n:]
        if n == dst.nbytes:
            targets.popleft()
        else:
            targets[0] = dst[n:]
    return copied


def iter_parts(
    chunks: Iterable[Buffer], part_size: int, *, min_part: int | None = None
) -> Iterator[list[memoryview]]:
    """The bytes of ``chunks`` as consecutive parts, each a list of views into the chunks.

    Without ``min_part`` every part but the last holds exactly ``part_size`` bytes (GCS pieces).
    With it, part sizes may vary between ``min_part`` and ``part_size + min_part`` so that a
    large chunk is sent as whole parts of its own (a single view: nothing to copy), and only
    the few parts that gather small chunks hold more than one view (S3 multipart).
    """
    pending: list[memoryview] = []
    pend = 0
    for chunk in chunks:
        v = byte_view(chunk)
        if min_part is None:
            while v.nbytes:
                take = min(v.nbytes, part_size - pend)
                pending.append(v[:take])
                pend += take
                v = v[take:]
                if pend == part_size:
                    yield pending
                    pending, pend = [], 0
            continue
        if pend and v.nbytes:
            if pend + v.nbytes <= part_size:
                pending.append(v)
                pend += v.nbytes
                v = v[v.nbytes :]
                if pend == part_size:
                    yield pending
                    pending, pend = [], 0
            elif pend >= min_part:
                yield pending
                pending, pend = [], 0
            else:
                take = min_part - pend
                pending.append(v[:take])
                v = v[take:]
                yield pending
                pending, pend = [], 0
        if v.nbytes:
            if v.nbytes < min_part:
                pending, pend = [v], v.nbytes
                continue
            while v.nbytes >= part_size + min_part:
                yield [v[:part_size]]
                v = v[part_size:]
            yield [v]
    if pending:
        yield pending
