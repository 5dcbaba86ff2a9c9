"""Sync and async orchestration of writer, reader, stager and background writer."""

from __future__ import annotations

import abc
import logging
from concurrent.futures import Future
from typing import Any

from .checkpoint_process import BackgroundWriter
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
    """Saves in the caller's thread; returns when the checkpoint is committed."""

    def __init__(self, writer: CheckpointWriter, reader: CheckpointReader) -> None:
        self._writer = writer
        self._reader = reader

    def save(
        self, path: str, state_dict: STATE_DICT, **kwargs: Any
    ) -> tuple[Future[Any], Future[Any]] | None:
        self._writer.write(path, state_dict, **kwargs)
        return None

    def close(self) -> None:
        self._writer.close()
        self._reader.close()


class AsyncCheckpointer(_ReaderCheckpointer):
    """Blocks only for staging; the write and commit run behind the caller."""

    def __init__(
        self,
        checkpoint_stager: CheckpointStager,
        checkpoint_process: BackgroundWriter,
        reader: CheckpointReader,
    ) -> None:
        self._stager = checkpoint_stager
        self._process = checkpoint_process
        self._reader = reader
        self._write_future: Future[Any] | None = None

    def save(
        self, path: str, state_dict: STATE_DICT, **kwargs: Any
    ) -> tuple[Future[Any], Future[Any]] | None:
        previous, self._write_future = self._write_future, None
        if previous is not None:
            previous.result()  # one save in flight; the previous error surfaces here, once
        staged = self._stager.stage(state_dict)
        self._write_future = self._process.write(staged, path, **kwargs)
        return wrap_future(staged), self._write_future

    def close(self) -> None:
        try:
            if self._write_future is not None:
                self._write_future.exception()
        finally:
            self._stager.close()
            self._process.close()
            self._reader.close()
