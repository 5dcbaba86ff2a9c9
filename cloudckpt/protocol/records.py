"""The typed records of the on-storage format and of the commit: names, index, manifest,
a rank's outcome and the commit result.

Format version 2 (docs/architecture.md, "On storage"): every object a save writes carries the
save attempt's id in its name, ``data/<attempt>/rank-RRRRR-FFFF.safetensors`` and
``index/<attempt>/rank-RRRRR.json``; ``manifest.json`` names every object of its checkpoint and
carries its own CRC32C. Version 1 (``data/rank-RRRRR-FFFF.safetensors``,
``index/rank-RRRRR.json``, no manifest CRC) is still read.

Free of torch: the ``cloudckpt`` command lists and checks checkpoints without importing it.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptCheckpointError
from ..format.chunks import GlobalRecord
from ..format.encoding import (
    PLAIN_ITEMSIZES,
    check_no_overlap,
    check_tree,
    crc32c,
    dtype_itemsize,
    parse_json,
)

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
INDEX_DIR = "index"

# -- names ----------------------------------------------------------------------------------


def new_attempt_id() -> str:
    """A fresh save attempt id: UTC time (for people reading listings) and 48 random bits."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:12]}"


def data_file_name(rank: int, n: int, attempt: str) -> str:
    """``data/<attempt>/rank-00000-0000.safetensors``."""
    return f"{DATA_DIR}/{attempt}/rank-{rank:05d}-{n:04d}.safetensors"


def index_name(rank: int, attempt: str) -> str:
    """``index/<attempt>/rank-00000.json``."""
    return f"{INDEX_DIR}/{attempt}/rank-{rank:05d}.json"


def attempt_dir(name: str) -> str | None:
    """``data/<attempt>`` or ``index/<attempt>`` for a version-2 object name, ``None`` for a
    version-1 name (directly under ``data/`` or ``index/``) or anything else."""
    parts = name.split("/")
    if len(parts) == 3 and parts[0] in (DATA_DIR, INDEX_DIR):
        return f"{parts[0]}/{parts[1]}"
    return None


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def check_name(name: object, where: str) -> str:
    """``name`` if it is a relative path inside the checkpoint, else ``CorruptCheckpointError``.

    Refused: empty names or components, absolute paths, ``.``/``..`` components, NUL bytes,
    backslashes and anything that starts like a URI scheme or drive (``s3:``, ``C:``).
    """
    problem = None
    if not isinstance(name, str) or not name:
        problem = "is empty or not a string"
    elif "\x00" in name:
        problem = "contains a NUL byte"
    elif name.startswith("/"):
        problem = "is an absolute path"
    elif "\\" in name:
        problem = "contains a backslash"
    elif _SCHEME.match(name):
        problem = "starts with a URI scheme or drive"
    else:
        parts = name.split("/")
        if any(p == "" for p in parts):
            problem = "has an empty path component"
        elif any(p in (".", "..") for p in parts):
            problem = "has a '.' or '..' component"
    if problem is not None:
        raise CorruptCheckpointError(
            f"{where}: object name {name!r} {problem}; every name in a manifest or index must "
            "be a relative path inside the checkpoint. The checkpoint is damaged or was "
            "tampered with: do not load it, use an earlier one."
        )
    assert isinstance(name, str)
    return name


# -- field checks ---------------------------------------------------------------------------

MAX_OFFSET = (1 << 63) - 1
"""Largest size, offset or length a stored record may hold (what a file offset can be)."""
MAX_DIMS = 64  # torch's own limit on a tensor's dimensions


def read_int(value: Any, what: str, where: str, lo: int = 0, hi: int = MAX_OFFSET) -> int:
    """``value`` if it is an integer (not a bool, not a float) in ``lo..hi``."""
    if type(value) is not int or not lo <= value <= hi:
        shown = (
            repr(value)[:40] if isinstance(value, (int, float, str, bool)) else type(value).__name__
        )
        raise CorruptCheckpointError(
            f"{where}: {what} must be an integer in {lo}..{hi}, got {shown}; the object is "
            "damaged. Load an earlier checkpoint."
        )
    return value


def read_str(value: Any, what: str, where: str) -> str:
    if type(value) is not str:
        raise CorruptCheckpointError(
            f"{where}: {what} must be a string, got {type(value).__name__}; the object is damaged"
        )
    return value


def read_list(value: Any, what: str, where: str) -> list[Any]:
    if type(value) is not list:
        raise CorruptCheckpointError(
            f"{where}: {what} must be a list, got {type(value).__name__}; the object is damaged"
        )
    return value


def read_dict(value: Any, what: str, where: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise CorruptCheckpointError(
            f"{where}: {what} must be an object, got {type(value).__name__}; the object is damaged"
        )
    return value


def _read_row(row: Any, n: int, what: str, where: str) -> list[Any]:
    row = read_list(row, what, where)
    if len(row) < n:
        raise CorruptCheckpointError(f"{where}: {what} has {len(row)} fields, expected {n}")
    return row


# -- index ----------------------------------------------------------------------------------


@dataclass(slots=True)
class TensorRecord:
    """Where one tensor lives and what it is. (A later field may carry a chunk's offsets in a
    global tensor; readers ignore the fields they do not know.)"""

    key: str
    dtype: str
    shape: list[int]
    file: int  # position in RankIndex.files
    offset: int  # absolute byte offset in the file
    length: int
    crc32c: int

    def to_row(self) -> list[Any]:
        return [self.key, self.dtype, self.shape, self.file, self.offset, self.length, self.crc32c]

    @classmethod
    def from_row(cls, row: Any, where: str = "index") -> TensorRecord:
        """One ``tensors`` row, every field checked for type and range."""
        k, d, sh, f, o, n, c = _read_row(row, 7, "a tensors row", where)[:7]
        key = read_str(k, "a tensor key", where)
        at = f"tensor {key[:80]!r}"
        shape = read_list(sh, f"{at} shape", where)
        if len(shape) > MAX_DIMS:
            raise CorruptCheckpointError(f"{where}: {at} has {len(shape)} dimensions")
        return cls(
            key,
            read_str(d, f"{at} dtype", where),
            [read_int(x, f"{at} shape", where) for x in shape],
            read_int(f, f"{at} file number", where),
            read_int(o, f"{at} offset", where),
            read_int(n, f"{at} length", where),
            read_int(c, f"{at} CRC32C", where, hi=0xFFFFFFFF),
        )


@dataclass
class FileRecord:
    """One data file of a rank: its name relative to the checkpoint and its size."""

    path: str
    size: int


@dataclass
class RankIndex:
    """One rank's index: its tree, its data files and where each tensor is in them."""

    rank: int
    world_size: int
    tree: dict[str, Any]
    files: list[FileRecord]
    tensors: list[TensorRecord]
    attempt: str = ""  # the save attempt that wrote it ("" in version 1)
    globals: list[GlobalRecord] = field(default_factory=list)  # DTensor and replicated leaves

    def to_json(self) -> bytes:
        """The index as compact JSON. The ``tensors`` rows are encoded a slice at a time, so a
        large index never holds a row list per tensor at once."""
        encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
        head = {
            "format": "cloudckpt-index",
            "format_version": FORMAT_VERSION,
            "attempt": self.attempt,
            "rank": self.rank,
            "world_size": self.world_size,
            "files": [[f.path, f.size] for f in self.files],
        }
        rows = self.tensors
        step = 1024
        parts = [
            encode(head)[:-1],
            ',"tensors":[',
            ",".join(
                encode([t.to_row() for t in rows[i : i + step]])[1:-1]
                for i in range(0, len(rows), step)
            ),
            '],"tree":',
            encode(self.tree),
        ]
        if self.globals:
            parts += [',"globals":', encode([g.to_row() for g in self.globals])]
        parts.append("}")
        return "".join(parts).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> RankIndex:
        doc = load_json(raw, where)
        check_format(doc, "cloudckpt-index", where)
        try:
            files = []
            for row in read_list(doc["files"], "files", where):
                p, size = _read_row(row, 2, "a files row", where)[:2]
                files.append(FileRecord(check_name(p, where), read_int(size, "a file size", where)))
            rows = read_list(doc["tensors"], "tensors", where)
            tensors, checked = _tensor_records(rows, files)
            if not checked:  # a row failed a check: every row again, to raise the first error
                tensors += [TensorRecord.from_row(row, where) for row in rows[len(tensors) :]]
            world = read_int(doc["world_size"], "world_size", where, lo=1)
            idx = cls(
                read_int(doc["rank"], "rank", where, hi=world - 1),
                world,
                read_dict(doc["tree"], "tree", where),
                files,
                tensors,
                read_str(doc.get("attempt", ""), "attempt", where),
                [
                    GlobalRecord.from_row(row, where)
                    for row in read_list(doc.get("globals", []), "globals", where)
                ],
            )
        except KeyError as e:
            raise CorruptCheckpointError(f"{where}: malformed index (no {e})") from e
        idx.validate(where, tensors_checked=checked)
        return idx

    def validate(self, where: str, *, tensors_checked: bool = False) -> None:
        """The tree as loading reads it; every tensor inside its file, sizes matching dtype and
        shape, no overlaps (``tensors_checked``: :func:`_tensor_records` has checked those)."""
        check_tree(self.tree, len(self.tensors), where, len(self.globals))
        if not tensors_checked:
            self._validate_tensors(where)
        for g in self.globals:
            g.validate(where, self.tensors)

    def _validate_tensors(self, where: str) -> None:
        per_file: dict[int, list[tuple[int, int, str]]] = {}
        for t in self.tensors:
            if not 0 <= t.file < len(self.files):
                raise CorruptCheckpointError(f"{where}: tensor {t.key!r} names no file")
            size = self.files[t.file].size
            if t.offset < 8 or t.length < 0 or t.offset + t.length > size:
                raise CorruptCheckpointError(
                    f"{where}: tensor {t.key!r} claims bytes {t.offset}..{t.offset + t.length} "
                    f"of {self.files[t.file].path} ({size} bytes)"
                )
            itemsize = dtype_itemsize(t.dtype, where)
            if (t.shape and min(t.shape) < 0) or math.prod(t.shape) * itemsize != t.length:
                raise CorruptCheckpointError(
                    f"{where}: tensor {t.key!r} length disagrees with its shape"
                )
            per_file.setdefault(t.file, []).append((t.offset, t.offset + t.length, t.key))
        for f, ranges in per_file.items():
            check_no_overlap(ranges, f"{where} ({self.files[f].path})")


def _tensor_records(rows: list[Any], files: list[FileRecord]) -> tuple[list[TensorRecord], bool]:
    """The ``tensors`` rows of an index as records, in one pass of plain checks: each field's
    type and range (as :meth:`TensorRecord.from_row`), and each tensor inside its file, its
    length matching dtype and shape, after the previous tensor of its file (as
    :meth:`RankIndex.validate`; a writer stores them in order).

    Returns ``(records, True)`` when every row passed; else the records of the rows before the
    first that did not, and ``False``: the caller then checks the rest field by field, which
    names the problem. Each row is dropped from ``rows`` once its record exists, so a large
    index does not hold both forms at once."""
    sizes = [f.size for f in files]
    ends = [0] * len(files)  # end of the last tensor seen in each file
    itemsize_of = PLAIN_ITEMSIZES.get
    out: list[TensorRecord] = []
    append = out.append
    for i, row in enumerate(rows):
        if type(row) is not list or len(row) < 7:
            return out, False
        k, d, sh, f, o, n, c = row if len(row) == 7 else row[:7]
        if not (
            type(k) is str
            and type(d) is str
            and type(sh) is list
            and len(sh) <= MAX_DIMS
            and type(f) is int
            and 0 <= f < len(sizes)
            and type(o) is int
            and type(n) is int
            and o >= 8
            and ends[f] <= o
            and n >= 0
            and o + n <= sizes[f]
            and type(c) is int
            and 0 <= c <= 0xFFFFFFFF
        ):
            return out, False
        nbytes = itemsize_of(d)
        if nbytes is None:  # a rare dtype: its size comes from torch, in the slower check
            return out, False
        for x in sh:
            if type(x) is not int or not 0 <= x <= MAX_OFFSET:
                return out, False
            nbytes *= x
        if nbytes != n:
            return out, False
        ends[f] = o + n
        append(TensorRecord(k, d, sh, f, o, n, c))
        rows[i] = None
    return out, True


# -- manifest -------------------------------------------------------------------------------


@dataclass
class RankEntry:
    """A rank in the manifest: its index (name, size, CRC32C) and its data files."""

    rank: int
    index: str
    size: int
    crc32c: int
    files: list[str]
    bytes: int

    def names(self) -> list[str]:
        return [self.index, *self.files]


@dataclass
class Manifest:
    """``manifest.json``: the commit record of a checkpoint, naming every object of it."""

    world_size: int
    ranks: list[RankEntry]
    library_version: str
    created_unix: float = field(default_factory=time.time)
    metadata: dict[str, Any] = field(default_factory=dict)
    attempt: str = ""  # the committing save attempt ("" in version 1)
    format_version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.ranks)

    def names(self) -> set[str]:
        """Every object this manifest names (itself included)."""
        return {MANIFEST_NAME, *(n for r in self.ranks for n in r.names())}

    def _doc(self) -> dict[str, Any]:
        return {
            "format": "cloudckpt",
            "format_version": self.format_version,
            "attempt": self.attempt,
            "library_version": self.library_version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_unix)),
            "created_unix": self.created_unix,
            "world_size": self.world_size,
            "ranks": [vars(r) for r in self.ranks],
            "metadata": self.metadata,
        }

    def to_json(self) -> bytes:
        """The manifest with its own CRC32C (see :func:`manifest_crc`) as the last field."""
        doc = self._doc()
        doc["crc32c"] = manifest_crc(doc)
        return json.dumps(doc, indent=1, allow_nan=False).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        """Parse and check a manifest: its own CRC32C (version 2), its ranks and every name."""
        doc = load_json(raw, where)
        check_format(doc, "cloudckpt", where)
        version = int(doc["format_version"])
        if version >= 2:
            stored = doc.pop("crc32c", None)
            if type(stored) is not int or stored != manifest_crc(doc, where):
                raise CorruptCheckpointError(
                    f"{where}: the manifest's own CRC32C "
                    f"{'is missing' if stored is None else 'does not match its content'}; "
                    "the manifest is damaged. Load an earlier checkpoint."
                )
        try:
            listed = read_list(doc["ranks"], "ranks", where)
            # the listed ranks bound world_size: a damaged one must not size an allocation
            world = read_int(doc["world_size"], "world_size", where, lo=1, hi=max(len(listed), 1))
            ranks = []
            for r in listed:
                r = read_dict(r, "a ranks entry", where)
                ranks.append(
                    RankEntry(
                        read_int(r["rank"], "a rank", where, hi=world - 1),
                        r["index"],  # checked by check_name below
                        read_int(r["size"], "an index size", where),
                        read_int(r["crc32c"], "an index CRC32C", where, hi=0xFFFFFFFF),
                        read_list(r["files"], "a rank's files", where),
                        read_int(r["bytes"], "a rank's bytes", where),
                    )
                )
            created = doc.get("created_unix", 0.0)
            if type(created) not in (int, float) or not math.isfinite(created):
                raise CorruptCheckpointError(f"{where}: created_unix is not a finite number")
            m = cls(
                world,
                ranks,
                read_str(doc.get("library_version", ""), "library_version", where),
                float(created),
                read_dict(doc.get("metadata") or {}, "metadata", where),
                read_str(doc.get("attempt", ""), "attempt", where),
                version,
            )
        except KeyError as e:
            raise CorruptCheckpointError(f"{where}: malformed manifest (no {e})") from e
        if sorted(r.rank for r in m.ranks) != list(range(m.world_size)):
            raise CorruptCheckpointError(f"{where}: manifest ranks do not match world_size")
        for r in m.ranks:
            for name in r.names():
                check_name(name, where)
        return m


def manifest_crc(doc: dict[str, Any], where: str = "manifest") -> int:
    """CRC32C of a manifest document without its ``crc32c`` field, over its canonical JSON
    (sorted keys, no spaces): independent of how the file is indented."""
    body = {k: v for k, v in doc.items() if k != "crc32c"}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (RecursionError, ValueError, TypeError) as e:
        raise CorruptCheckpointError(f"{where}: the manifest cannot be re-encoded ({e})") from e
    return crc32c(text.encode())


def load_json(raw: bytes, where: str) -> dict[str, Any]:
    """A JSON object from ``raw``, parsed with :func:`cloudckpt.format.parse_json` (no
    ``NaN``/``Infinity``, bounded nesting, failures as ``CorruptCheckpointError``)."""
    doc = parse_json(raw, where)
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where} is not a JSON object; the object is damaged")
    return doc


def check_format(doc: dict[str, Any], kind: str, where: str) -> None:
    if doc.get("format") != kind:
        raise CorruptCheckpointError(f"{where}: not a {kind} document")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptCheckpointError(f"{where}: format_version {version!r} is not a version")
    if version > FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{where}: format version {version!r} is newer than this cloudckpt understands "
            f"({FORMAT_VERSION}); upgrade cloudckpt"
        )


# -- the commit's messages between ranks ------------------------------------------------------


@dataclass
class RankOutcome:
    """What one rank reports at the barrier: failed (``error``), or the index it wrote."""

    rank: int
    ok: bool = True
    error: str = ""
    index: str = ""
    size: int = 0
    crc32c: int = 0
    files: list[str] = field(default_factory=list)
    bytes: int = 0

    def entry(self) -> RankEntry:
        """This rank's line in the manifest."""
        return RankEntry(
            self.rank, self.index, self.size, self.crc32c, list(self.files), self.bytes
        )

    def to_json(self) -> str:
        return json.dumps(vars(self))

    @classmethod
    def from_json(cls, raw: Any) -> RankOutcome:
        """Parse :meth:`to_json`'s text (``str`` or ``bytes``)."""
        doc = json.loads(raw)
        return cls(
            int(doc["rank"]),
            bool(doc["ok"]),
            str(doc.get("error", "")),
            str(doc.get("index", "")),
            int(doc.get("size", 0)),
            int(doc.get("crc32c", 0)),
            [str(f) for f in doc.get("files", [])],
            int(doc.get("bytes", 0)),
        )


@dataclass
class CommitResult:
    """What rank 0 tells the others after the commit."""

    ok: bool
    error: str = ""

    def to_json(self) -> str:
        return json.dumps(vars(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> CommitResult:
        doc = json.loads(raw)
        return cls(bool(doc["ok"]), str(doc.get("error", "")))
