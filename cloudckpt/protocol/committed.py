"""Opening a committed checkpoint: its manifest and each rank's index, checked, no tensors.

Free of torch on purpose: the ``cloudckpt`` command lists and inspects checkpoints without
paying for ``import torch``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import (
    BackendError,
    CheckpointError,
    CheckpointNotCommittedError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
)
from ..format.encoding import crc32c
from ..storage.interface import Backend
from ..storage.messages import describe_store_error
from ..storage.registry import BackendSource, SharedBackends
from .records import MANIFEST_NAME, Manifest, RankIndex

T = TypeVar("T")


@dataclass
class CommittedCheckpoint:
    """An opened, committed checkpoint: its backend, path, URI and manifest."""

    backend: Backend
    root: str
    uri: str
    manifest: Manifest

    def object_uri(self, rel: str) -> str:
        return self.backend.to_uri(self.backend.join(self.root, rel))

    def read_object(self, rel: str, read: Callable[[str], T], listed_by: str, key: str = "") -> T:
        """``read(path)`` of object ``rel``, which ``listed_by`` (``"the manifest"``, ``"the
        index"``) names, for ``key`` if given; the store's errors become library errors
        naming the object: missing or truncated is damage, a name the store cannot look up is
        a damaged manifest or index, anything else is a :class:`BackendError`."""
        where = self.object_uri(rel)
        for_key = f" (key {key})" if key else ""
        try:
            return read(self.backend.join(self.root, rel))
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"{where} is missing but {listed_by} lists it{for_key}; the checkpoint is "
                "damaged. Load an earlier checkpoint."
            ) from None
        except EOFError as e:
            raise CorruptCheckpointError(
                f"{where} is truncated ({e}); key {key} and later cannot be read. Load an "
                "earlier checkpoint."
            ) from None
        except BackendError:  # from the backend: names the object and what to do
            raise
        except OSError as e:
            raise BackendError(describe_store_error(self.uri, where, e, reading=True)) from e
        except (ValueError, TypeError) as e:
            raise unreadable_name(where, e) from e

    def read_index(self, rank: int) -> RankIndex:
        """Rank ``rank``'s index, checked against the size and CRC32C in the manifest."""
        entry = next((r for r in self.manifest.ranks if r.rank == rank), None)
        if entry is None:
            raise CheckpointError(
                f"{self.uri} has ranks 0..{self.manifest.world_size - 1}; rank {rank} is not "
                "among them. Pass rank= with one of those."
            )
        where = self.object_uri(entry.index)
        raw = self.read_object(entry.index, self.backend.read_bytes, "the manifest")
        if len(raw) != entry.size or crc32c(raw) != entry.crc32c:
            raise CorruptCheckpointError(
                f"{where}: size or CRC32C differs from the manifest ({len(raw)} bytes, expected "
                f"{entry.size}); the index is damaged. Load an earlier checkpoint."
            )
        return RankIndex.from_json(raw, where)


def unreadable_name(where: str, e: Exception) -> CorruptCheckpointError:
    """A stored name the store cannot even look up (a NUL byte, a wrong type): the manifest or
    index that holds it is damaged."""
    where = where.replace("\x00", "\\x00")
    return CorruptCheckpointError(
        f"{where}: the store cannot read this name ({type(e).__name__}: {e}); the manifest or "
        "index naming it is damaged. Load an earlier checkpoint."
    )


def open_checkpoint(
    uri: str,
    backend_name: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    *,
    backends: BackendSource | None = None,
) -> CommittedCheckpoint:
    """Open the committed checkpoint at ``uri``: not found, not committed and damaged
    manifests are told apart. Its backend comes from ``backends`` (default: the shared
    cache of :func:`resolve`)."""
    backend, root = (backends or SharedBackends()).resolve(
        uri, backend=backend_name, storage_options=storage_options
    )
    manifest_path = backend.join(root, MANIFEST_NAME)
    try:
        raw = backend.read_bytes(manifest_path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        if backend.exists(root):
            raise CheckpointNotCommittedError(
                f"{uri} holds no manifest.json: it is not a committed checkpoint (a save in "
                "progress, or one that died). Load a committed one (cloudckpt ls / latest)."
            ) from None
        raise CheckpointNotFoundError(
            f"no checkpoint at {uri}: nothing is stored there. Check the URI (cloudckpt ls "
            "lists the committed checkpoints under a root)."
        ) from None
    except BackendError:  # from the backend: names the object and what to do
        raise
    except OSError as e:
        raise BackendError(describe_store_error(uri, manifest_path, e, reading=True)) from e
    return CommittedCheckpoint(
        backend, root, uri, Manifest.from_json(raw, f"{uri}/{MANIFEST_NAME}")
    )
