"""cloudckpt: PyTorch checkpoints to local disk, S3, GCS and any fsspec store, by URI.

The names of ``torch.distributed.checkpoint._experimental`` are exported with the same
signatures, so code written for it runs with ``import cloudckpt`` in its place.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Eager: the modules that do not import torch (the command needs only these).
from ._version import __version__
from .barriers import (
    Barrier,
    BarrierConfig,
    DistBarrier,
    TCPStoreBarrier,
    create_barrier_from_config,
)
from .config import (
    CheckpointerConfig,
    CheckpointProcessConfig,
    CheckpointStagerConfig,
    CheckpointWriterConfig,
    load_config,
)
from .errors import (
    BackendError,
    BarrierError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotCommittedError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    StagingError,
    StateDictMismatchError,
    UnsupportedValueError,
    UnverifiedCheckpointWarning,
    WriterProcessError,
    WriterProcessTimeoutError,
)
from .manager import AsyncCheckpointManager, AsyncSave, CheckpointManager
from .protocol import CopyReport, VerifyReport, copy, verify
from .storage import (
    Backend,
    FsspecBackend,
    LocalBackend,
    ObjectInfo,
    StorageConfig,
    register_backend,
)
from .types import STATE_DICT, RankInfo
from .utils import wrap_future

# Lazy: names whose modules import torch load on first use, so `cloudckpt ls` starts in a
# fraction of a second; `cloudckpt.save` etc. behave exactly as if imported eagerly.
_LAZY = {
    "load": "api",
    "save": "api",
    "make_async_checkpointer": "builder",
    "make_sync_checkpointer": "builder",
    "CheckpointProcess": "checkpoint_process",
    "CheckpointReader": "checkpoint_reader",
    "CheckpointWriter": "checkpoint_writer",
    "WriterHook": "checkpoint_writer",
    "AsyncCheckpointer": "checkpointer",
    "Checkpointer": "checkpointer",
    "SyncCheckpointer": "checkpointer",
    "CheckpointStager": "staging",
    "DefaultStager": "staging",
}

if TYPE_CHECKING:
    from .api import load, save
    from .builder import make_async_checkpointer, make_sync_checkpointer
    from .checkpoint_process import CheckpointProcess
    from .checkpoint_reader import CheckpointReader
    from .checkpoint_writer import CheckpointWriter, WriterHook
    from .checkpointer import AsyncCheckpointer, Checkpointer, SyncCheckpointer
    from .staging import CheckpointStager, DefaultStager


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    if name.isidentifier() and name.islower():  # a submodule: cloudckpt.staging, ...
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "STATE_DICT",
    "AsyncCheckpointManager",
    "AsyncCheckpointer",
    "AsyncSave",
    "Backend",
    "BackendError",
    "Barrier",
    "BarrierConfig",
    "BarrierError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointManager",
    "CheckpointNotCommittedError",
    "CheckpointNotFoundError",
    "CheckpointProcess",
    "CheckpointProcessConfig",
    "CheckpointReader",
    "CheckpointStager",
    "CheckpointStagerConfig",
    "CheckpointWriter",
    "CheckpointWriterConfig",
    "Checkpointer",
    "CheckpointerConfig",
    "ConfigError",
    "CopyReport",
    "CorruptCheckpointError",
    "DefaultStager",
    "DistBarrier",
    "FsspecBackend",
    "LocalBackend",
    "ObjectInfo",
    "RankInfo",
    "StagingError",
    "StateDictMismatchError",
    "StorageConfig",
    "SyncCheckpointer",
    "TCPStoreBarrier",
    "UnsupportedValueError",
    "UnverifiedCheckpointWarning",
    "VerifyReport",
    "WriterHook",
    "WriterProcessError",
    "WriterProcessTimeoutError",
    "__version__",
    "copy",
    "create_barrier_from_config",
    "load",
    "load_config",
    "make_async_checkpointer",
    "make_sync_checkpointer",
    "register_backend",
    "save",
    "verify",
    "wrap_future",
]
