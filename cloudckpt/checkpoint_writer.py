"""Writing a checkpoint: flatten, plan files, stream bytes, index, barrier, manifest.

Save flow for one rank (see docs/architecture.md, "Commit protocol"):

1. flatten the state dict (every leaf is checked before a byte is written);
2. refuse a committed URI unless ``overwrite`` (rank 0 then removes the old commit first);
3. pack tensors into safetensors files of about ``file_size`` bytes and write them, several at
   once, straight from tensor memory, computing each tensor's CRC32C on the way;
4. write this rank's index, call ``pre_commit``, report the outcome at the barrier;
5. rank 0 checks every rank's index belongs to this save, writes ``manifest.json``
   create-only and tells the others; everyone calls ``post_commit``.
"""

from __future__ import annotations

import abc
import logging
import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ._version import __version__
from .backends import Backend, resolve
from .barriers import Barrier
from .config_types import CheckpointWriterConfig
from .errors import (
    BackendError,
    BarrierError,
    CheckpointError,
    CheckpointExistsError,
    ConfigError,
)
from .format import (
    MANIFEST_NAME,
    FileRecord,
    Manifest,
    RankEntry,
    RankIndex,
    TensorRecord,
    build_safetensors_header,
    crc32c,
    data_file_name,
    dtype_name,
    index_name,
    safetensors_entry,
    tensor_bytes,
)
from .storage import StorageConfig, describe_store_error
from .tree import TensorLeaf, flatten
from .types import STATE_DICT, RankInfo
from .utils import format_size, paused_gc

logger = logging.getLogger(__name__)


class WriterHook(abc.ABC):
    """Callbacks around the commit: ``pre_commit`` once this rank's files are written,
    ``post_commit`` once the manifest exists."""

    @abc.abstractmethod
    def pre_commit(self, path: str, **kwargs: Any) -> None:
        """Runs before the checkpoint is committed."""

    @abc.abstractmethod
    def post_commit(self, path: str, **kwargs: Any) -> None:
        """Runs after the checkpoint is committed."""


def host_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is a contiguous CPU tensor, else a contiguous CPU copy."""
    if t.is_cpu and t.is_contiguous():
        return t
    t = t.detach()
    if not t.is_cpu:
        t = t.to("cpu")
    return t if t.is_contiguous() else t.contiguous()


@dataclass
class PlannedFile:
    """One data file: its tensors in storage order and their safetensors names."""

    path: str
    leaves: list[tuple[int, TensorLeaf, str]] = field(default_factory=list)  # (idx, leaf, name)
    nbytes: int = 0


MIN_SPREAD_FILE = 16 << 20


def target_file_size(total: int, file_size: int, concurrency: int) -> int:
    """The size to pack files to: ``file_size``, or less so that ``concurrency`` files share the
    work when there is enough data (never below 16 MiB, so small saves stay one file)."""
    spread = -(-total // max(1, concurrency))
    return max(1, min(file_size, max(spread, MIN_SPREAD_FILE)))


def plan_files(leaves: list[TensorLeaf], rank: int, file_size: int) -> list[PlannedFile]:
    """Pack tensors in order into files of about ``file_size``; a bigger tensor gets its own."""
    files: list[PlannedFile] = []
    names: set[str] = set()
    current: PlannedFile | None = None
    for i, leaf in enumerate(leaves):
        nbytes = leaf.tensor.numel() * leaf.tensor.element_size()
        if current is None or (current.leaves and current.nbytes + nbytes > file_size):
            current = PlannedFile(data_file_name(rank, len(files)))
            files.append(current)
        name = leaf.key or "<root>"
        n = 2
        while name in names:  # str "0" and int 0 share a display path; keep names unique
            name = f"{leaf.key}#{n}"
            n += 1
        names.add(name)
        current.leaves.append((i, leaf, name))
        current.nbytes += nbytes
    return files


class CheckpointWriter:
    """Writes one rank's part of a checkpoint and, with a barrier, commits it for all ranks."""

    def __init__(
        self,
        config: CheckpointWriterConfig,
        rank_info: RankInfo,
        barrier: Barrier | None = None,
        commit_hook: WriterHook | None = None,
        *,
        storage: StorageConfig | None = None,
    ) -> None:
        self._config = config
        self._rank_info = rank_info
        self._barrier = barrier
        self._commit_hook = commit_hook
        self._storage = storage or StorageConfig()
        self._pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="cloudckpt-write")

    @property
    def rank_info(self) -> RankInfo:
        return self._rank_info

    def write(
        self,
        path: str,
        state_dict: STATE_DICT,
        *,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Future[None] | None:
        """Save ``state_dict`` at ``path`` (a URI, a plain path, or a name under the root).

        Raises ``CheckpointExistsError`` if a committed checkpoint is there and not
        ``overwrite``; ``UnsupportedValueError`` for a leaf that cannot be saved.
        """
        with paused_gc():
            self._write(path, state_dict, overwrite, metadata, storage_options, kwargs)
        return None

    def _write(
        self,
        path: str,
        state_dict: STATE_DICT,
        overwrite: bool,
        metadata: dict[str, Any] | None,
        storage_options: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> None:
        uri = self._storage.resolve_uri(path)
        backend, root = resolve(
            uri,
            backend=self._storage.backend,
            storage_options=self._storage.options_with(storage_options),
        )
        rank, world = self._rank_info.global_rank, self._rank_info.global_world_size
        multi = world > 1
        if self._barrier is not None and not carries_outcomes(self._barrier):
            self._write_wait_only(backend, root, uri, state_dict, overwrite, metadata, kwargs)
            return
        if multi and self._barrier is None:
            raise ConfigError(
                f"rank {rank} of {world} has no barrier, so no rank could commit {uri} for all: "
                "initialize a process group or set [barrier] barrier_type = 'tcp_store' or "
                "'dist_barrier'"
            )
        timeout = float(self._config.write_barrier_timeout_secs)
        started = time.monotonic()
        retries_before = backend.retry_total()
        nonce = uuid.uuid4().hex
        try:
            tree, leaves = flatten(state_dict)
            manifest_path = backend.join(root, MANIFEST_NAME)
            if overwrite:
                if rank == 0:
                    self._remove_commit(backend, root, uri)
                if multi:
                    assert self._barrier is not None
                    self._barrier.exchange({"ok": True, "phase": "prepare"}, timeout)
            elif _store_call(backend.exists, manifest_path, uri):
                raise CheckpointExistsError(
                    f"a committed checkpoint is already at {uri}; pass overwrite=True to replace "
                    "it, or save under a new name"
                )
            files, records = self._write_data(backend, root, uri, leaves, rank)
            index = RankIndex(rank, world, tree, files, records)
            raw_index = _with_nonce(index.to_json(), nonce)
            index_path = backend.join(root, index_name(rank))
            _store_call(backend.write_object, index_path, uri, [raw_index], len(raw_index))
            if self._commit_hook is not None:
                self._commit_hook.pre_commit(uri, **kwargs)
            outcome: dict[str, Any] = {
                "ok": True,
                "rank": rank,
                "index": index_name(rank),
                "size": len(raw_index),
                "crc32c": crc32c(raw_index),
                "nonce": nonce,
                "files": [f.path for f in files],
                "bytes": sum(f.size for f in files),
            }
        except BaseException as e:
            if multi and not isinstance(e, BarrierError):
                assert self._barrier is not None
                try:
                    self._barrier.exchange(
                        {"ok": False, "rank": rank, "error": f"{type(e).__name__}: {e}"}, timeout
                    )
                except BarrierError:
                    pass
            raise
        outcomes: list[dict[str, Any]] | None = [outcome]
        synced = self._barrier is not None  # with one rank too: the barrier sees every save
        if synced:
            assert self._barrier is not None
            outcomes = self._barrier.exchange(outcome, timeout)
        if rank == 0:
            if outcomes is None:
                raise BarrierError(
                    f"the barrier {type(self._barrier).__name__} returned no outcomes on rank 0, "
                    f"so {uri} cannot be committed; its exchange() must return every rank's "
                    "outcome on rank 0 (or implement only execute_barrier())"
                )
            try:
                self._commit(backend, root, uri, outcomes, metadata or {})
            except BaseException as e:
                if synced:
                    assert self._barrier is not None
                    self._barrier.publish_commit({"ok": False, "error": f"{type(e).__name__}: {e}"})
                raise
            if synced:
                assert self._barrier is not None
                self._barrier.publish_commit({"ok": True})
        elif multi:
            assert self._barrier is not None
            result = self._barrier.await_commit(timeout)
            if not result.get("ok"):
                raise CheckpointError(
                    f"rank 0 failed to commit {uri}: {result.get('error')}. Nothing was committed."
                )
        if self._commit_hook is not None:
            self._commit_hook.post_commit(uri, **kwargs)
        elapsed = time.monotonic() - started
        nbytes = int(outcome["bytes"])
        logger.info(
            "saved %s rank %d/%d: %d tensors, %s in %d files, %.2f s (%.2f GB/s), %d retries",
            uri,
            rank,
            world,
            len(leaves),
            format_size(nbytes),
            len(outcome["files"]),
            elapsed,
            nbytes / max(elapsed, 1e-9) / 1e9,
            backend.retry_total() - retries_before,
        )

    def _write_wait_only(
        self,
        backend: Backend,
        root: str,
        uri: str,
        state_dict: STATE_DICT,
        overwrite: bool,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> None:
        """A save through a barrier that can only wait (``execute_barrier``): every rank writes
        its part and index, all meet at the barrier, then rank 0 reads every index from the
        store and commits. No outcome travels: a rank that fails raises alone and never reaches
        the barrier, and the other ranks do not learn how rank 0's commit went."""
        barrier = self._barrier
        assert barrier is not None
        rank, world = self._rank_info.global_rank, self._rank_info.global_world_size
        started = time.monotonic()
        tree, leaves = flatten(state_dict)
        if overwrite:
            if rank == 0:
                self._remove_commit(backend, root, uri)
            if world > 1:
                barrier.execute_barrier()  # nobody writes before the old files are gone
        elif _store_call(backend.exists, backend.join(root, MANIFEST_NAME), uri):
            raise CheckpointExistsError(
                f"a committed checkpoint is already at {uri}; pass overwrite=True to replace "
                "it, or save under a new name"
            )
        files, records = self._write_data(backend, root, uri, leaves, rank)
        raw_index = _with_nonce(
            RankIndex(rank, world, tree, files, records).to_json(), uuid.uuid4().hex
        )
        index_path = backend.join(root, index_name(rank))
        _store_call(backend.write_object, index_path, uri, [raw_index], len(raw_index))
        if self._commit_hook is not None:
            self._commit_hook.pre_commit(uri, **kwargs)
        barrier.execute_barrier()
        if rank == 0:
            outcomes = [self._stored_outcome(backend, root, uri, r) for r in range(world)]
            self._commit(backend, root, uri, outcomes, metadata or {}, check_nonces=False)
        if self._commit_hook is not None:
            self._commit_hook.post_commit(uri, **kwargs)
        logger.info(
            "saved %s rank %d/%d through a wait-only barrier: %d tensors, %s, %.2f s",
            uri,
            rank,
            world,
            len(leaves),
            format_size(sum(f.size for f in files)),
            time.monotonic() - started,
        )

    def _stored_outcome(self, backend: Backend, root: str, uri: str, rank: int) -> dict[str, Any]:
        """Rank ``rank``'s outcome as the built-in barriers carry it, read from its index."""
        path = backend.join(root, index_name(rank))
        try:
            raw = backend.read_bytes(path)
        except FileNotFoundError:
            raise CheckpointError(
                f"{backend.to_uri(path)}: rank {rank} passed the barrier but its index is "
                "missing; nothing was committed. Save again."
            ) from None
        except OSError as e:
            raise BackendError(describe_store_error(uri, path, e)) from e
        index = RankIndex.from_json(raw, backend.to_uri(path))
        return {
            "ok": True,
            "rank": rank,
            "index": index_name(rank),
            "size": len(raw),
            "crc32c": crc32c(raw),
            "files": [f.path for f in index.files],
            "bytes": sum(f.size for f in index.files),
        }

    def _remove_commit(self, backend: Backend, root: str, uri: str) -> None:
        """Uncommit first (manifest), then remove the old data: a crash leaves it uncommitted."""
        _store_call(backend.delete, backend.join(root, MANIFEST_NAME), uri)
        for sub in ("index", "data"):
            _store_call(backend.delete, backend.join(root, sub), uri, recursive=True)

    def _write_data(
        self, backend: Backend, root: str, uri: str, leaves: list[TensorLeaf], rank: int
    ) -> tuple[list[FileRecord], list[TensorRecord]]:
        total = sum(leaf.tensor.numel() * leaf.tensor.element_size() for leaf in leaves)
        size = target_file_size(total, self._config.file_size_bytes, self._config.concurrency)
        plan = plan_files(leaves, rank, size)
        records: list[TensorRecord | None] = [None] * len(leaves)
        futures = [
            self._pool.submit(self._write_file, backend, root, uri, n, planned, records)
            for n, planned in enumerate(plan)
        ]
        files = [f.result() for f in futures]
        return files, [r for r in records if r is not None]

    def _write_file(
        self,
        backend: Backend,
        root: str,
        uri: str,
        file_no: int,
        planned: PlannedFile,
        records: list[TensorRecord | None],
    ) -> FileRecord:
        entries = []
        for _, leaf, name in planned.leaves:
            t = leaf.tensor
            nbytes = t.numel() * t.element_size()
            st_dtype, st_shape = safetensors_entry(dtype_name(t.dtype), tuple(t.shape), nbytes)
            entries.append((name, st_dtype, st_shape, nbytes))
        header = build_safetensors_header(entries)
        size = len(header) + planned.nbytes

        def chunks() -> Iterator[memoryview | bytes]:
            yield header
            offset = len(header)
            for i, leaf, _ in planned.leaves:
                t = host_contiguous(leaf.tensor)  # a host copy only for GPU or strided tensors
                view = tensor_bytes(t)
                records[i] = TensorRecord(
                    leaf.key,
                    dtype_name(t.dtype),
                    list(t.shape),
                    file_no,
                    offset,
                    view.nbytes,
                    crc32c(view),
                )
                offset += view.nbytes
                yield view

        path = backend.join(root, planned.path)
        _store_call(backend.write_object, path, uri, chunks(), size)
        return FileRecord(planned.path, size)

    def _commit(
        self,
        backend: Backend,
        root: str,
        uri: str,
        outcomes: list[dict[str, Any]],
        metadata: dict[str, Any],
        *,
        check_nonces: bool = True,
    ) -> None:
        world = self._rank_info.global_world_size
        if check_nonces and len(outcomes) > 1:
            self._check_indexes(backend, root, uri, outcomes)
        manifest = Manifest(
            world_size=world,
            ranks=[
                RankEntry(
                    int(o["rank"]),
                    str(o["index"]),
                    int(o["size"]),
                    int(o["crc32c"]),
                    list(o["files"]),
                    int(o["bytes"]),
                )
                for o in outcomes
            ],
            library_version=__version__,
            metadata=metadata,
        )
        raw = manifest.to_json()
        try:
            _store_call(backend.put_create_only, backend.join(root, MANIFEST_NAME), uri, raw)
        except FileExistsError:
            raise CheckpointExistsError(
                f"another writer committed {uri} while this save ran; this save's files are "
                "not committed. Save under a new name."
            ) from None

    def _check_indexes(
        self, backend: Backend, root: str, uri: str, outcomes: list[dict[str, Any]]
    ) -> None:
        """Every rank's index exists and carries the nonce that rank reported for this save."""

        def check(o: dict[str, Any]) -> None:
            path = backend.join(root, str(o["index"]))
            head = bytearray(160)
            try:
                backend.read_into(path, 0, [memoryview(head)])
            except (FileNotFoundError, EOFError) as e:
                raise CheckpointError(
                    f"{backend.to_uri(path)}: index of rank {o['rank']} is missing or short "
                    f"({e}); nothing was committed. Save again."
                ) from e
            m = re.search(rb'"nonce":"([0-9a-f]{32})"', bytes(head))
            if not m or m.group(1).decode() != o["nonce"]:
                raise CheckpointError(
                    f"{backend.to_uri(path)}: index of rank {o['rank']} is not from this save "
                    "(a leftover of an earlier attempt); nothing was committed. Save again."
                )

        for f in [self._pool.submit(check, o) for o in outcomes]:
            f.result()

    def close(self) -> None:
        """Stop the writer's threads."""
        self._pool.shutdown(wait=True)
        if self._barrier is not None:
            self._barrier.close()


def carries_outcomes(barrier: Any) -> bool:
    """Whether ``barrier`` exchanges outcomes (a :class:`Barrier` overriding ``exchange``);
    else it can only wait, through ``execute_barrier()``."""
    return isinstance(barrier, Barrier) and type(barrier).exchange is not Barrier.exchange


def _with_nonce(raw_index: bytes, nonce: str) -> bytes:
    """Put the save's nonce near the start of the index, where rank 0 reads it cheaply."""
    head = b'{"format":"cloudckpt-index",'
    assert raw_index.startswith(head)
    return head + b'"nonce":"' + nonce.encode() + b'",' + raw_index[len(head) :]


def _store_call(fn: Any, path: str, uri: str, *args: Any, **kwargs: Any) -> Any:
    """Run a backend call; turn a store's OSError into a BackendError naming the URI."""
    try:
        return fn(path, *args, **kwargs)
    except (FileExistsError, CheckpointError):
        raise
    except OSError as e:
        raise BackendError(describe_store_error(uri, path, e)) from e
