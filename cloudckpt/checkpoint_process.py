"""The background writer of an async checkpointer (a thread here; a process in issue 8)."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .checkpoint_writer import CheckpointWriter
from .types import STATE_DICT

logger = logging.getLogger(__name__)


@dataclass
class CheckpointProcessConfig:
    """Timeouts of the writer process (as in the seed)."""

    subprocess_init_timeout_secs: int = 30
    subprocess_shutdown_timeout_secs: int = 60


class CheckpointProcess:
    """Runs writes of staged state dicts one at a time, off the caller's thread."""

    def __init__(self, writer: CheckpointWriter, config: CheckpointProcessConfig | None = None):
        self._writer = writer
        self._config = config or CheckpointProcessConfig()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cloudckpt-writer")

    def write(
        self, state_dict: STATE_DICT | Future[STATE_DICT], path: str, **kwargs: Any
    ) -> Future[None]:
        def run() -> None:
            sd = state_dict.result() if isinstance(state_dict, Future) else state_dict
            self._writer.write(path, sd, **kwargs)

        return self._executor.submit(run)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._writer.close()
