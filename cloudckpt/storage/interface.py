"""The storage interface: what a backend is (:class:`Backend`), what it declares
(:class:`Capabilities`) and the records its listings return.

A backend knows objects and bytes, nothing of tensors or checkpoints. It is bound to one
filesystem (one set of ``storage_options``); its methods take *paths* in that filesystem's own
form (what ``fsspec`` calls a stripped path).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .buffers import Buffer

__all__ = ["Backend", "Buffer", "Capabilities", "ObjectInfo", "VersionedObject"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend's store can do; callers read these after resolving a URI.

    ``process_shareable``: another process with the same options sees the same objects (false
    for an in-process store such as ``memory://``). ``create_only_commit``:
    :meth:`Backend.put_create_only` is atomic against a concurrent writer. ``conditional_replace``:
    the store can replace an object only if it is still the version read before.
    ``ranged_reads``: a read of a byte range costs only that range.
    """

    process_shareable: bool = True
    create_only_commit: bool = True
    conditional_replace: bool = False
    ranged_reads: bool = True


@dataclass(frozen=True)
class ObjectInfo:
    """One entry of a listing: ``path`` in the backend's form, ``name`` its last component."""

    path: str
    name: str
    size: int
    is_dir: bool
    mtime: float | None = None


@dataclass(frozen=True)
class VersionedObject:
    """A small object's bytes and the store's version of them (an opaque token for
    :meth:`Backend.put_replace`; ``""`` where the store has none)."""

    data: bytes
    version: str


class Backend(abc.ABC):
    """A store of objects, addressed by path, bound to one set of storage options.

    Subclasses set ``name`` and ``protocols`` (URI schemes; ``""`` means a plain path),
    declare ``capabilities`` (per class, or per instance where the store decides) and implement
    the abstract methods. Whoever creates a backend closes it.
    """

    name: ClassVar[str] = ""
    protocols: ClassVar[tuple[str, ...]] = ()
    capabilities: Capabilities = Capabilities()
    #: The storage options this backend takes itself. ``None``: not declared, every option is
    #: passed on unchecked. A backend that hands the rest to an fsspec filesystem also accepts
    #: that filesystem's options (see :meth:`fsspec_class`).
    accepted_options: ClassVar[frozenset[str] | None] = None

    @classmethod
    def fsspec_class(cls, protocol: str) -> type | None:
        """The fsspec filesystem class the remaining options go to (``None``: none)."""
        return None

    @property
    def create_only_commit(self) -> bool:
        """Whether :meth:`put_create_only` is atomic (``capabilities.create_only_commit``)."""
        return self.capabilities.create_only_commit

    @property
    def conditional_replace(self) -> bool:
        """Whether :meth:`put_replace` refuses to replace a version other than the expected one
        (``capabilities.conditional_replace``)."""
        return self.capabilities.conditional_replace

    def __init__(self, storage_options: Mapping[str, Any] | None = None) -> None:
        self.storage_options: dict[str, Any] = dict(storage_options or {})

    def __repr__(self) -> str:
        # Options may hold credentials: show their names only, never their values.
        return f"{type(self).__name__}(options={sorted(self.storage_options)})"

    # -- addressing -------------------------------------------------------------------------

    @abc.abstractmethod
    def to_path(self, uri: str) -> str:
        """The backend path of ``uri`` (scheme stripped, normalised)."""

    @abc.abstractmethod
    def to_uri(self, path: str) -> str:
        """The URI a user would type for ``path``."""

    def join(self, base: str, *parts: str) -> str:
        """``base`` joined with ``parts`` by ``/``."""
        out = base.rstrip("/")
        for part in parts:
            out = f"{out}/{part.strip('/')}" if out else part.strip("/")
        return out

    # -- objects ----------------------------------------------------------------------------

    @abc.abstractmethod
    def write_object(self, path: str, chunks: Iterable[Buffer], size: int) -> None:
        """Store the concatenation of ``chunks`` (``size`` bytes in all) at ``path``.

        The object appears whole or not at all: a failure part-way (an exception from the
        ``chunks`` iterator included) leaves the previous object, or none, at ``path``.
        """

    @abc.abstractmethod
    def read_into(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` in order with the bytes of ``path`` from ``offset`` on.

        Raises ``FileNotFoundError`` if there is no object and ``EOFError`` if it ends early.
        """

    @abc.abstractmethod
    def read_bytes(self, path: str) -> bytes:
        """The whole object at ``path`` (for small objects: manifests, indexes)."""

    @abc.abstractmethod
    def put_create_only(self, path: str, data: bytes) -> None:
        """Store ``data`` at ``path`` only if nothing is there; else raise ``FileExistsError``."""

    def read_version(self, path: str) -> VersionedObject | None:
        """The object at ``path`` with its version, or ``None`` if there is none."""
        try:
            return VersionedObject(self.read_bytes(path), "")
        except FileNotFoundError:
            return None

    def put_replace(self, path: str, data: bytes, expected_version: str) -> None:
        """Replace the object at ``path`` by ``data``; readers see the old or the new object,
        never neither. Where ``conditional_replace``, raise ``FileExistsError`` if the object
        is no longer at ``expected_version`` (another writer replaced it); the default is a
        plain write."""
        self.write_object(path, [data], len(data))

    def abort_uploads(self, path: str) -> int:
        """Abort unfinished multipart uploads under ``path``; returns how many (default: a
        store without them, 0)."""
        return 0

    @abc.abstractmethod
    def list_dir(self, path: str) -> list[ObjectInfo]:
        """The direct children of ``path`` (an empty list if there is nothing)."""

    @abc.abstractmethod
    def delete(self, path: str, *, recursive: bool = False) -> None:
        """Remove the object at ``path`` (or everything under it); missing is not an error."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Whether an object or a non-empty prefix is at ``path``."""

    @abc.abstractmethod
    def size(self, path: str) -> int:
        """The size in bytes of the object at ``path``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and threads; the default holds none."""

    def check_location(self, path: str) -> None:  # noqa: B027 - optional check
        """Raise :class:`BackendError` naming ``path`` if nothing could ever be stored there
        (its bucket does not exist, a parent is a file). A prefix that is merely empty is fine.
        Listings call this when they find nothing, so a mistyped location is an error rather
        than an empty listing. The default checks nothing."""

    def retry_total(self) -> int:
        """Requests this backend has retried so far (for log lines); 0 if it never retries."""
        return 0
