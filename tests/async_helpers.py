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


def slow_init(*args: Any) -> None:
    """A ``subprocess_init_fn`` that takes longer than a short start-up timeout."""
    time.sleep(30)


class SwappedOrderWriter:
    """A user's writer declared ``write(state_dict, path)``, as upstream calls it by keyword:
    records what it received under ``out``."""

    def __init__(self, out: str, rank_info: Any = None) -> None:
        self.out = out

    def write(self, state_dict: dict[str, Any], path: str, **kwargs: Any) -> None:
        Path(self.out).write_text(f"{path}|{sorted(state_dict)}|{sorted(kwargs)}")

    def close(self) -> None:
        pass


def swapped_order_writer(out: str, rank_info: Any = None) -> SwappedOrderWriter:
    return SwappedOrderWriter(out, rank_info)
