"""The exception hierarchy: every error cloudckpt raises is a ``CheckpointError``.

Where the upstream API (``torch.distributed.checkpoint._experimental``) raised a built-in
exception, ours also subclasses that built-in, so ``except FileNotFoundError`` and friends keep
working.
Every message names the object (URI, key path, config file and key) and says what to do next.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every cloudckpt error."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Nothing is stored at the URI."""


class CheckpointNotCommittedError(CheckpointError, FileNotFoundError):
    """Data exists at the URI but no manifest commits it (a save in progress or one that died)."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint is already at the URI and ``overwrite`` was not asked for."""


class CorruptCheckpointError(CheckpointError):
    """A stored object is damaged: bad checksum, truncated, unparsable or inconsistent."""


class BackendError(CheckpointError, OSError):
    """The store failed an operation; the message names the URI and the store's answer."""


class ConfigError(CheckpointError, ValueError):
    """A configuration file or value is wrong; the message names the file, key and line."""


class UnsupportedValueError(CheckpointError, TypeError):
    """A state-dict leaf cannot be saved; the message names its key path."""


class StateDictMismatchError(CheckpointError, RuntimeError):
    """The target state dict does not fit the checkpoint (missing keys, shape or dtype)."""


class BarrierError(CheckpointError, RuntimeError):
    """Ranks did not agree: a rank failed or never arrived at the barrier."""


class StagingError(CheckpointError, MemoryError):
    """Staging would exceed ``max_staging_bytes`` or the shared memory available."""


class WriterProcessError(CheckpointError, RuntimeError):
    """The background writer process died or could not start; the save was not committed."""


class WriterProcessTimeoutError(WriterProcessError, TimeoutError):
    """The background writer process did not start within ``subprocess_init_timeout_secs``."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint was loaded without checksums: one written by
    ``torch.distributed.checkpoint._experimental`` (``checkpoint_{rank}.pt`` files)."""
