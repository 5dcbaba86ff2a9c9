"""The writer interface of an async checkpointer (:class:`BackgroundWriter`) and its default,
:class:`WriterThread`: writes of staged state dicts run one at a time in one background thread
of the training process. The writer process is :class:`~cloudckpt.checkpoint_process.CheckpointProcess`.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .config_types import CheckpointProcessConfig
from .types import STATE_DICT

__all__ = ["BackgroundWriter", "WriterThread"]


class BackgroundWriter(abc.ABC):
    """Runs writes of staged state dicts one at a time, off the caller's thread."""

    @abc.abstractmethod
    def write(
        self, state_dict: STATE_DICT | Future[STATE_DICT], path: str, **kwargs: Any
    ) -> Future[None]:
        """Write ``state_dict`` (or the staged result of a future) to ``path``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Wait for the write in flight, then stop."""


def _resolved(state_dict: STATE_DICT | Future[STATE_DICT]) -> STATE_DICT:
    return state_dict.result() if isinstance(state_dict, Future) else state_dict


class WriterThread(BackgroundWriter):
    """The default: a writer running in one background thread of this process."""

    def __init__(self, writer: Any, config: CheckpointProcessConfig | None = None) -> None:
        self._writer = writer
        self._config = config or CheckpointProcessConfig()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cloudckpt-writer")
        self._pending: set[Future[None]] = set()
        # A script may end without close(): let its saves finish before the interpreter stops
        # thread pools (their callbacks run in reverse order of registration, so this one runs
        # before concurrent.futures refuses new work to the writer's own pool).
        with contextlib.suppress(RuntimeError):  # made while the interpreter shuts down
            threading._register_atexit(functools.partial(_finish_writes, weakref.ref(self)))  # type: ignore[attr-defined]

    def write(
        self, state_dict: STATE_DICT | Future[STATE_DICT], path: str, **kwargs: Any
    ) -> Future[None]:
        def run() -> None:
            self._writer.write(path=path, state_dict=_resolved(state_dict), **kwargs)

        future = self._executor.submit(run)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._writer.close()


def _finish_writes(ref: weakref.ref[WriterThread]) -> None:
    """At interpreter exit: wait for the saves still in flight (their errors stay on their
    futures)."""
    writer = ref()
    if writer is not None:
        for future in list(writer._pending):
            future.exception()
