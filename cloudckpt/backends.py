"""The storage layer: a small interface over fsspec, the backend registry, and the core backends.

A backend knows objects and bytes, nothing of tensors or checkpoints. It is bound to one
filesystem (one set of ``storage_options``); its methods take *paths* in that filesystem's own
form (what ``fsspec`` calls a stripped path). ``resolve(uri)`` picks a backend by the URI's
scheme (or by an explicit name) and returns it with the path.

Backends register under the entry-point group ``cloudckpt.backends`` (name = backend name, value
= the class), or at run time with :func:`register_backend`. The core ships ``local`` (plain paths
and ``file://``) and ``fsspec`` (any protocol fsspec knows, ``memory://`` included).
"""

from __future__ import annotations

import abc
import errno
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar

from .errors import BackendError, ConfigError

logger = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview

_IOV_MAX = 1024


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

    Subclasses set ``name`` and ``protocols`` (URI schemes; ``""`` means a plain path) and
    implement the abstract methods. ``create_only_commit`` says whether
    :meth:`put_create_only` is atomic against a concurrent writer on this store;
    ``conditional_replace`` whether :meth:`put_replace` refuses to replace a version other than
    the expected one.
    """

    name: ClassVar[str] = ""
    protocols: ClassVar[tuple[str, ...]] = ()
    create_only_commit: ClassVar[bool] = True
    conditional_replace: ClassVar[bool] = False

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

    def retry_total(self) -> int:
        """Requests this backend has retried so far (for log lines); 0 if it never retries."""
        return 0


def _write_all(fd: int, buffers: list[memoryview]) -> None:
    """Write ``buffers`` to ``fd`` with as few ``writev`` calls as the kernel allows."""
    while buffers:
        batch = buffers[:_IOV_MAX]
        written = os.writev(fd, batch)
        # Drop what was written; a partial write leaves the tail of one buffer.
        i = 0
        while i < len(batch) and written >= len(batch[i]):
            written -= len(batch[i])
            i += 1
        rest = buffers[i:]
        if written and rest:
            rest[0] = rest[0][written:]
        buffers = rest


class LocalBackend(Backend):
    """Plain paths and ``file://``: temporary name, fsync, then rename (link for create-only)."""

    name = "local"
    protocols = ("", "file", "local")

    def to_path(self, uri: str) -> str:
        for prefix in ("file://", "local://"):
            if uri.startswith(prefix):
                uri = uri[len(prefix) :]
                break
        return os.path.abspath(os.path.expanduser(uri))

    def to_uri(self, path: str) -> str:
        return path

    def join(self, base: str, *parts: str) -> str:
        return os.path.join(base, *parts)

    @staticmethod
    def _temp_name(path: str) -> str:
        head, tail = os.path.split(path)
        return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:12]}")

    @staticmethod
    def _fsync_dir(path: str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_temp(self, path: str, chunks: Iterable[Buffer]) -> str:
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = self._temp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            pending: list[memoryview] = []
            pending_bytes = 0
            for chunk in chunks:
                view = memoryview(chunk).cast("B") if not isinstance(chunk, memoryview) else chunk
                if view.nbytes == 0:
                    continue
                if view.format != "B" or view.ndim != 1:
                    view = view.cast("B")
                pending.append(view)
                pending_bytes += view.nbytes
                if len(pending) >= _IOV_MAX or pending_bytes >= (8 << 20):
                    _write_all(fd, pending)
                    pending, pending_bytes = [], 0
            _write_all(fd, pending)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        os.close(fd)
        return tmp

    def write_object(self, path: str, chunks: Iterable[Buffer], size: int) -> None:
        tmp = self._write_temp(path, chunks)
        os.replace(tmp, path)
        self._fsync_dir(os.path.dirname(path))

    def read_into(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            views = [b for b in buffers if b.nbytes]
            while views:
                batch = views[:_IOV_MAX]
                got = os.preadv(fd, batch, offset)
                if got == 0:
                    want = sum(v.nbytes for v in views)
                    raise EOFError(f"{path}: object ends at byte {offset}, {want} more expected")
                offset += got
                i = 0
                while i < len(batch) and got >= batch[i].nbytes:
                    got -= batch[i].nbytes
                    i += 1
                rest = views[i:]
                if got and rest:
                    rest[0] = rest[0][got:]
                views = rest
        finally:
            os.close(fd)

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def put_create_only(self, path: str, data: bytes) -> None:
        tmp = self._write_temp(path, [data])
        try:
            os.link(tmp, path)  # atomic, and never replaces: EEXIST if something is there
        except OSError as e:
            if e.errno == errno.EEXIST:
                raise FileExistsError(errno.EEXIST, "object exists", path) from None
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            # A filesystem without hard links: check, then rename. Racy, and said so.
            logger.warning("%s: filesystem has no hard links; create-only commit is racy", path)
            if os.path.exists(path):
                raise FileExistsError(errno.EEXIST, "object exists", path) from None
            os.rename(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._fsync_dir(os.path.dirname(path))

    @staticmethod
    def _version(st: os.stat_result) -> str:
        return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"

    def read_version(self, path: str) -> VersionedObject | None:
        try:
            with open(path, "rb") as f:
                version = self._version(os.fstat(f.fileno()))
                return VersionedObject(f.read(), version)
        except FileNotFoundError:
            return None

    def put_replace(self, path: str, data: bytes, expected_version: str) -> None:
        """Temporary file, fsync, then ``rename`` over ``path``. The version check before the
        rename narrows, but cannot close, the window for a concurrent replace on local disk."""
        tmp = self._write_temp(path, [data])
        try:
            try:
                current = self._version(os.stat(path))
            except FileNotFoundError:
                current = ""
            if expected_version and current != expected_version:
                raise FileExistsError(errno.EEXIST, "object was replaced meanwhile", path)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._fsync_dir(os.path.dirname(path))

    def list_dir(self, path: str) -> list[ObjectInfo]:
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for e in entries:
            st = e.stat(follow_symlinks=False)
            is_dir = e.is_dir(follow_symlinks=False)
            out.append(ObjectInfo(e.path, e.name, 0 if is_dir else st.st_size, is_dir, st.st_mtime))
        return sorted(out, key=lambda i: i.name)

    def delete(self, path: str, *, recursive: bool = False) -> None:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                if recursive:
                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def size(self, path: str) -> int:
        return os.stat(path).st_size


class FsspecBackend(Backend):
    """Any protocol fsspec knows. Commits are create-only only as far as the store allows."""

    name = "fsspec"
    protocols: ClassVar[tuple[str, ...]] = ("*",)
    create_only_commit = False

    def __init__(
        self, storage_options: Mapping[str, Any] | None = None, *, protocol: str = "memory"
    ) -> None:
        super().__init__(storage_options)
        import fsspec

        self.protocol = protocol
        try:
            self.fs = fsspec.filesystem(protocol, **self.storage_options)
        except (ValueError, ImportError) as e:
            raise BackendError(
                f"fsspec cannot open protocol {protocol!r}: {e}. Install the package that "
                "provides it, or a cloudckpt backend plugin (cloudckpt-s3, cloudckpt-gcs)."
            ) from e

    def to_path(self, uri: str) -> str:
        return str(self.fs._strip_protocol(uri)).rstrip("/")

    def to_uri(self, path: str) -> str:
        return (
            f"{self.protocol}://{path.lstrip('/')}"
            if self.protocol != "memory"
            else (f"memory://{path}")
        )

    def write_object(self, path: str, chunks: Iterable[Buffer], size: int) -> None:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            try:
                self.fs.makedirs(parent, exist_ok=True)
            except (OSError, NotImplementedError):
                pass
        f = self.fs.open(path, "wb")
        try:
            for chunk in chunks:
                f.write(chunk)
        except BaseException:
            # Never let close() publish a partial object: discard where the file knows how,
            # and remove what some filesystems (memory://) create at open time.
            discard = getattr(f, "discard", None)
            if callable(discard):
                discard()
            try:
                self.fs.rm_file(path)
            except (OSError, NotImplementedError):
                pass
            raise
        f.close()

    def read_into(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        total = sum(b.nbytes for b in buffers)
        data = self.fs.cat_file(path, start=offset, end=offset + total)
        if len(data) < total:
            raise EOFError(f"{path}: object ends at byte {offset + len(data)}, {total} expected")
        view = memoryview(data)
        pos = 0
        for b in buffers:
            b[:] = view[pos : pos + b.nbytes]
            pos += b.nbytes

    def read_bytes(self, path: str) -> bytes:
        return bytes(self.fs.cat_file(path))

    def put_create_only(self, path: str, data: bytes) -> None:
        _warn_not_create_only(self.protocol)
        if self.fs.exists(path):
            raise FileExistsError(errno.EEXIST, "object exists", path)
        self.write_object(path, [data], len(data))

    def list_dir(self, path: str) -> list[ObjectInfo]:
        try:
            entries = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for e in entries:
            p = str(e["name"]).rstrip("/")
            if p == path.rstrip("/"):
                continue
            is_dir = e.get("type") == "directory"
            mtime = e.get("mtime") or e.get("created") or e.get("LastModified")
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            out.append(
                ObjectInfo(
                    p,
                    p.rsplit("/", 1)[-1],
                    int(e.get("size") or 0),
                    is_dir,
                    float(mtime) if isinstance(mtime, (int, float)) else None,
                )
            )
        return sorted(out, key=lambda i: i.name)

    def delete(self, path: str, *, recursive: bool = False) -> None:
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def size(self, path: str) -> int:
        return int(self.fs.size(path))


_warned_protocols: set[str] = set()


def _warn_not_create_only(protocol: str) -> None:
    if protocol not in _warned_protocols and protocol != "memory":
        _warned_protocols.add(protocol)
        logger.warning(
            "%s:// goes through the generic fsspec backend: the manifest commit is not "
            "create-only, so two jobs saving to one URI at once can both succeed. Install the "
            "cloudckpt plugin for this store for an atomic commit.",
            protocol,
        )


# -- the registry ---------------------------------------------------------------------------

_registry: dict[str, type[Backend]] = {}
_by_protocol: dict[str, type[Backend]] = {}
_entry_points_loaded = False
_registry_lock = threading.RLock()
_instances: dict[tuple[str, str, str], Backend] = {}


def register_backend(cls: type[Backend], *, protocols: Iterable[str] | None = None) -> None:
    """Make ``cls`` available by its ``name`` and for its URI schemes (or ``protocols``)."""
    with _registry_lock:
        _registry[cls.name] = cls
        for proto in protocols if protocols is not None else cls.protocols:
            if proto != "*":
                _by_protocol[proto] = cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    with _registry_lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        register_backend(LocalBackend)
        register_backend(FsspecBackend)
        for ep in entry_points(group="cloudckpt.backends"):
            if ep.name in ("local", "fsspec"):
                continue
            try:
                cls = ep.load()
            except Exception as e:  # a broken plugin must not break the others
                logger.warning("cloudckpt backend plugin %r failed to load: %s", ep.name, e)
                continue
            if not (isinstance(cls, type) and issubclass(cls, Backend)):
                logger.warning("entry point %r is not a cloudckpt Backend; ignored", ep.name)
                continue
            # Plugins registered by hand (register_backend) win over entry points.
            if cls.name not in _registry or _registry[cls.name] is cls:
                register_backend(cls)


def available_backends() -> dict[str, type[Backend]]:
    """Every registered backend by name."""
    _load_entry_points()
    return dict(_registry)


def split_scheme(uri: str) -> str:
    """The scheme of ``uri`` (``""`` for a plain path)."""
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    return ""


def backend_class_for(uri: str, backend: str | None = None) -> type[Backend]:
    """The backend class for ``uri``: the one named ``backend``, or the one for its scheme."""
    _load_entry_points()
    if backend:
        try:
            return _registry[backend]
        except KeyError:
            raise ConfigError(
                f"unknown backend {backend!r} for {uri!r}; known: {sorted(_registry)}. "
                "Install its plugin (pip install cloudckpt[s3] / cloudckpt[gcs]) or fix the name."
            ) from None
    scheme = split_scheme(uri)
    return _by_protocol.get(scheme, FsspecBackend)


def _options_key(options: Mapping[str, Any]) -> str:
    return json.dumps(options, sort_keys=True, default=repr)


def resolve(
    uri: str,
    *,
    backend: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[Backend, str]:
    """The backend for ``uri`` (shared per backend, protocol and options) and ``uri``'s path."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"a checkpoint URI must be a non-empty string, got {uri!r}")
    cls = backend_class_for(uri, backend)
    options = dict(storage_options or {})
    scheme = split_scheme(uri)
    key = (cls.name, scheme, _options_key(options))
    with _registry_lock:
        inst = _instances.get(key)
        if inst is None:
            if cls is FsspecBackend:
                inst = FsspecBackend(options, protocol=scheme or "file")
            else:
                inst = cls(options)
            _instances[key] = inst
    return inst, inst.to_path(uri)
