"""Writing a checkpoint: flatten, plan files, stream bytes, index, barrier, manifest.

Save flow for one rank (see docs/architecture.md, "Commit protocol"):

1. flatten the state dict (every leaf is checked before a byte is written);
2. refuse a committed URI unless ``overwrite``; pick a fresh attempt id: every object this
   rank writes carries it, so nothing another save wrote or committed is ever touched;
3. pack tensors into safetensors files of about ``file_size`` bytes and write them, several at
   once, straight from tensor memory, computing each tensor's CRC32C on the way;
4. write this rank's index, call ``pre_commit``, report a ``RankOutcome`` at the barrier;
5. rank 0 builds the manifest from the outcomes and commits it through
   :func:`cloudckpt.protocol.commit` (create-only, or an atomic replace for ``overwrite``,
   read back after an ambiguous answer) and tells the others; everyone calls ``post_commit``.
"""

from __future__ import annotations

import abc
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from ._version import __version__
from .barriers import Barrier
from .config_types import CheckpointWriterConfig
from .errors import (
    BackendError,
    BarrierError,
    CheckpointError,
    CheckpointExistsError,
    ConfigError,
)
from .format.chunks import (
    Box,
    ChunkItem,
    ChunkRecord,
    GlobalRecord,
    assign_writers,
    block_rows,
    check_patterns,
)
from .format.encoding import (
    SafetensorsHeader,
    crc32c,
    crc32c_concat,
    dtype_name,
    safetensors_entry,
    tensor_bytes,
)
from .gc_pause import paused_gc
from .protocol.commit import commit, store_call
from .protocol.records import (
    DATA_DIR,
    INDEX_DIR,
    MANIFEST_NAME,
    CommitResult,
    FileRecord,
    Manifest,
    RankIndex,
    RankOutcome,
    TensorRecord,
    data_file_name,
    index_name,
    new_attempt_id,
)
from .storage.config import StorageConfig
from .storage.interface import Backend
from .storage.messages import describe_store_error
from .storage.registry import BackendSource, OwnedBackends
from .tree import TensorLeaf, flatten
from .types import STATE_DICT, RankInfo
from .units import format_size

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
    """One data file: the tensors ``start:stop`` of the save's list (stored in that order) and
    their safetensors names."""

    path: str
    start: int
    stop: int = 0
    names: list[str] = field(default_factory=list)
    nbytes: int = 0


MIN_SPREAD_FILE = 16 << 20


def target_file_size(total: int, file_size: int, concurrency: int) -> int:
    """The size to pack files to: ``file_size``, or less so that ``concurrency`` files share the
    work when there is enough data (never below 16 MiB, so small saves stay one file)."""
    spread = -(-total // max(1, concurrency))
    return max(1, min(file_size, max(spread, MIN_SPREAD_FILE)))


def plan_files(
    leaves: list[TensorLeaf], rank: int, file_size: int, attempt: str
) -> list[PlannedFile]:
    """Pack tensors in order into files of about ``file_size``; a bigger tensor gets its own."""
    files: list[PlannedFile] = []
    names: set[str] = set()
    current: PlannedFile | None = None
    for i, leaf in enumerate(leaves):
        nbytes = leaf.tensor.numel() * leaf.tensor.element_size()
        if current is None or (current.names and current.nbytes + nbytes > file_size):
            current = PlannedFile(data_file_name(rank, len(files), attempt), i, i)
            files.append(current)
        name = leaf.key or "<root>"
        n = 2
        while name in names:  # str "0" and int 0 share a display path; keep names unique
            name = f"{leaf.key}#{n}"
            n += 1
        names.add(name)
        current.names.append(name)
        current.stop = i + 1
        current.nbytes += nbytes
    return files


def block_checksums(
    view: memoryview, shape: tuple[int, ...], itemsize: int
) -> tuple[int, list[int], int]:
    """Rows per block, one CRC32C per block of rows of a stored chunk, and the CRC32C of the
    whole chunk derived from the blocks' (one pass over the bytes, not two)."""
    if not shape:
        crc = crc32c(view)
        return 1, [crc], crc
    row_bytes = math.prod(shape[1:]) * itemsize
    per_block = block_rows(row_bytes)
    step = max(per_block * row_bytes, 1)
    starts = range(0, view.nbytes, step)
    crcs = [crc32c(view[s : s + step]) for s in starts]
    whole = crc32c_concat(zip(crcs, (min(step, view.nbytes - s) for s in starts)))
    n_blocks = -(-shape[0] // per_block)
    crcs += [0] * (n_blocks - len(crcs))  # rows of no bytes (a zero-size dimension): CRC 0
    return per_block, crcs[:n_blocks], whole


def plan_global_leaves(
    leaves: list[TensorLeaf], rank: int
) -> tuple[list[TensorLeaf], dict[int, tuple[int, Box]], list[GlobalRecord]]:
    """What this rank writes: its per-rank tensors (first, in order, so the tree's numbers are
    their positions), then the chunks of global leaves assigned to it, and the global records.

    Returns the tensors to write, for each written chunk its position -> (global leaf, box),
    and one record per global leaf (chunks filled in once written).
    """
    to_write = [leaf for leaf in leaves if leaf.shard is None]
    globals_ = [leaf for leaf in leaves if leaf.shard is not None]
    items: dict[int, ChunkItem] = {}
    for g, leaf in enumerate(globals_):
        assert leaf.shard is not None
        box = leaf.shard.layout.box_of(rank)
        if not box.empty:
            nbytes = leaf.tensor.numel() * leaf.tensor.element_size()
            items[g] = ChunkItem(leaf.key, box, nbytes, leaf.shard.layout.holders(rank))
    writers = assign_writers(items.values())
    records = []
    chunk_of: dict[int, tuple[int, Box]] = {}
    for g, leaf in enumerate(globals_):
        assert leaf.shard is not None
        records.append(
            GlobalRecord(
                leaf.key,
                dtype_name(leaf.tensor.dtype),
                list(leaf.shard.layout.shape),
                leaf.shard.kind,
            )
        )
        item = items.get(g)
        if item is not None and writers[(item.key, item.box)] == rank:
            chunk_of[len(to_write)] = (g, item.box)
            name = f"{leaf.key}@{','.join(map(str, item.box.offsets))}"
            to_write.append(TensorLeaf(name, leaf.tensor, leaf.shard))
    return to_write, chunk_of, records


class CheckpointWriter:
    """Writes one rank's part of a checkpoint and, with a barrier, commits it for all ranks.

    Backends come from ``backends`` when given (the caller's: left open by :meth:`close`),
    else the writer opens its own and closes them in :meth:`close`."""

    def __init__(
        self,
        config: CheckpointWriterConfig,
        rank_info: RankInfo,
        barrier: Barrier | None = None,
        commit_hook: WriterHook | None = None,
        *,
        storage: StorageConfig | None = None,
        backends: BackendSource | None = None,
    ) -> None:
        self._config = config
        self._rank_info = rank_info
        self._barrier = barrier
        self._commit_hook = commit_hook
        self._storage = storage or StorageConfig()
        self._own_backends = backends is None
        self._backends: BackendSource = OwnedBackends() if backends is None else backends
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
        replicated: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Future[None] | None:
        """Save ``state_dict`` at ``path`` (a URI, a plain path, or a name under the root).

        ``replicated``: glob patterns over key paths of plain leaves that are the same on every
        rank (stored once; default ``[writer] replicated``). DTensors are always stored once.
        Raises ``CheckpointExistsError`` if a committed checkpoint is there and not
        ``overwrite``; ``UnsupportedValueError`` for a leaf that cannot be saved. Other keyword
        arguments go to the commit hook; without a hook they are a ``TypeError``.
        """
        if kwargs and self._commit_hook is None:
            raise TypeError(
                f"CheckpointWriter.write() got unexpected keyword argument(s) "
                f"{', '.join(map(repr, sorted(kwargs)))}: extra keywords go to a commit hook, "
                "and this writer has none"
            )
        if replicated is None:
            patterns: Sequence[str] = self._config.replicated
        else:
            try:
                patterns = check_patterns(replicated, "replicated=")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        with paused_gc():
            self._write(path, state_dict, overwrite, metadata, storage_options, patterns, kwargs)
        return None

    def _write(
        self,
        path: str,
        state_dict: STATE_DICT,
        overwrite: bool,
        metadata: dict[str, Any] | None,
        storage_options: dict[str, Any] | None,
        replicated: Sequence[str],
        kwargs: dict[str, Any],
    ) -> None:
        uri = self._storage.resolve_uri(path)
        backend, root = self._backends.resolve(
            uri,
            backend=self._storage.backend,
            storage_options=self._storage.options_with(storage_options),
        )
        rank, world = self._rank_info.global_rank, self._rank_info.global_world_size
        multi = world > 1
        barrier_world = self._barrier.world_size if isinstance(self._barrier, Barrier) else None
        if barrier_world is not None and barrier_world != world:
            raise ConfigError(
                f"{uri}: rank {rank} thinks the job has {world} rank(s) but its barrier waits "
                f"for {barrier_world}; nothing was written. Make rank_info (or the process "
                "group) agree with [barrier.barrier_args] global_world_size."
            )
        if self._barrier is not None and not carries_outcomes(self._barrier):
            self._write_wait_only(
                backend, root, uri, state_dict, overwrite, metadata, replicated, kwargs
            )
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
        attempt = new_attempt_id()
        try:
            outcome, n_leaves = self._write_rank_objects(
                backend, root, uri, state_dict, overwrite, replicated, attempt
            )
            if self._commit_hook is not None:
                self._commit_hook.pre_commit(uri, **kwargs)
        except BaseException as e:
            if multi and not isinstance(e, BarrierError):
                assert self._barrier is not None
                try:
                    self._barrier.exchange(
                        RankOutcome(rank, ok=False, error=f"{type(e).__name__}: {e}"), timeout
                    )
                except BarrierError:
                    pass
            raise
        outcomes: list[RankOutcome] | None = [outcome]
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
            manifest = _manifest_for(world, outcomes, metadata, attempt)
            try:
                report = commit(backend, root, uri, manifest, overwrite=overwrite)
            except BaseException as e:
                if synced:
                    assert self._barrier is not None
                    self._barrier.publish_commit(
                        CommitResult(ok=False, error=f"{type(e).__name__}: {e}")
                    )
                raise
            if report.readback:
                logger.info("%s: committed (confirmed by reading the manifest back)", uri)
            if synced:
                assert self._barrier is not None
                self._barrier.publish_commit(CommitResult(ok=True))
        elif multi:
            assert self._barrier is not None
            result = self._barrier.await_commit(timeout)
            if not result.ok:
                raise CheckpointError(f"rank 0 failed to commit {uri}: {result.error}")
        if self._commit_hook is not None:
            self._commit_hook.post_commit(uri, **kwargs)
        elapsed = time.monotonic() - started
        nbytes = outcome.bytes
        logger.info(
            "saved %s rank %d/%d: %d tensors, %s in %d files, %.2f s (%.2f GB/s), %d retries",
            uri,
            rank,
            world,
            n_leaves,
            format_size(nbytes),
            len(outcome.files),
            elapsed,
            nbytes / max(elapsed, 1e-9) / 1e9,
            backend.retry_total() - retries_before,
        )

    def _write_rank_objects(
        self,
        backend: Backend,
        root: str,
        uri: str,
        state_dict: STATE_DICT,
        overwrite: bool,
        replicated: Sequence[str],
        attempt: str,
    ) -> tuple[RankOutcome, int]:
        """This rank's part of a save: check the state dict, refuse a committed ``uri`` unless
        ``overwrite``, write the attempt's data files and index. Returns the rank's outcome and
        how many tensors it wrote."""
        rank, world = self._rank_info.global_rank, self._rank_info.global_world_size
        tree, leaves = flatten(state_dict, replicated, world)
        if not overwrite and store_call(backend.exists, backend.join(root, MANIFEST_NAME), uri):
            raise CheckpointExistsError(
                f"a committed checkpoint is already at {uri}; pass overwrite=True to replace "
                "it, or save under a new name"
            )
        try:
            files, records, globals_ = self._write_data(backend, root, uri, leaves, rank, attempt)
        except BaseException:
            # a failed write aborts its own upload; this catches any other left open
            self._abort_uploads(backend, root, uri, attempt)
            raise
        raw_index = RankIndex(rank, world, tree, files, records, attempt, globals_).to_json()
        name = index_name(rank, attempt)
        store_call(backend.write_object, backend.join(root, name), uri, [raw_index], len(raw_index))
        outcome = RankOutcome(
            rank,
            index=name,
            size=len(raw_index),
            crc32c=crc32c(raw_index),
            files=[f.path for f in files],
            bytes=sum(f.size for f in files),
        )
        return outcome, len(leaves)

    def _write_wait_only(
        self,
        backend: Backend,
        root: str,
        uri: str,
        state_dict: STATE_DICT,
        overwrite: bool,
        metadata: dict[str, Any] | None,
        replicated: Sequence[str],
        kwargs: dict[str, Any],
    ) -> None:
        """A save through a barrier that can only wait (``execute_barrier``). Each rank writes
        its files and index, then its outcome as a small object (``pending_outcome_name``);
        all meet at the barrier; rank 0 reads every rank's outcome from the store, commits and
        removes the outcomes; all meet again (several ranks), so no rank writes its next
        save's outcome under the same name before rank 0 has read this one. No failure
        travels: a rank that fails raises alone and never reaches the barrier, and the other
        ranks do not learn how rank 0's commit went (only that it is over)."""
        barrier = self._barrier
        assert barrier is not None
        rank, world = self._rank_info.global_rank, self._rank_info.global_world_size
        started = time.monotonic()
        attempt = new_attempt_id()
        outcome, n_leaves = self._write_rank_objects(
            backend, root, uri, state_dict, overwrite, replicated, attempt
        )
        raw_outcome = outcome.to_json().encode()
        pending = backend.join(root, pending_outcome_name(rank))
        store_call(backend.write_object, pending, uri, [raw_outcome], len(raw_outcome))
        if self._commit_hook is not None:
            self._commit_hook.pre_commit(uri, **kwargs)
        barrier.execute_barrier()
        try:
            if rank == 0:
                outcomes = [self._pending_outcome(backend, root, uri, r) for r in range(world)]
                manifest = _manifest_for(world, outcomes, metadata, attempt)
                commit(backend, root, uri, manifest, overwrite=overwrite)
                for r in range(world):
                    try:
                        backend.delete(backend.join(root, pending_outcome_name(r)))
                    except OSError:  # only a leftover: the checkpoint is committed
                        logger.debug("%s: could not remove rank %d's pending outcome", uri, r)
        finally:
            # the outcomes' names are the same for every save of this URI: until rank 0 is done
            # with them, no rank may start its next save (a rank racing ahead would replace its
            # outcome before rank 0 read it, and rank 0 would then remove the new one)
            if world > 1:
                barrier.execute_barrier()
        if self._commit_hook is not None:
            self._commit_hook.post_commit(uri, **kwargs)
        logger.info(
            "saved %s rank %d/%d through a wait-only barrier: %d tensors, %s, %.2f s",
            uri,
            rank,
            world,
            n_leaves,
            format_size(outcome.bytes),
            time.monotonic() - started,
        )

    @staticmethod
    def _pending_outcome(backend: Backend, root: str, uri: str, rank: int) -> RankOutcome:
        """Rank ``rank``'s outcome of this save, as it stored it before the rendezvous."""
        path = backend.join(root, pending_outcome_name(rank))
        try:
            raw = backend.read_bytes(path)
        except FileNotFoundError:
            raise CheckpointError(
                f"{backend.to_uri(path)}: rank {rank} passed the barrier but left no outcome; "
                "nothing was committed. Save again."
            ) from None
        except OSError as e:
            raise BackendError(describe_store_error(uri, path, e)) from e
        try:
            outcome = RankOutcome.from_json(raw)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{backend.to_uri(path)}: rank {rank}'s outcome is unreadable ({e}); nothing "
                "was committed. Save again."
            ) from None
        if outcome.rank != rank or not outcome.ok:
            raise CheckpointError(
                f"{backend.to_uri(path)}: not rank {rank}'s outcome of a finished write; "
                "nothing was committed. Save again."
            )
        return outcome

    @staticmethod
    def _abort_uploads(backend: Backend, root: str, uri: str, attempt: str) -> None:
        """After a failed write: no multipart upload of this attempt stays open (stores that
        have them; a successful write leaves none, see the S3 backend)."""
        try:
            n = backend.abort_uploads(backend.join(root, DATA_DIR, attempt))
        except OSError as e:
            logger.warning(
                "%s: listing unfinished uploads failed (%s); the bucket's lifecycle rule is the backstop",
                uri,
                e,
            )
            return
        if n:
            logger.warning("%s: aborted %d unfinished multipart upload(s) of this save", uri, n)

    def _write_data(
        self,
        backend: Backend,
        root: str,
        uri: str,
        leaves: list[TensorLeaf],
        rank: int,
        attempt: str,
    ) -> tuple[list[FileRecord], list[TensorRecord], list[GlobalRecord]]:
        to_write, chunk_of, globals_ = plan_global_leaves(leaves, rank)
        total = sum(leaf.tensor.numel() * leaf.tensor.element_size() for leaf in to_write)
        size = target_file_size(total, self._config.file_size_bytes, self._config.concurrency)
        plan = plan_files(to_write, rank, size, attempt)
        records: list[TensorRecord | None] = [None] * len(to_write)
        blocks: dict[int, tuple[int, list[int]]] = {}
        stop = threading.Event()
        futures = [
            self._pool.submit(
                self._write_file, backend, root, uri, n, planned, to_write, records, blocks, stop
            )
            for n, planned in enumerate(plan)
        ]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done):
            # One file failed: the others stop (an upload in flight aborts after its current
            # tensor), and none is still running when the save reports the failure.
            stop.set()
            for f in futures:
                f.cancel()
            wait(futures)
            first = next(f for f in futures if not f.cancelled() and f.exception() is not None
                         and not isinstance(f.exception(), _Stopped))  # fmt: skip
            first.result()
        files = [f.result() for f in futures]
        for pos, (g, chunk) in chunk_of.items():
            per_block, crcs = blocks[pos]
            globals_[g].chunks.append(
                ChunkRecord(pos, list(chunk.offsets), list(chunk.sizes), per_block, crcs)
            )
        return files, [r for r in records if r is not None], globals_

    def _write_file(
        self,
        backend: Backend,
        root: str,
        uri: str,
        file_no: int,
        planned: PlannedFile,
        leaves: list[TensorLeaf],
        records: list[TensorRecord | None],
        blocks: dict[int, tuple[int, list[int]]],
        stop: threading.Event,
    ) -> FileRecord:
        dtypes: dict[torch.dtype, str] = {}
        header = SafetensorsHeader()
        for i, name in enumerate(planned.names, planned.start):
            t = leaves[i].tensor
            dtype = dtypes.get(t.dtype)
            if dtype is None:
                dtype = dtypes[t.dtype] = dtype_name(t.dtype)
            nbytes = t.numel() * t.element_size()
            header.add(name, *safetensors_entry(dtype, t.shape, nbytes), nbytes)
        head = header.to_bytes()
        size = len(head) + planned.nbytes

        def chunks() -> Iterator[memoryview | bytes]:
            yield head
            offset = len(head)
            for i in range(planned.start, planned.stop):
                if stop.is_set():
                    raise _Stopped(f"{uri}: {planned.path} stopped: another data file failed")
                leaf = leaves[i]
                t = host_contiguous(leaf.tensor)  # a host copy only for GPU or strided tensors
                view = tensor_bytes(t)
                if leaf.shard is None:
                    crc = crc32c(view)
                else:  # a global chunk: checksums per block of rows, the whole one from them
                    per_block, crcs, crc = block_checksums(view, tuple(t.shape), t.element_size())
                    blocks[i] = (per_block, crcs)
                records[i] = TensorRecord(
                    leaf.key,
                    dtypes[t.dtype],
                    list(t.shape),
                    file_no,
                    offset,
                    view.nbytes,
                    crc,
                )
                offset += view.nbytes
                yield view

        path = backend.join(root, planned.path)
        store_call(backend.write_object, path, uri, chunks(), size)
        return FileRecord(planned.path, size)

    def close(self) -> None:
        """Stop the writer's threads, close the backends it opened and its barrier."""
        self._pool.shutdown(wait=True)
        try:
            if self._own_backends:
                self._backends.close()
        finally:
            if self._barrier is not None:
                self._barrier.close()


def _manifest_for(
    world: int, outcomes: list[RankOutcome], metadata: dict[str, Any] | None, attempt: str
) -> Manifest:
    """The manifest rank 0 commits: one entry per rank's outcome, in rank order."""
    return Manifest(
        world_size=world,
        ranks=[o.entry() for o in outcomes],
        library_version=__version__,
        metadata=metadata or {},
        attempt=attempt,
    )


def pending_outcome_name(rank: int) -> str:
    """Where a rank leaves its outcome for rank 0 when the barrier can only wait."""
    return f"{INDEX_DIR}/pending/rank-{rank:05d}.json"


def carries_outcomes(barrier: Any) -> bool:
    """Whether ``barrier`` exchanges outcomes (a :class:`Barrier` overriding ``exchange``);
    else it can only wait, through ``execute_barrier()``."""
    return isinstance(barrier, Barrier) and type(barrier).exchange is not Barrier.exchange


class _Stopped(Exception):
    """A data file's upload given up because a sibling file of the same save failed."""
