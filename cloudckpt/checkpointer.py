"""Sync and async orchestration of writer, reader, stager and background writer."""

from __future__ import annotations

import abc
import logging
from concurrent.futures import Future
from typing import Any

from .background import BackgroundWriter
from .checkpoint_reader import CheckpointReader
from .checkpoint_writer import CheckpointWriter
from .errors import StateDictMismatchError
from .staging import CheckpointStager
from .types import STATE_DICT
from .utils import wrap_future

logger = logging.getLogger(__name__)


class Checkpointer(abc.ABC):
    """Saves and loads state dicts; see :class:`SyncCheckpointer` and :class:`AsyncCheckpointer`."""

    @abc.abstractmethod
    def save(
        self, path: str, state_dict: STATE_DICT, **kwargs: Any
    ) -> tuple[Future[Any], Future[Any]] | None:
        """Save ``state_dict`` at ``path``."""

    @abc.abstractmethod
    def load(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        default_map_location: Any = None,
        strict: bool = False,
        **kwargs: Any,
    ) -> STATE_DICT:
        """Load the checkpoint at ``path`` (only ``state_dict``'s keys, in place, if given)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources; waits for writes in flight."""

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_with_reader(
    reader: CheckpointReader,
    path: str,
    state_dict: STATE_DICT | None,
    default_map_location: Any,
    strict: bool,
    kwargs: dict[str, Any],
) -> STATE_DICT:
    """Read ``path`` through ``reader``; ``strict`` raises on keys the checkpoint lacks."""
    loaded, missing = reader.read(path, state_dict, map_location=default_map_location, **kwargs)
    if strict and missing:
        shown = ", ".join(missing[:10]) + (
            f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        )
        raise StateDictMismatchError(
            f"Checkpoint at {path} is missing keys: {shown}. Load with strict=False to keep the "
            "target's values for them, or drop them from the target."
        )
    if missing:
        logger.warning(
            "checkpoint %s lacks %d requested keys: %s", path, len(missing), missing[:10]
        )
    return loaded


class _ReaderCheckpointer(Checkpointer):
    """Loading, shared by both checkpointers: always synchronous, through ``self._reader``."""

    _reader: CheckpointReader

    def load(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        default_map_location: Any = None,
        strict: bool = False,
        **kwargs: Any,
    ) -> STATE_DICT:
        return load_with_reader(
            self._reader, path, state_dict, default_map_location, strict, kwargs
        )


class SyncCheckpointer(_ReaderCheckpointer):
    """Saves in the caller's thread; returns when the checkpoint is committed.

    ``close`` closes the writer and reader only with ``owns_components=True`` (the factories
    set it): a writer or reader you passed in may be shared, so you close it.
    """

    def __init__(
        self,
        writer: CheckpointWriter,
        reader: CheckpointReader,
        *,
        owns_components: bool = False,
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._owns_components = owns_components

    def save(
        self, path: str, state_dict: STATE_DICT, **kwargs: Any
    ) -> tuple[Future[Any], Future[Any]] | None:
        """Save and commit; a committed checkpoint at ``path`` is replaced unless
        ``overwrite=False`` (as upstream; ``cloudckpt.save`` refuses by default)."""
        kwargs.setdefault("overwrite", True)
        self._writer.write(path, state_dict, **kwargs)
        return None

    def close(self) -> None:
        if self._owns_components:
            try:
                self._writer.close()
            finally:
                self._reader.close()


class AsyncCheckpointer(_ReaderCheckpointer):
    """Blocks only for staging; the write and commit run behind the caller.

    ``close`` waits for the write in flight and closes the stager and the background writer;
    the reader only with ``owns_components=True`` (the factories set it), since a reader you
    passed in may be shared.
    """

    def __init__(
        self,
        checkpoint_stager: CheckpointStager,
        checkpoint_process: BackgroundWriter,
        reader: CheckpointReader,
        *,
        owns_components: bool = False,
    ) -> None:
        self._stager = checkpoint_stager
        self._process = checkpoint_process
        self._reader = reader
        self._owns_components = owns_components
        self._write_future: Future[Any] | None = None
        self._staged: STATE_DICT | Future[STATE_DICT] | None = None  # the write in flight's

    def save(
        self, path: str, state_dict: STATE_DICT, **kwargs: Any
    ) -> tuple[Future[Any], Future[Any]] | None:
        """Stage now, write and commit behind the caller; a committed checkpoint at ``path``
        is replaced unless ``overwrite=False`` (as upstream)."""
        kwargs.setdefault("overwrite", True)
        previous, self._write_future = self._write_future, None
        done, self._staged = self._staged, None
        try:
            if previous is not None:
                previous.result()  # one save in flight; the previous error surfaces here, once
        finally:
            if done is not None and (previous is None or previous.done()):
                self._recycle(done)  # only once nothing reads it any more
            del done  # a slab of other shapes is freed before the stager allocates a new one
        staged = self._stager.stage(state_dict=state_dict, **kwargs)
        self._staged = staged
        self._write_future = self._process.write(staged, path, **kwargs)
        return wrap_future(staged), self._write_future

    def _recycle(self, staged: STATE_DICT | Future[STATE_DICT]) -> None:
        """The previous save's write is over: its staging slab goes back to the stager, which
        reuses it for this save (the staging future given to the caller resolved to ``None``,
        so no one else holds it)."""
        if isinstance(staged, Future):
            if staged.exception() is not None:
                return
            staged = staged.result()
        self._stager.recycle(staged)

    def close(self) -> None:
        """Wait for the write in flight, close the stager, the background writer and (when
        owned) the reader, then raise that write's error if no later ``save`` reported it.

        The error is raised once: a second ``close`` returns quietly. Everything is closed
        before it is raised."""
        pending, self._write_future = self._write_future, None
        error: BaseException | None = None
        try:
            if pending is not None:
                error = pending.exception()
        finally:
            self._staged = None
            try:
                self._stager.close()
                self._process.close()
            finally:
                if self._owns_components:
                    self._reader.close()
        if error is not None:
            raise error

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
            return
        try:  # the block's own exception is the one to see; the write's is logged
            self.close()
        except Exception as e:
            if e is not exc[1]:  # not the write's error itself, raised in the block
                logger.error("the last checkpoint write failed as well: %s", e)
