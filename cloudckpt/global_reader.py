"""Reading global leaves: from the stored chunks that intersect a target box, only the rows
needed, each checksum block verified, into the target (a DTensor's local tensor in place, or a
whole tensor assembled from its chunks).

Every rank's index records the chunks that rank wrote, so a reader of a global leaf reads every
rank's index once (:func:`load_catalog`) and then plans per target (:func:`plan_reads`).
"""

from __future__ import annotations

import math
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import CorruptCheckpointError, StateDictMismatchError
from .format.chunks import Box, ChunkRecord, GlobalRecord, ReadPiece, read_pieces
from .format.encoding import crc32c, dtype_from_name, tensor_bytes
from .global_tensors import MeshCache, is_dtensor, layout_of
from .protocol.committed import CommittedCheckpoint
from .protocol.records import RankIndex


@dataclass(frozen=True)
class StoredChunk:
    """A chunk as stored: the rank whose index lists it, its record and where its bytes are."""

    rank: int
    chunk: ChunkRecord
    file: str  # relative to the checkpoint
    offset: int  # of the chunk's first byte in the file


@dataclass
class Catalog:
    """Every stored chunk of every global leaf, by key, from all ranks' indexes."""

    records: dict[str, GlobalRecord] = field(default_factory=dict)
    chunks: dict[str, list[StoredChunk]] = field(default_factory=dict)


def load_catalog(ckpt: CommittedCheckpoint, known: dict[int, RankIndex], pool: Executor) -> Catalog:
    """Read the indexes not in ``known`` (in parallel) and list every global leaf's chunks."""
    ranks = [r.rank for r in ckpt.manifest.ranks if r.rank not in known]
    indexes = dict(known)
    for r, idx in zip(ranks, pool.map(ckpt.read_index, ranks)):
        indexes[r] = idx
    cat = Catalog()
    for r in sorted(indexes):
        idx = indexes[r]
        for g in idx.globals:
            first = cat.records.setdefault(g.key, g)
            if (first.shape, first.dtype) != (g.shape, g.dtype):
                raise CorruptCheckpointError(
                    f"{ckpt.uri}: ranks disagree on global leaf {g.key!r} ({first.shape} "
                    f"{first.dtype} vs {g.shape} {g.dtype} in rank {r}'s index); the checkpoint "
                    "is damaged"
                )
            for c in g.chunks:
                rec = idx.tensors[c.tensor]
                cat.chunks.setdefault(g.key, []).append(
                    StoredChunk(r, c, idx.files[rec.file].path, rec.offset)
                )
    return cat


@dataclass
class GlobalRequest:
    """A box of a global leaf to fill: ``dest`` holds exactly the box (contiguous or not)."""

    record: GlobalRecord
    box: Box
    dest: torch.Tensor
    copy_to: torch.Tensor | None = None  # the caller's tensor, when ``dest`` is a stand-in


def global_request(
    record: GlobalRecord,
    key: str,
    target: Any,
    rank: int,
    where: str,
    meshes: MeshCache | None = None,
) -> tuple[GlobalRequest, Any]:
    """The request filling ``target`` (a DTensor: its local shard; a plain tensor or ``None``:
    the whole tensor) and what the loaded state dict holds at ``key``. ``meshes`` is the load's
    :data:`MeshCache`: each device mesh read once per load."""
    dtype = dtype_from_name(record.dtype, where)
    shape = tuple(record.shape)
    full = Box((0,) * len(shape), shape)
    if target is None:
        dest = torch.empty(shape, dtype=dtype)
        return GlobalRequest(record, full, dest), dest
    if tuple(target.shape) != shape or target.dtype != dtype:
        raise StateDictMismatchError(
            f"{key}: the target is {tuple(target.shape)} {target.dtype} but {where} holds a "
            f"global tensor of {shape} {dtype}; reshape or recast the target to match (shape "
            "and dtype mismatches always raise)"
        )
    if is_dtensor(target):
        box = layout_of(target, key, meshes).box_of(rank)
        with torch.no_grad():  # with grad on, to_local is an autograd call (~1 ms a tensor)
            local = target.to_local()
    else:
        box, local = full, target
    if local.device.type == "cpu":
        return GlobalRequest(record, box, local), target
    return GlobalRequest(record, box, torch.empty(box.sizes, dtype=dtype), local), target


@dataclass(frozen=True)
class _Job:
    request: GlobalRequest
    stored: StoredChunk
    piece: ReadPiece


def plan_reads(requests: list[GlobalRequest], catalog: Catalog, where: str) -> list[_Job]:
    """For each request, the stored chunks' rows it needs; a box the chunks do not cover is
    corruption (a chunk nobody wrote)."""
    jobs: list[_Job] = []
    for req in requests:
        stored = catalog.chunks.get(req.record.key, [])
        pieces = read_pieces(req.box, [(s.chunk.box, s.chunk.block_rows) for s in stored])
        for n, p in enumerate(pieces):  # stored chunks never overlap: the sum below counts
            if any(p.box.intersect(q.box) is not None for q in pieces[n + 1 :]):
                raise CorruptCheckpointError(
                    f"{where}: global leaf {req.record.key!r}: two stored chunks overlap at "
                    f"offsets {list(p.box.offsets)}; the index is damaged. Load an earlier "
                    "checkpoint."
                )
        if sum(p.box.numel for p in pieces) != req.box.numel:
            raise CorruptCheckpointError(
                f"{where}: global leaf {req.record.key!r}: the stored chunks do not cover "
                f"offsets {list(req.box.offsets)} sizes {list(req.box.sizes)}; the checkpoint is "
                "incomplete (a replicated leaf missing on some rank at save time?) or damaged. "
                "Load an earlier checkpoint."
            )
        jobs.extend(_Job(req, stored[p.chunk], p) for p in pieces)
    return jobs


def fetch_globals(
    ckpt: CommittedCheckpoint, requests: list[GlobalRequest], catalog: Catalog, pool: Executor
) -> int:
    """Fill every request from its chunks, in parallel; returns the bytes read."""
    jobs = plan_reads(requests, catalog, ckpt.uri)
    nbytes = sum(pool.map(lambda j: _read_piece(ckpt, j), jobs))
    for req in requests:
        if req.copy_to is not None:
            req.copy_to.copy_(req.dest)
    return nbytes


def read_box(
    ckpt: CommittedCheckpoint, catalog: Catalog, key: str, box: Box, pool: Executor
) -> torch.Tensor:
    """A fresh tensor holding ``box`` of global leaf ``key``."""
    record = catalog.records[key]
    dest = torch.empty(box.sizes, dtype=dtype_from_name(record.dtype, ckpt.uri))
    fetch_globals(ckpt, [GlobalRequest(record, box, dest)], catalog, pool)
    return dest


def read_range(
    ckpt: CommittedCheckpoint, rel: str, offset: int, buffers: list[memoryview], key: str
) -> None:
    """Read ``rel`` from ``offset`` into ``buffers``; store errors become library errors."""
    ckpt.read_object(
        rel, lambda path: ckpt.backend.read_into(path, offset, buffers), "the index", key
    )


def _read_piece(ckpt: CommittedCheckpoint, job: _Job) -> int:
    chunk, piece, req = job.stored.chunk, job.piece, job.request
    dtype = req.dest.dtype
    row_bytes = math.prod(chunk.sizes[1:]) * dtype.itemsize
    rows = piece.end_row - piece.first_row
    start = job.stored.offset + piece.first_row * row_bytes
    dest = req.dest[piece.box.relative_to(req.box)]
    # whole rows of the chunk, exactly: read straight into the destination when it is contiguous
    direct = (
        dest.is_contiguous()
        and list(piece.box.sizes[1:]) == chunk.sizes[1:]
        and (not chunk.sizes or piece.box.sizes[0] == rows)
    )
    buf = dest if direct else torch.empty([rows, *chunk.sizes[1:]], dtype=dtype)
    if not chunk.sizes:
        buf = dest if direct else torch.empty([], dtype=dtype)
    view = tensor_bytes(buf)
    key = f"{req.record.key}@{','.join(map(str, chunk.offsets))}"
    read_range(ckpt, job.stored.file, start, [view], key)
    step = chunk.block_rows * row_bytes
    for b in range(piece.first_block, piece.end_block):
        lo = (b * chunk.block_rows - piece.first_row) * row_bytes
        if crc32c(view[lo : lo + step]) != chunk.crcs[b]:
            raise CorruptCheckpointError(
                f"{ckpt.object_uri(job.stored.file)}: CRC32C mismatch in global leaf "
                f"{req.record.key!r}, chunk at offsets {chunk.offsets}, rows "
                f"{b * chunk.block_rows}..{min((b + 1) * chunk.block_rows, rows + piece.first_row)}"
                "; the file is damaged. Load an earlier checkpoint."
            )
    if not direct:
        if chunk.sizes:
            inner = Box(
                (piece.first_row + chunk.offsets[0], *chunk.offsets[1:]),
                (rows, *chunk.sizes[1:]),
            )
            dest.copy_(buf[piece.box.relative_to(inner)])
        else:
            dest.copy_(buf)
    return view.nbytes
