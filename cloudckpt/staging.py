"""Staging: copy a state dict's tensors off the training path into reusable CPU buffers.

``DefaultStager`` copies every tensor into one CPU slab laid out for the state dict's shapes.
Each staged result owns its slab for as long as its holder keeps it; a holder that is done with
one hands it back with ``recycle`` (the async checkpointer does, once the write finished), and
the next stage of the same shapes reuses it: a training run's later saves allocate nothing. The
slab is in
shared memory when a writer process reads it (passed once by handle, never pickled), pinned when
an accelerator is present and the writer is a thread. CUDA-only options fall back with a warning
on a machine without an accelerator, so the defaults work everywhere.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .config_types import CheckpointStagerConfig
from .errors import StagingError
from .global_tensors import GlobalShard, MeshCache, global_shard_of, is_dtensor
from .tree import check_tensor, walk
from .types import STATE_DICT
from .units import format_size

logger = logging.getLogger(__name__)

ALIGN = 64
"""Byte alignment of every staged tensor in the slab (cache line; any dtype's element size)."""

SHM_DIR = "/dev/shm"


class CheckpointStager(abc.ABC):
    """Turns a live state dict into a staged one that training may no longer touch."""

    @abc.abstractmethod
    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> STATE_DICT | Future[STATE_DICT]:
        """The staged copy, or a future of it."""

    def recycle(self, staged: STATE_DICT) -> None:  # noqa: B027 - optional
        """Hand back a result of :meth:`stage` its holder no longer reads; a later stage may
        reuse (overwrite) its buffers. The default keeps nothing."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release buffers and threads."""

    def __enter__(self) -> CheckpointStager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _accelerator_available() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return bool(torch.cuda.is_available())


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _view(storage: torch.UntypedStorage, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor shaped like ``like`` at byte ``offset`` of ``storage``."""
    strides, step = [], 1
    for n in reversed(like.shape):
        strides.append(step)
        step *= max(n, 1)
    out = torch.empty(0, dtype=like.dtype)
    offset //= max(1, like.element_size())
    return out.set_(storage, offset, like.shape, tuple(reversed(strides)))


def _copy_into(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool) -> None:
    try:
        dst.copy_(src, non_blocking=non_blocking)
    except (RuntimeError, NotImplementedError):
        # sub-byte dtypes (int1..int7, uint1..uint7, bit) have no copy kernel: copy their bytes
        dst.view(torch.uint8).copy_(src.contiguous().view(torch.uint8), non_blocking=non_blocking)


class DefaultStager(CheckpointStager):
    """Copies every tensor into a CPU slab of its own per result.

    A result stays valid and unchanged for as long as it is held. ``recycle(result)`` hands
    its slab back: the next ``stage`` of the same shapes copies into it instead of allocating.
    ``for_process=True`` (set by the builder when the writer is a process) puts the slab in
    shared memory. ``max_staging_bytes`` makes a save that would need more fail at once.
    """

    def __init__(
        self, config: CheckpointStagerConfig | None = None, *, for_process: bool = False
    ) -> None:
        self._config = config or CheckpointStagerConfig()
        accel = _accelerator_available()
        self._share = for_process and self._config.use_shared_memory
        # torch cannot hand pinned memory to another process: a process writer gets shared memory
        pin, non_blocking = self._config.use_pinned_memory, self._config.use_non_blocking_copy
        self._pin = pin is not False and accel and not self._share
        self._non_blocking = non_blocking is not False and accel
        asked = [n for n, v in (("use_pinned_memory", pin), ("use_non_blocking_copy", non_blocking))
                 if v is True]  # fmt: skip
        if not accel and asked:  # only what the caller set explicitly; the default follows accel
            warnings.warn(
                "no accelerator: staging falls back to plain CPU memory and blocking copies "
                f"({' / '.join(asked)} = true has no effect here)",
                RuntimeWarning,
                stacklevel=2,
            )
        # a slab handed back by ``recycle``, as its layout and one view per tensor
        self._free: tuple[_Layout, list[torch.Tensor]] | None = None
        self._largest = 0  # bytes of the largest slab this stager made
        self._slab_bytes = 0
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="cloudckpt-stage")
            if self._config.use_async_staging
            else None
        )

    @property
    def staged_bytes(self) -> int:
        """Host bytes of the slab the last ``stage`` copied into (0 before the first)."""
        return self._slab_bytes

    @property
    def shared_memory(self) -> bool:
        return self._share

    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> STATE_DICT | Future[STATE_DICT]:
        """Check the size now (fail fast); copy in the background if ``use_async_staging``."""
        tensors: list[torch.Tensor] = []
        shards: dict[int, GlobalShard] = {}
        _collect(state_dict, tensors, shards)
        total = sum(_align(tensor_nbytes(t)) for t in tensors)
        limit = self._config.max_staging_bytes
        if limit is not None and total > limit:
            raise StagingError(
                f"staging this state dict needs {format_size(total)} of host memory "
                f"({len(tensors)} tensors), more than max_staging_bytes = {format_size(limit)} "
                "([staging] max_staging_bytes): raise the limit, save a smaller state dict per "
                "rank, or save synchronously"
            )
        if self._share and total > self.staged_bytes:
            _check_shm(total)  # a new slab is coming: fail here, not with a bus error later
        if self._executor is not None:
            return self._executor.submit(self._stage, state_dict, tensors, shards, total)
        return self._stage(state_dict, tensors, shards, total)

    def _views_for(self, tensors: list[torch.Tensor], total: int) -> list[torch.Tensor]:
        """Tensor views into a slab for this layout: the recycled one if shapes match, else new."""
        layout = _layout_of(tensors)
        free, self._free = self._free, None
        if free is not None and free[0] == layout:
            self._slab_bytes = int(free[1][0].untyped_storage().nbytes())
            return free[1]
        del free  # a recycled slab of other shapes goes before the new one is allocated
        slab = _new_shared(total) if self._share else None
        if slab is None:
            slab = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=self._pin)
            if self._share:
                slab.share_memory_()
        kind = "shared" if self._share else "pinned" if self._pin else "plain"
        log = logger.info if total > self._largest else logger.debug
        self._largest = max(self._largest, total)
        log(
            "staging buffers: %s of %s host memory for %d tensors, reused by the next save of "
            "the same shapes",
            format_size(total),
            kind,
            len(tensors),
        )
        self._slab_bytes = slab.numel()
        storage, offset, views = slab.untyped_storage(), 0, []
        for t in tensors:
            views.append(_view(storage, offset, t))
            offset += _align(tensor_nbytes(t))
        return views

    def recycle(self, staged: STATE_DICT) -> None:
        """Keep ``staged``'s slab for the next stage of the same shapes (the holder of
        ``staged`` must not read it after this). A result not made by this stager is ignored."""
        views: list[torch.Tensor] = []
        _collect(staged, views, {})
        if not views or not _one_slab(views):
            return
        self._free = (_layout_of(views), views)

    def _stage(
        self,
        state_dict: STATE_DICT,
        tensors: list[torch.Tensor],
        shards: dict[int, GlobalShard],
        total: int,
    ) -> STATE_DICT:
        views = self._views_for(tensors, total)
        sources = [t.detach() for t in tensors]
        try:  # one call for every tensor: the per-tensor Python cost dominates small tensors
            torch._foreach_copy_(views, sources, non_blocking=self._non_blocking)
        except (RuntimeError, NotImplementedError, TypeError):
            for dst, src in zip(views, sources):
                _copy_into(dst, src, self._non_blocking)
        if self._non_blocking:
            torch.cuda.synchronize()
        return _replace(state_dict, {id(t): v for t, v in zip(tensors, views)}, shards)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._free = None


_Layout = tuple[tuple[tuple[int, ...], torch.dtype], ...]


def _layout_of(tensors: list[torch.Tensor]) -> _Layout:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


def _one_slab(views: list[torch.Tensor]) -> bool:
    """Whether ``views`` are laid out in one storage exactly as :class:`DefaultStager` lays
    out a slab (so reusing it cannot overwrite anything else)."""
    storage = views[0].untyped_storage()
    base, offset = storage.data_ptr(), 0
    for t in views:
        if (
            t.device.type != "cpu"
            or t.untyped_storage().data_ptr() != base
            or t.storage_offset() * t.element_size() != offset
            or not t.is_contiguous()
        ):
            return False
        offset += _align(tensor_nbytes(t))
    return offset <= max(int(storage.nbytes()), 1)


def _collect(value: Any, out: list[torch.Tensor], shards: dict[int, GlobalShard]) -> None:
    """Every tensor of the tree in visit order (a DTensor's local tensor, its layout kept in
    ``shards``; a staged :class:`GlobalShard` the same way, so a staged result hands its slab
    back whole); refuses what the writer would refuse (the tree's rules: :func:`tree.walk`)."""
    meshes: MeshCache = {}  # each device mesh read once per walk

    def leaf(value: Any, key: str) -> None:
        if is_dtensor(value) or isinstance(value, GlobalShard):
            where = key or "<root>"
            shard = (
                value if isinstance(value, GlobalShard) else global_shard_of(value, where, meshes)
            )
            check_tensor(where, shard.local)
            shards[id(value)] = shard
            out.append(shard.local)
        elif isinstance(value, torch.Tensor):
            check_tensor(key or "<root>", value)
            out.append(value)

    walk(value, leaf, None)


def _replace(value: Any, staged: dict[int, torch.Tensor], shards: dict[int, GlobalShard]) -> Any:
    """The tree with every tensor swapped for its staged copy (a DTensor for a
    :class:`GlobalShard` of its staged local tensor); containers keep their types."""

    def leaf(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            shard = shards.get(id(value))
            if shard is not None:
                return dataclasses.replace(shard, local=staged[id(shard.local)])
            return staged[id(value)]
        return value

    return walk(value, leaf, keys=False)  # the tree passed _collect's checks


def _new_shared(nbytes: int) -> torch.Tensor | None:
    """A byte tensor allocated straight in shared memory (``share_memory_()`` would allocate
    private memory first and copy it over); ``None`` where torch lacks the helper."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:
        return None
    storage = new_shared(max(nbytes, 1))
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _check_shm(needed: int) -> None:
    """Fail with advice, not a bus error, when shared memory cannot hold the slab."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return  # no /dev/shm (not Linux): let torch try
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise StagingError(
            f"staging for the writer process needs {format_size(needed)} of shared memory but "
            f"{SHM_DIR} has {format_size(free)} free; give the container more (docker run "
            '--shm-size, a Kubernetes emptyDir with medium: Memory) or use [process] writer = "thread"'
        )
