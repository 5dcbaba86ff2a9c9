"""The storage layer: where checkpoint bytes go, knowing nothing of tensors or checkpoints.

- :mod:`~cloudckpt.storage.interface`: :class:`Backend`, :class:`Capabilities` and the records
  a backend returns;
- :mod:`~cloudckpt.storage.filesystems`: the backends the core ships, ``local`` (plain paths,
  ``file://``) and ``fsspec`` (any protocol fsspec knows);
- :mod:`~cloudckpt.storage.registry`: backends by name and URI scheme, :func:`resolve`;
- :mod:`~cloudckpt.storage.objectstore` and :mod:`~cloudckpt.storage.retry`: the base that
  object-store plugins (S3, GCS) build on, and its retries and deadlines;
- :mod:`~cloudckpt.storage.buffers`: walking lists of byte views;
- :mod:`~cloudckpt.storage.config` (:class:`StorageConfig`, the ``[storage]`` table) and
  :mod:`~cloudckpt.storage.messages` (store errors in words).

A backend plugin imports what it needs from here (see docs/backends/writing-a-backend.md). The
object-store names load on first use, so ``import cloudckpt`` does not start asyncio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import buffers
from .buffers import Buffer
from .config import StorageConfig
from .filesystems import FsspecBackend, LocalBackend
from .interface import Backend, Capabilities, ObjectInfo, VersionedObject
from .messages import describe_store_error, plugin_install_hint
from .registry import (
    BackendSource,
    OwnedBackends,
    SharedBackends,
    available_backends,
    clear_backend_cache,
    open_backend,
    register_backend,
    resolve,
    split_scheme,
)

_LAZY = {
    "ObjectStoreBackend": "objectstore",
    "OptionSpec": "objectstore",
    "StoreAnswer": "objectstore",
    "Deadline": "retry",
    "RetryPolicy": "retry",
}

if TYPE_CHECKING:
    from .objectstore import ObjectStoreBackend, OptionSpec, StoreAnswer
    from .retry import Deadline, RetryPolicy


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Backend",
    "BackendSource",
    "Buffer",
    "Capabilities",
    "Deadline",
    "FsspecBackend",
    "LocalBackend",
    "ObjectInfo",
    "ObjectStoreBackend",
    "OptionSpec",
    "OwnedBackends",
    "RetryPolicy",
    "SharedBackends",
    "StorageConfig",
    "StoreAnswer",
    "VersionedObject",
    "available_backends",
    "buffers",
    "clear_backend_cache",
    "describe_store_error",
    "open_backend",
    "plugin_install_hint",
    "register_backend",
    "resolve",
    "split_scheme",
]
