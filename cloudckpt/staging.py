"""Staging: copy a state dict's tensors off the training path into reusable CPU buffers.

``DefaultStager`` keeps one CPU buffer per tensor (keyed by position, shape and dtype) and reuses
it on the next save of the same shapes. CUDA-only options fall back with a warning on a machine
without an accelerator, so the defaults work everywhere.
"""

from __future__ import annotations

import abc
import logging
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .types import STATE_DICT

logger = logging.getLogger(__name__)


class CheckpointStager(abc.ABC):
    """Turns a live state dict into a staged one that training may no longer touch."""

    @abc.abstractmethod
    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> STATE_DICT | Future[STATE_DICT]:
        """The staged copy, or a future of it."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release buffers and threads."""


@dataclass
class CheckpointStagerConfig:
    """The seed's flags. Pinned memory and non-blocking copies need an accelerator."""

    use_pinned_memory: bool = True
    use_shared_memory: bool = True
    use_async_staging: bool = True
    use_non_blocking_copy: bool = True


def _accelerator_available() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return bool(torch.cuda.is_available())


class DefaultStager(CheckpointStager):
    """Copies every tensor into CPU buffers kept for the next save of the same shapes."""

    def __init__(self, config: CheckpointStagerConfig | None = None) -> None:
        self._config = config or CheckpointStagerConfig()
        accel = _accelerator_available()
        self._pin = self._config.use_pinned_memory and accel
        self._non_blocking = self._config.use_non_blocking_copy and accel
        if not accel and (self._config.use_pinned_memory or self._config.use_non_blocking_copy):
            warnings.warn(
                "no accelerator: staging falls back to plain CPU memory and blocking copies "
                "(use_pinned_memory / use_non_blocking_copy have no effect here)",
                RuntimeWarning,
                stacklevel=2,
            )
        self._share = self._config.use_shared_memory
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="cloudckpt-stage")
            if self._config.use_async_staging
            else None
        )
        self.staged_bytes = 0

    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> STATE_DICT | Future[STATE_DICT]:
        if self._executor is not None:
            return self._executor.submit(self._stage, state_dict)
        return self._stage(state_dict)

    def _buffer_for(self, slot: int, t: torch.Tensor) -> torch.Tensor:
        key = (slot, tuple(t.shape), t.dtype)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=self._pin)
            if self._share and not self._pin:
                buf.share_memory_()
            self._buffers[key] = buf
            self.staged_bytes += buf.numel() * buf.element_size()
        return buf

    def _stage(self, state_dict: STATE_DICT) -> STATE_DICT:
        counter = iter(range(1 << 62))

        def copy(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                if value.is_meta or value.layout != torch.strided or value.is_quantized:
                    return value  # the writer refuses it with its key path
                buf = self._buffer_for(next(counter), value)
                buf.copy_(value.detach(), non_blocking=self._non_blocking)
                return buf
            if isinstance(value, dict):
                return type(value)((k, copy(v)) for k, v in value.items())
            if isinstance(value, (list, tuple)):
                return type(value)(copy(v) for v in value)
            return value

        staged: STATE_DICT = copy(state_dict)
        if self._non_blocking:
            torch.cuda.synchronize()
        return staged

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._buffers.clear()
