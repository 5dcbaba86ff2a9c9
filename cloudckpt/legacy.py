"""Checkpoints in the upstream layout: one ``torch.save`` file per rank, ``checkpoint_{rank}.pt``.

``torch.distributed.checkpoint._experimental`` writes that layout, with no manifest and no
checksums. Loading one goes through ``torch.load(weights_only=True)`` (tensors, containers and
plain values only: arbitrary objects are never unpickled) and warns, once per load, that nothing
was verified. ``convert`` writes it again as a committed cloudckpt checkpoint (``cloudckpt cp``).
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Any

from .barriers import Barrier
from .errors import (
    BackendError,
    BarrierError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StateDictMismatchError,
    UnverifiedCheckpointWarning,
)
from .protocol.records import CommitResult, RankOutcome
from .storage.interface import Backend
from .storage.messages import describe_store_error

logger = logging.getLogger(__name__)

_RANK_FILE = re.compile(r"checkpoint_(\d+)\.pt")


def rank_file(rank: int) -> str:
    return f"checkpoint_{rank}.pt"


def legacy_ranks(backend: Backend, root: str) -> list[int]:
    """The ranks of the upstream-layout files directly under ``root`` (empty: none)."""
    try:
        names = [info.name for info in backend.list_dir(root) if not info.is_dir]
    except (FileNotFoundError, NotADirectoryError):
        return []
    ranks = []
    for name in names:
        m = _RANK_FILE.fullmatch(name)
        if m:
            ranks.append(int(m.group(1)))
    return sorted(ranks)


def load_rank(backend: Backend, root: str, uri: str, rank: int, map_location: Any = None) -> Any:
    """Rank ``rank``'s state dict from an upstream-layout checkpoint, without verification."""
    ranks = legacy_ranks(backend, root)
    if rank not in ranks:
        raise CheckpointNotFoundError(
            f"{uri} holds upstream checkpoint files for ranks {ranks} but not "
            f"{rank_file(rank)}; pass rank= with one of those"
        )
    path = backend.join(root, rank_file(rank))
    where = backend.to_uri(path)
    try:
        raw = backend.read_bytes(path)
    except OSError as e:
        raise BackendError(describe_store_error(uri, where, e)) from e
    warnings.warn(
        f"{where} is in the upstream torch.distributed.checkpoint._experimental layout (no "
        "manifest, no checksums): loaded unverified with torch.load(weights_only=True). "
        f"`cloudckpt cp {uri} NEW` converts it into a committed, checksummed checkpoint",
        UnverifiedCheckpointWarning,
        stacklevel=4,
    )
    import torch

    try:
        return torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{where} holds objects that torch.load(weights_only=True) refuses ({e}); cloudckpt "
            "never unpickles arbitrary objects. If you trust the file, load it with torch.load "
            "yourself and save it again with cloudckpt.save"
        ) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CorruptCheckpointError(
            f"{where} is not a readable torch.save file ({type(e).__name__}: {e}); it is "
            "damaged or truncated. Load an earlier checkpoint."
        ) from None


def fill(target: Any, loaded: Any, missing: list[str], key: str = "") -> Any:
    """Put ``loaded``'s values into ``target``'s keys (only those), in place where possible;
    keys ``loaded`` lacks go to ``missing``."""
    import torch

    from .tree import CONTAINER_KINDS, child_key, container_kind

    dicts = ("dict", "odict")
    if (
        container_kind(target, key, StateDictMismatchError) in dicts
        and CONTAINER_KINDS.get(type(loaded)) in dicts
    ):
        for k in list(target):
            child = child_key(key, k, False)
            if k in loaded:
                target[k] = fill(target[k], loaded[k], missing, child)
            else:
                missing.append(child)
        return target
    if isinstance(target, torch.Tensor) and isinstance(loaded, torch.Tensor):
        if target.shape != loaded.shape or target.dtype != loaded.dtype:
            raise StateDictMismatchError(
                f"{key or '<root>'}: the target tensor is {tuple(target.shape)} {target.dtype} "
                f"but the checkpoint holds {tuple(loaded.shape)} {loaded.dtype}; reshape or "
                "recast the target to match"
            )
        if target.device == loaded.device:
            target.copy_(loaded)
            return target
    return loaded


@dataclass(frozen=True)
class ConvertReport:
    """What :func:`convert` did: the upstream-layout source, the committed destination and
    how many rank files it converted."""

    src: str
    dst: str
    ranks: int


class _ThreadGroup:
    """What the ranks of one in-process conversion share."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.arrived = threading.Barrier(world_size)
        self.outcomes: list[RankOutcome | None] = [None] * world_size
        self.commit = CommitResult(ok=False, error="rank 0 did not commit")
        self.committed = threading.Event()


class ThreadGroupBarrier(Barrier):
    """The barrier between writers of one process's threads, one per rank (conversion)."""

    barrier_type = "thread_group"

    def __init__(self, group: _ThreadGroup, rank: int) -> None:
        self._group = group
        self._rank = rank

    def execute_barrier(self) -> None:
        self._group.arrived.wait()

    def exchange(self, outcome: RankOutcome, timeout_secs: float) -> list[RankOutcome] | None:
        g = self._group
        g.outcomes[self._rank] = outcome
        try:
            g.arrived.wait(timeout_secs)
            seen = [o for o in g.outcomes if o is not None]
            g.arrived.wait(timeout_secs)  # everyone has read before the next round writes
        except threading.BrokenBarrierError:
            raise BarrierError("a rank of the conversion failed; nothing was committed") from None
        failed = [o for o in seen if not o.ok]
        if failed:
            raise BarrierError(f"converting failed: {failed[0].error}; nothing was committed")
        return seen if self._rank == 0 else None

    def publish_commit(self, result: CommitResult) -> None:
        self._group.commit = result
        self._group.committed.set()

    def await_commit(self, timeout_secs: float) -> CommitResult:
        if not self._group.committed.wait(timeout_secs):
            raise BarrierError("rank 0 of the conversion did not commit in time")
        return self._group.commit


def convert(
    src_backend: Backend,
    src_root: str,
    src_uri: str,
    dst_uri: str,
    *,
    overwrite: bool,
    writer_config: Any,
    storage: Any,
) -> ConvertReport:
    """Write the upstream-layout checkpoint at ``src_uri`` as a committed one at ``dst_uri``:
    every rank's file loaded (``weights_only``) and saved by its own writer, in threads."""
    from concurrent.futures import ThreadPoolExecutor

    from .checkpoint_writer import CheckpointWriter
    from .types import RankInfo

    ranks = legacy_ranks(src_backend, src_root)
    world = len(ranks)
    if ranks != list(range(world)):
        raise CorruptCheckpointError(
            f"{src_uri} holds upstream checkpoint files for ranks {ranks}, not 0..{world - 1}; "
            "a rank's file is missing, so it cannot be converted"
        )
    group = _ThreadGroup(world)

    def one(rank: int) -> int:
        try:
            sd = load_rank(src_backend, src_root, src_uri, rank, map_location="cpu")
            barrier = ThreadGroupBarrier(group, rank) if world > 1 else None
            writer = CheckpointWriter(
                writer_config, RankInfo(rank, world), barrier, storage=storage
            )
            try:
                writer.write(dst_uri, sd, overwrite=overwrite)
            finally:
                writer.close()
        except BaseException:
            group.arrived.abort()  # the other ranks stop waiting for this one
            raise
        return rank

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedCheckpointWarning)
        with ThreadPoolExecutor(world) as pool:
            for f in [pool.submit(one, r) for r in ranks]:
                f.result()
    logger.info("converted %s (%d rank files) into %s", src_uri, world, dst_uri)
    return ConvertReport(src_uri, dst_uri, world)
