"""Module-level pieces the writer *process* imports by name (hooks and init functions pickle by
reference, so they cannot live inside a test function)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import cloudckpt


class WaitBeforeCommit(cloudckpt.WriterHook):
    """Announces itself in ``flag`` (with the writer's pid), then sleeps before the commit."""

    def __init__(self, flag: str, seconds: float) -> None:
        self.flag, self.seconds = flag, seconds

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        Path(self.flag).write_text(str(os.getpid()))
        time.sleep(self.seconds)

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


def failing_init(message: str) -> None:
    raise RuntimeError(message)


def mark_init(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
