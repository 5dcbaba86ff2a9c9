"""cloudckpt: PyTorch checkpoints to local disk, S3, GCS and any fsspec store, by URI.

The names of ``torch.distributed.checkpoint._experimental`` are exported with the same
signatures, so code written for it runs with ``import cloudckpt`` in its place.
"""

from ._version import __version__
from .api import load, save
from .backends import Backend, FsspecBackend, LocalBackend, ObjectInfo, register_backend
from .barriers import (
    Barrier,
    BarrierConfig,
    DistBarrier,
    TCPStoreBarrier,
    create_barrier_from_config,
)
from .builder import make_async_checkpointer, make_sync_checkpointer
from .checkpoint_process import CheckpointProcess, CheckpointProcessConfig
from .checkpoint_reader import CheckpointReader
from .checkpoint_writer import CheckpointWriter, CheckpointWriterConfig, WriterHook
from .checkpointer import AsyncCheckpointer, Checkpointer, SyncCheckpointer
from .config import CheckpointerConfig, load_config
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
    WriterProcessError,
)
from .manager import CheckpointManager
from .staging import CheckpointStager, CheckpointStagerConfig, DefaultStager
from .storage import StorageConfig
from .types import STATE_DICT, RankInfo
from .utils import wrap_future

__all__ = [
    "STATE_DICT",
    "AsyncCheckpointer",
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
    "WriterHook",
    "WriterProcessError",
    "__version__",
    "create_barrier_from_config",
    "load",
    "load_config",
    "make_async_checkpointer",
    "make_sync_checkpointer",
    "register_backend",
    "save",
    "wrap_future",
]
