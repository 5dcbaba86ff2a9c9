"""``copy``: a committed checkpoint to any store, committed at the destination last."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from ..errors import CheckpointExistsError
from ..format.encoding import crc32c
from ..storage.registry import resolve
from .commit import commit, discard, store_call
from .committed import open_checkpoint
from .records import (
    MANIFEST_NAME,
    FileRecord,
    Manifest,
    RankEntry,
    data_file_name,
    index_name,
    new_attempt_id,
)
from .verify import read_chunks

logger = logging.getLogger(__name__)


@dataclass
class CopyReport:
    """What :func:`copy` did."""

    src: str
    dst: str
    files: int
    bytes: int


def copy(
    src: str,
    dst: str,
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    dst_storage_options: Mapping[str, Any] | None = None,
    backend: str | None = None,
    dst_backend: str | None = None,
    concurrency: int = 8,
    on_bytes: Callable[[int], None] | None = None,
) -> CopyReport:
    """Copy the committed checkpoint at ``src`` to ``dst`` (any two stores).

    The copy is a new save attempt at ``dst``: data files are streamed under fresh names,
    several at once, then each rank's index (rewritten to name them), then the manifest,
    create-only, or with ``overwrite`` as an atomic replace of the checkpoint there (whose
    objects are deleted after). Every name comes from this function, never from the source,
    so nothing is written outside ``dst``. ``CheckpointExistsError`` if ``dst`` is committed
    and not ``overwrite``. ``dst_storage_options`` defaults to ``storage_options``.
    """
    tick = on_bytes or (lambda n: None)
    ck = open_checkpoint(src, backend, storage_options)
    opts = storage_options if dst_storage_options is None else dst_storage_options
    dst_b, dst_root = resolve(dst, backend=dst_backend, storage_options=opts)
    if not overwrite and store_call(dst_b.exists, dst_b.join(dst_root, MANIFEST_NAME), dst):
        raise CheckpointExistsError(
            f"{dst} already holds a committed checkpoint; pass --overwrite (cloudckpt cp) or "
            "overwrite=True (cloudckpt.copy) to replace it, or remove it first (cloudckpt rm)"
        )
    attempt = new_attempt_id()
    indexes = {e.rank: ck.read_index(e.rank) for e in ck.manifest.ranks}
    jobs: list[tuple[str, str, int]] = []  # (source name, destination name, size)
    for rank, idx in indexes.items():
        files = []
        for n, f in enumerate(idx.files):
            new = data_file_name(rank, n, attempt)
            jobs.append((f.path, new, f.size))
            files.append(FileRecord(new, f.size))
        indexes[rank] = replace(idx, files=files, attempt=attempt)

    def copy_one(rel: str, new: str, size: int) -> None:
        path = ck.backend.join(ck.root, rel)
        chunks = (buf for _, buf in read_chunks(ck.backend, path, 0, size, tick))
        store_call(dst_b.write_object, dst_b.join(dst_root, new), dst, chunks, size)

    entries = []
    try:
        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            for fut in [pool.submit(copy_one, *job) for job in jobs]:
                fut.result()
        for rank, idx in sorted(indexes.items()):
            raw = idx.to_json()
            name = index_name(rank, attempt)
            store_call(dst_b.write_object, dst_b.join(dst_root, name), dst, [raw], len(raw))
            entries.append(
                RankEntry(
                    rank,
                    name,
                    len(raw),
                    crc32c(raw),
                    [f.path for f in idx.files],
                    sum(f.size for f in idx.files),
                )
            )
    except BaseException:
        names = {new for _, new, _ in jobs} | {e.index for e in entries}
        discard(dst_b, dst_root, dst, names, best_effort=True)
        raise
    m = ck.manifest
    manifest = Manifest(
        m.world_size, entries, m.library_version, m.created_unix, dict(m.metadata), attempt
    )
    commit(dst_b, dst_root, dst, manifest, overwrite=overwrite)
    logger.info("copied %s -> %s (%d files)", ck.uri, dst, len(jobs))
    return CopyReport(ck.uri, dst, len(jobs), sum(size for _, _, size in jobs))
