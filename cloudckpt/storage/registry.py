"""The backend registry and URI resolution: backends by name and scheme (entry-point group
``cloudckpt.backends`` and :func:`register_backend`), storage-option checks, and the bounded
cache of shared backends behind :func:`resolve`.

The core registers ``local`` (plain paths and ``file://``) and ``fsspec`` (any protocol fsspec
knows, ``memory://`` included); plugins add the others.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError
from .filesystems import FsspecBackend, LocalBackend
from .interface import Backend
from .messages import plugin_install_hint

logger = logging.getLogger(__name__)


# -- the registry ---------------------------------------------------------------------------

_registry: dict[str, type[Backend]] = {}
_by_protocol: dict[str, type[Backend]] = {}
_entry_points_loaded = False  # every entry point loaded
_tried_entry_points: set[str] = set()  # entry points loaded (or found broken) one by one
_core_registered = False  # LocalBackend and FsspecBackend registered
_registry_lock = threading.RLock()

#: Backends shared by ``resolve`` per (backend, scheme, options), least recently used first.
#: The cache owns them: :func:`clear_backend_cache` closes them.
_cache: OrderedDict[tuple[str, str, str], Backend] = OrderedDict()
CACHE_SIZE = 16


def register_backend(
    cls: type[Backend], *, protocols: Iterable[str] | None = None, clobber: bool = False
) -> None:
    """Make ``cls`` available by its ``name`` and for its URI schemes (or ``protocols``).

    A name or scheme already taken by another class is refused with ``ConfigError`` unless
    ``clobber=True``.
    """
    protos = [p for p in (protocols if protocols is not None else cls.protocols) if p != "*"]
    with _registry_lock:
        if not clobber:
            taken = [f"scheme {p!r} by {_by_protocol[p].__qualname__}" for p in protos
                     if _by_protocol.get(p, cls) is not cls]  # fmt: skip
            if _registry.get(cls.name, cls) is not cls:
                taken.insert(0, f"name {cls.name!r} by {_registry[cls.name].__qualname__}")
            if taken:
                raise ConfigError(
                    f"cannot register {cls.__qualname__}: {'; '.join(taken)} is already "
                    "registered. Pass clobber=True to replace it."
                )
        _registry[cls.name] = cls
        for proto in protos:
            _by_protocol[proto] = cls


def _register_core() -> None:
    """Register ``local`` and ``fsspec`` (once; before any plugin)."""
    global _core_registered
    with _registry_lock:
        if not _core_registered:
            _core_registered = True
            register_backend(LocalBackend, clobber=True)
            register_backend(FsspecBackend, clobber=True)


def _load_entry_points(name: str | None = None) -> None:
    """Register the core backends, then the plugins of the ``cloudckpt.backends`` entry points:
    only the one called ``name`` when given (a local path needs none, ``s3://`` only the
    ``s3`` one), else all of them. Each entry point is loaded once."""
    global _entry_points_loaded
    with _registry_lock:
        _register_core()
        if _entry_points_loaded:
            return
        if name is not None and name in _tried_entry_points:
            return
        if name is None:
            _entry_points_loaded = True
        for ep in entry_points(group="cloudckpt.backends"):
            if ep.name in ("local", "fsspec") or ep.name in _tried_entry_points:
                continue
            if name is not None and ep.name != name:
                continue
            _tried_entry_points.add(ep.name)
            try:
                cls = ep.load()
            except Exception as e:  # a broken plugin must not break the others
                logger.warning("cloudckpt backend plugin %r failed to load: %s", ep.name, e)
                continue
            if not (isinstance(cls, type) and issubclass(cls, Backend)):
                logger.warning("entry point %r is not a cloudckpt Backend; ignored", ep.name)
                continue
            # Plugins registered by hand (register_backend) win over entry points.
            if cls.name not in _registry:
                try:
                    register_backend(cls)
                except ConfigError as e:
                    logger.warning("cloudckpt backend plugin %r ignored: %s", ep.name, e)
        if name is not None:
            _tried_entry_points.add(name)  # a name no entry point has: not looked up again


def available_backends() -> Mapping[str, type[Backend]]:
    """Every registered backend by name (a read-only view)."""
    _load_entry_points()
    return MappingProxyType(dict(_registry))


def split_scheme(uri: str) -> str:
    """The scheme of ``uri`` (``""`` for a plain path)."""
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    return ""


def backend_class_for(uri: str, backend: str | None = None) -> type[Backend]:
    """The backend class for ``uri``: the one named ``backend``, or the one for its scheme."""
    _register_core()
    if backend:
        if backend not in _registry:
            _load_entry_points(backend)
        if backend not in _registry:
            _load_entry_points()
        try:
            return _registry[backend]
        except KeyError:
            raise ConfigError(
                f"unknown backend {backend!r} for {uri!r}; known: {sorted(_registry)}. "
                f"Install {plugin_install_hint(backend)}, or fix the name."
            ) from None
    scheme = split_scheme(uri)
    # Plugins load on demand: the one named like the scheme first (s3:// needs only "s3"),
    # every one only for a scheme still unclaimed (gs://, memory://). Plain paths and
    # file:// belong to the core, which no entry point can take over.
    if scheme not in _by_protocol:
        _load_entry_points(scheme)
    if scheme not in _by_protocol:
        _load_entry_points()
    return _by_protocol.get(scheme, FsspecBackend)


FSSPEC_COMMON_OPTIONS = frozenset(
    {
        "skip_instance_cache",
        "use_listings_cache",
        "listings_expiry_time",
        "max_paths",
        "asynchronous",
        "loop",
        "batch_size",
    }
)
"""Options every fsspec filesystem takes (its instance cache, listings cache and event loop)."""


def _named_parameters(fs_class: type) -> set[str]:
    names: set[str] = set()
    for klass in fs_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):  # pragma: no cover - builtins
            continue
        names.update(
            p.name
            for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        )
    return names


def known_options(cls: type[Backend], protocol: str) -> frozenset[str] | None:
    """Every storage option ``cls`` takes for ``protocol``; ``None`` if it does not declare them."""
    if cls.accepted_options is None:
        return None
    fs_class = cls.fsspec_class(protocol)
    if fs_class is None:
        return cls.accepted_options
    return cls.accepted_options | FSSPEC_COMMON_OPTIONS | _named_parameters(fs_class)


def unknown_options(
    cls: type[Backend], protocol: str, options: Mapping[str, Any]
) -> tuple[list[str], frozenset[str]]:
    """The keys of ``options`` that ``cls`` does not take, and the ones it takes. Options the
    backend declares itself are checked without importing its client's class."""
    declared = cls.accepted_options
    if declared is not None and all(k in declared or k in FSSPEC_COMMON_OPTIONS for k in options):
        return [], declared | FSSPEC_COMMON_OPTIONS
    known = known_options(cls, protocol)
    if known is None:
        return [], frozenset()
    return sorted(str(k) for k in options if k not in known), known


def describe_unknown_options(
    cls: type[Backend], protocol: str, unknown: list[str], known: frozenset[str]
) -> str:
    """``storage option 'x' is not one the s3 backend takes (did you mean 'y'?); known: ...``."""
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    what = f"backend {cls.name!r}" + (f" for {protocol}://" if protocol else "")
    known_text = ", ".join(sorted(known)) if known else "none"
    return (
        f"storage option{'s' if len(unknown) > 1 else ''} {', '.join(hints)} "
        f"{'are' if len(unknown) > 1 else 'is'} not taken by {what}; known options: {known_text}"
    )


_MALFORMED_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/*(?!/)")


def check_uri(uri: str) -> None:
    """Refuse a URI with a scheme but without ``://`` (``s3:/bucket``, ``gs:bucket``)."""
    if "://" not in uri and _MALFORMED_URI.match(uri) and ":" in uri.split("/", 1)[0]:
        scheme = uri.split(":", 1)[0]
        raise ConfigError(
            f"malformed URI {uri!r}: a store URI is {scheme}://bucket/prefix (two slashes after "
            f"the scheme); a local path with a colon in its first component: write ./{uri}"
        )


def _options_key(options: Mapping[str, Any]) -> str:
    return json.dumps(options, sort_keys=True, default=repr)


def _check_options(uri: str, cls: type[Backend], scheme: str, options: dict[str, Any]) -> None:
    unknown, known = unknown_options(cls, scheme, options)
    if unknown:
        raise ConfigError(f"{uri}: {describe_unknown_options(cls, scheme, unknown, known)}")


def open_backend(
    uri: str,
    *,
    backend: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[Backend, str]:
    """A new backend for ``uri`` (the caller owns it and closes it) and ``uri``'s path."""
    return _make(uri, _checked(uri, backend, storage_options))


def _make(uri: str, checked: _Checked) -> tuple[Backend, str]:
    """A new backend of a checked URI's class and options, and ``uri``'s path."""
    if checked.cls is FsspecBackend:
        inst: Backend = FsspecBackend(checked.options, protocol=checked.key[1] or "file")
    else:
        inst = checked.cls(checked.options)
    return inst, inst.to_path(uri)


def resolve(
    uri: str,
    *,
    backend: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[Backend, str]:
    """The backend for ``uri`` (shared per backend, scheme and options) and ``uri``'s path.

    Shared backends live in a cache of :data:`CACHE_SIZE` entries, which owns them; the least
    recently used one is dropped (not closed: a caller may still hold it) when a new one would
    exceed it, and :func:`clear_backend_cache` closes them all. Use :func:`open_backend` for a
    backend of your own, or :class:`OwnedBackends` for the backends of one owner.
    """
    checked = _checked(uri, backend, storage_options)
    key = checked.key
    with _registry_lock:
        inst = _cache.get(key)
        if inst is not None:
            _cache.move_to_end(key)
            return inst, inst.to_path(uri)
    inst, path = _make(uri, checked)
    with _registry_lock:
        shared = _cache.setdefault(key, inst)
        _cache.move_to_end(key)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    if shared is not inst:  # another thread made one first
        inst.close()
    return shared, path


@dataclass(frozen=True)
class _Checked:
    """A URI's backend class and options, checked once; ``key`` is the (backend, scheme,
    options) one instance serves."""

    cls: type[Backend]
    options: dict[str, Any]
    key: tuple[str, str, str]


def _checked(uri: str, backend: str | None, storage_options: Mapping[str, Any] | None) -> _Checked:
    """Check ``uri`` and its options (once per resolve or open)."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"a checkpoint URI must be a non-empty string, got {uri!r}")
    check_uri(uri)
    cls = backend_class_for(uri, backend)
    options = dict(storage_options or {})
    scheme = split_scheme(uri)
    _check_options(uri, cls, scheme, options)
    return _Checked(cls, options, (cls.name, scheme, _options_key(options)))


class OwnedBackends:
    """The backends one owner (a checkpointer, a reader, a manager) opened: one per backend,
    scheme and options, reused for every URI it resolves, all closed by :meth:`close` (which
    the owner calls from its own ``close``). A later :meth:`resolve` opens anew."""

    def __init__(self) -> None:
        self._backends: dict[tuple[str, str, str], Backend] = {}
        self._lock = threading.Lock()

    def resolve(
        self,
        uri: str,
        *,
        backend: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> tuple[Backend, str]:
        """As :func:`resolve`, from this owner's backends."""
        checked = _checked(uri, backend, storage_options)
        with self._lock:
            inst = self._backends.get(checked.key)
            if inst is None:
                inst, path = _make(uri, checked)
                self._backends[checked.key] = inst
                return inst, path
        return inst, inst.to_path(uri)

    @property
    def open(self) -> list[Backend]:
        """The backends opened and not closed yet."""
        with self._lock:
            return list(self._backends.values())

    def close(self) -> None:
        """Close every backend opened here."""
        with self._lock:
            opened = list(self._backends.values())
            self._backends.clear()
        _close_all(opened)


class SharedBackends:
    """:func:`resolve`'s process-wide cache as a source of backends, for one-shot calls
    (``cloudckpt.save``/``load``) that should reuse connections across calls. The backends
    belong to the cache: :meth:`close` leaves them open (:func:`clear_backend_cache` closes
    them)."""

    resolve = staticmethod(resolve)

    def close(self) -> None:
        """Nothing to close: the cache owns its backends."""


BackendSource = OwnedBackends | SharedBackends
"""Where a checkpointer, reader or manager gets its backends."""


def _close_all(backends: list[Backend]) -> None:
    for inst in backends:
        try:
            inst.close()
        except Exception as e:  # one broken close must not keep the others open
            logger.warning("closing %r failed: %s", inst, e)


def clear_backend_cache() -> None:
    """Close and forget every shared backend (call when no save or load is in flight)."""
    with _registry_lock:
        cached = list(_cache.values())
        _cache.clear()
    _close_all(cached)
