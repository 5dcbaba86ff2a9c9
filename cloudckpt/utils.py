"""Futures, as in ``torch.distributed.checkpoint._experimental.utils``."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any


def wrap_future(original_result: Any) -> Future[None]:
    """A future that completes with ``None`` when ``original_result`` (a future or not) does."""
    masked: Future[None] = Future()
    if isinstance(original_result, Future):

        def on_complete(_: Future[Any]) -> None:
            try:
                original_result.result()
                masked.set_result(None)
            except Exception as e:
                masked.set_exception(e)

        original_result.add_done_callback(on_complete)
    else:
        masked.set_result(None)
    return masked
