"""``verify``: read every object of a committed checkpoint and check it against its records."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError, CorruptCheckpointError
from ..format.encoding import MAX_HEADER_BYTES, crc32c, parse_safetensors_header, safetensors_entry
from ..storage.interface import Backend
from .committed import CommittedCheckpoint, open_checkpoint, unreadable_name
from .records import TensorRecord

CHUNK = 8 << 20  # bytes per read when streaming


@dataclass
class VerifyReport:
    """What :func:`verify` found: ``problems`` (each naming the object and key; empty when the
    checkpoint is whole) and counts of what was checked."""

    uri: str
    problems: list[str] = field(default_factory=list)
    ranks: int = 0
    files: int = 0
    tensors: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    uri: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    backend: str | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check the committed checkpoint at ``uri`` end to end: the manifest's own CRC32C and
    names, each index against the manifest, each data file's safetensors header against the
    index, and every tensor's CRC32C. Returns a report; raises only when the checkpoint cannot
    be opened at all (not found, not committed, a damaged manifest) or the store fails.

    ``on_bytes`` is called with the size of each piece read (for a progress bar).
    """
    return verify_checkpoint(open_checkpoint(uri, backend, storage_options), on_bytes)


def verify_checkpoint(
    ck: CommittedCheckpoint, on_bytes: Callable[[int], None] | None = None
) -> VerifyReport:
    """:func:`verify` for an opened checkpoint."""
    report = VerifyReport(ck.uri)
    tick = on_bytes or (lambda n: None)
    for entry in ck.manifest.ranks:
        report.ranks += 1
        try:
            idx = ck.read_index(entry.rank)
        except CheckpointError as e:
            report.problems.append(str(e))
            continue
        if sorted(entry.files) != sorted(f.path for f in idx.files):
            report.problems.append(
                f"{ck.object_uri(entry.index)}: lists files {sorted(f.path for f in idx.files)} "
                f"but the manifest lists {sorted(entry.files)}"
            )
        per_file: dict[int, list[TensorRecord]] = {}
        for t in idx.tensors:
            per_file.setdefault(t.file, []).append(t)
        for n, frec in enumerate(idx.files):
            report.files += 1
            tensors = sorted(per_file.get(n, []), key=lambda t: t.offset)
            report.tensors += len(tensors)
            report.problems += _verify_file(ck, frec.path, frec.size, tensors, tick, report)
    return report


def read_chunks(
    backend: Backend, path: str, start: int, end: int, on_chunk: Callable[[int], None]
) -> Iterator[tuple[int, memoryview]]:
    """``(offset, bytes)`` of ``path[start:end]`` in fresh CHUNK-sized buffers."""
    pos = start
    while pos < end:
        buf = memoryview(bytearray(min(CHUNK, end - pos)))
        backend.read_into(path, pos, [buf])
        yield pos, buf
        pos += len(buf)
        on_chunk(len(buf))


def _verify_file(
    ck: CommittedCheckpoint,
    rel: str,
    size: int,
    tensors: list[TensorRecord],
    on_bytes: Callable[[int], None],
    report: VerifyReport,
) -> list[str]:
    backend, path, where = ck.backend, ck.backend.join(ck.root, rel), ck.object_uri(rel)
    try:
        actual = backend.size(path)
    except FileNotFoundError:
        return [f"{where} is missing but the index lists it ({len(tensors)} tensors)"]
    except (ValueError, TypeError) as error:
        return [str(unreadable_name(where, error))]
    if actual != size:
        return [f"{where} is {actual} bytes; the index says {size}: the file is damaged"]
    problems = []
    try:
        head = bytearray(min(size, 8))
        backend.read_into(path, 0, [memoryview(head)])
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        head = bytearray(min(size, 8 + min(n, MAX_HEADER_BYTES)))
        backend.read_into(path, 0, [memoryview(head)])
        entries = {e.name: e for e in parse_safetensors_header(bytes(head), size, where)}
        for t in tensors:
            e = entries.pop(t.key, None)
            want_dtype, want_shape = safetensors_entry(t.dtype, tuple(t.shape), t.length)
            if e is None:
                problems.append(f"{where}: tensor {t.key!r} is in the index but not the header")
            elif (e.start, e.end, e.dtype, e.shape) != (
                t.offset,
                t.offset + t.length,
                want_dtype,
                want_shape,
            ):
                problems.append(
                    f"{where}: tensor {t.key!r}: the safetensors header says {e.dtype} "
                    f"{e.shape} at {e.start}..{e.end}, the index {want_dtype} {want_shape} at "
                    f"{t.offset}..{t.offset + t.length}"
                )
        problems += [f"{where}: tensor {k!r} is in the header but not the index" for k in entries]
    except CorruptCheckpointError as e:
        problems.append(str(e))
    except (OSError, EOFError) as e:
        return [f"{where}: reading the header failed: {e}"]
    problems += _verify_crcs(backend, path, where, tensors, on_bytes)
    report.bytes += size
    return problems


def _verify_crcs(
    backend: Backend,
    path: str,
    where: str,
    tensors: list[TensorRecord],
    on_bytes: Callable[[int], None],
) -> list[str]:
    """Stream the tensors' span of the file once, CRC32C of each tensor on the way."""
    if not tensors:
        return []
    crcs = [0] * len(tensors)
    first = 0
    start, end = tensors[0].offset, max(t.offset + t.length for t in tensors)
    try:
        for pos, buf in read_chunks(backend, path, start, end, on_bytes):
            stop = pos + len(buf)
            while first < len(tensors) and tensors[first].offset + tensors[first].length <= pos:
                first += 1
            k = first
            while k < len(tensors) and tensors[k].offset < stop:
                t = tensors[k]
                lo, hi = max(t.offset, pos), min(t.offset + t.length, stop)
                if hi > lo:
                    crcs[k] = crc32c(buf[lo - pos : hi - pos], crcs[k])
                k += 1
    except (OSError, EOFError) as e:
        return [f"{where}: reading tensor data failed: {e}"]
    return [
        f"{where}: tensor {t.key!r}: CRC32C {crc:08x} differs from the index's {t.crc32c:08x}; "
        "its bytes are damaged"
        for t, crc in zip(tensors, crcs)
        if crc != t.crc32c
    ]
