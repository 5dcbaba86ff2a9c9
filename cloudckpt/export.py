"""Export: a checkpoint's tensors, consolidated, as standard safetensors files plus the
``model.safetensors.index.json`` that Hugging Face loaders read, from any store to any store.

Memory stays bounded: each output file is streamed tensor by tensor, and each tensor slab by
slab (whole rows, about :data:`SLAB_BYTES`), assembled from the stored chunks that intersect the
slab with their checksums verified. Global leaves (DTensors, replicated tensors) come whole;
per-rank tensors come from one chosen rank.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, CheckpointExistsError, CorruptCheckpointError
from .format.chunks import Box
from .format.encoding import (
    build_safetensors_header,
    crc32c,
    dtype_itemsize,
    safetensors_entry,
    tensor_bytes,
)
from .global_reader import Catalog, load_catalog, read_box, read_range
from .protocol.committed import CommittedCheckpoint
from .protocol.records import RankIndex, TensorRecord
from .storage.interface import Backend
from .tree import child_key, node_kind

SLAB_BYTES = 64 << 20
INDEX_NAME = "model.safetensors.index.json"


@dataclass
class ExportLeaf:
    """One output tensor: its name, dtype, shape and where it comes from (a global leaf's key,
    or a per-rank tensor record)."""

    name: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    record: TensorRecord | None = None  # per-rank tensors
    rank_file: str = ""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_itemsize(self.dtype, self.key)


@dataclass
class ExportReport:
    """What an export wrote."""

    src: str
    dst: str
    files: list[str]
    tensors: int
    bytes: int


def select_leaves(
    index: RankIndex, prefix: str, world_size: int, rank_given: bool, where: str
) -> list[ExportLeaf]:
    """The tensors of ``index``'s tree whose key path starts with ``prefix``, in tree order,
    named without it; per-rank tensors of a many-rank checkpoint need an explicit rank."""
    out: list[ExportLeaf] = []

    def visit(node: Any, key: str) -> None:
        kind, payload = node_kind(node, where)
        if kind in ("dict", "odict"):
            for k, child in payload:
                visit(child, child_key(key, k, False))
        elif kind in ("list", "tuple"):
            for i, child in enumerate(payload):
                visit(child, child_key(key, i, True))
        elif kind in ("tensor", "global") and key.startswith(prefix):
            name = key[len(prefix) :] or key
            if kind == "global":
                g = index.globals[int(payload)]
                out.append(ExportLeaf(name, g.key, g.dtype, tuple(g.shape)))
                return
            if world_size > 1 and not rank_given:
                raise CheckpointError(
                    f"{key} is a per-rank tensor of a {world_size}-rank checkpoint: pass "
                    "--rank N to export rank N's, or narrow --prefix to global leaves"
                )
            rec = index.tensors[int(payload)]
            out.append(
                ExportLeaf(name, key, rec.dtype, tuple(rec.shape), rec, index.files[rec.file].path)
            )

    visit(index.tree, "")
    return out


def _split_files(leaves: list[ExportLeaf], max_bytes: int) -> list[list[ExportLeaf]]:
    files: list[list[ExportLeaf]] = [[]]
    size = 0
    for leaf in leaves:
        if files[-1] and size + leaf.nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(leaf)
        size += leaf.nbytes
    return files


def export(
    src: CommittedCheckpoint,
    dst: Backend,
    dst_root: str,
    dst_uri: str,
    *,
    prefix: str = "",
    rank: int | None = None,
    max_file_bytes: int = 5 << 30,
    overwrite: bool = False,
    concurrency: int = 8,
) -> ExportReport:
    """Write ``src``'s selected tensors under ``dst_root`` as safetensors plus an index."""
    index_path = dst.join(dst_root, INDEX_NAME)
    if dst.exists(index_path) and not overwrite:
        raise CheckpointExistsError(
            f"{dst_uri} already holds an export ({INDEX_NAME}); pass --overwrite or choose "
            "another destination"
        )
    index = src.read_index(0 if rank is None else rank)
    leaves = select_leaves(index, prefix, src.manifest.world_size, rank is not None, src.uri)
    if not leaves:
        raise CheckpointError(f"{src.uri} holds no tensor whose key path starts with {prefix!r}")
    names = [leaf.name for leaf in leaves]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise CheckpointError(f"two tensors would both be named {dup!r}; choose another --prefix")
    groups = _split_files(leaves, max_file_bytes)
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        catalog = load_catalog(src, {index.rank: index}, pool) if index.globals else Catalog()
        file_names = []
        for n, group in enumerate(groups):
            name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
            entries = []
            for leaf in group:
                st_dtype, st_shape = safetensors_entry(leaf.dtype, leaf.shape, leaf.nbytes)
                if st_dtype == "U8" and leaf.dtype != "uint8":
                    raise CheckpointError(
                        f"{leaf.key}: dtype {leaf.dtype} has no safetensors name; exclude it "
                        "with --prefix"
                    )
                entries.append((leaf.name, st_dtype, st_shape, leaf.nbytes))
            header = build_safetensors_header(entries)
            size = len(header) + sum(leaf.nbytes for leaf in group)
            body = _stream(src, catalog, group, header, pool)
            dst.write_object(dst.join(dst_root, name), body, size)
            file_names.append(name)
    weight_map = {leaf.name: file_names[n] for n, g in enumerate(groups) for leaf in g}
    total = sum(leaf.nbytes for leaf in leaves)
    doc = {"metadata": {"total_size": total, "producer": "cloudckpt"}, "weight_map": weight_map}
    raw = json.dumps(doc, indent=2).encode()
    dst.write_object(index_path, [raw], len(raw))
    return ExportReport(src.uri, dst_uri, file_names, len(leaves), total)


def _stream(
    src: CommittedCheckpoint,
    catalog: Catalog,
    group: list[ExportLeaf],
    header: bytes,
    pool: ThreadPoolExecutor,
) -> Iterator[bytes | memoryview]:
    yield header
    for leaf in group:
        if leaf.record is not None:
            yield from _stream_record(src, leaf)
            continue
        shape = leaf.shape
        if not shape:
            yield tensor_bytes(read_box(src, catalog, leaf.key, Box((), ()), pool))
            continue
        row_bytes = max(1, math.prod(shape[1:]) * dtype_itemsize(leaf.dtype, leaf.key))
        step = max(1, SLAB_BYTES // row_bytes)
        for r in range(0, shape[0], step):
            rows = min(step, shape[0] - r)
            box = Box((r, *([0] * (len(shape) - 1))), (rows, *shape[1:]))
            yield tensor_bytes(read_box(src, catalog, leaf.key, box, pool))


def _stream_record(src: CommittedCheckpoint, leaf: ExportLeaf) -> Iterator[memoryview]:
    """A per-rank tensor's bytes in slabs, its CRC32C checked once the last slab is read."""
    rec = leaf.record
    assert rec is not None
    value = 0
    for start in range(0, max(rec.length, 1), SLAB_BYTES):
        n = min(SLAB_BYTES, rec.length - start)
        if n <= 0:
            break
        buf = memoryview(bytearray(n))
        read_range(src, leaf.rank_file, rec.offset + start, [buf], leaf.key)
        value = crc32c(buf, value)
        if start + n >= rec.length and value != rec.crc32c:
            raise CorruptCheckpointError(
                f"{src.object_uri(leaf.rank_file)}: CRC32C mismatch for key {leaf.key}; the file "
                "is damaged, nothing usable was exported"
            )
        yield buf
