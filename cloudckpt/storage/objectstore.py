"""The object-store base: what every bucket/key store (S3, GCS, the next one) shares.

A store plugin subclasses :class:`ObjectStoreBackend` and supplies the requests; the base owns:

- addressing: ``scheme://bucket/key`` split into bucket and key, URIs for messages;
- options: its own tuning options declared as :class:`OptionSpec` (sizes with units such as
  ``"8MiB"``), the ``retry_*`` options, and every other option handed to the store's client;
  any bad value is a :class:`~cloudckpt.errors.ConfigError` naming the option;
- retries: one :class:`~cloudckpt.storage.retry.Retrier` per backend, one deadline per operation, a
  classifier built from the store's answers (HTTP status and error code, never message text);
- error mapping: a store answer becomes ``FileNotFoundError``, ``FileExistsError``, ``EOFError``
  or a :class:`~cloudckpt.errors.BackendError` that names the URI and says what to do (missing
  bucket, refused credentials, unreachable endpoint); anything else unexpected is wrapped in
  ``BackendError`` with the original as ``__cause__``;
- the event loop the store's async client runs on, and :meth:`run` to call into it;
- ranged reads: a read is cut into ``read_part_size`` pieces fetched in parallel, each streamed
  into its slice of the caller's buffers and resumed where it stopped after a dropped
  connection. The plugin only opens a byte range (:meth:`open_range`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import ssl
import threading
import urllib.parse
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from ..errors import BackendError, ConfigError
from ..units import parse_size
from . import buffers, plainhttp
from .interface import Backend
from .plainhttp import RangeRequest
from .retry import (
    RETRYABLE_HTTP_STATUSES,
    Deadline,
    Retrier,
    RetryCounter,
    RetryPolicy,
    classify_network_error,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["ObjectStoreBackend", "OptionSpec", "StoreAnswer", "is_unreachable"]


@dataclass(frozen=True)
class OptionSpec:
    """One tuning option a backend reads itself: ``kind`` is ``"size"`` (bytes, units allowed)
    or ``"int"``; values below ``minimum`` are refused."""

    name: str
    kind: str
    default: int
    doc: str
    minimum: int = 1
    aliases: tuple[str, ...] = ()

    def parse(self, value: Any, backend: str) -> int:
        where = f"storage option {self.name}={value!r} for the {backend} backend"
        try:
            if isinstance(value, bool):
                raise ValueError("expected a number, got a boolean")
            if self.kind == "size":
                out = parse_size(value)
            elif isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
                out = int(value)
            else:
                raise ValueError(f"expected a whole number, got {value!r}")
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if out < self.minimum:
            raise ConfigError(f"{where}: must be at least {self.minimum} ({self.doc})")
        return out


@dataclass(frozen=True)
class StoreAnswer:
    """What a store said about a failed request: HTTP ``status``, its error ``code``
    (``"NoSuchBucket"``, ``"AccessDenied"``; ``""`` when it sent none) and its ``message``."""

    status: int | None
    code: str = ""
    message: str = ""


class StatusError(OSError):
    """A store's error answer to a plain GET (``status``), for stores without their own type."""

    def __init__(self, status: int, what: str, body: bytes) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:200]!r}")
        self.status = status
        self.code = ""


@dataclass
class Piece:
    """One ranged read: object bytes ``start``.. ``start + length`` into ``views``."""

    start: int
    length: int
    views: list[memoryview]
    done: int = 0
    targets: list[memoryview] = field(default_factory=list)


#: Connection failures that mean nobody answers at the endpoint (as opposed to a reset or a
#: timeout of a connection that was made): never worth a retry.
_UNREACHABLE_NAMES = ("EndpointConnectionError", "ClientConnectorError", "ClientConnectorDNSError")


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) says the endpoint refused or does not resolve."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError):
            return True
        if isinstance(seen, OSError) and seen.errno in (errno.ECONNREFUSED,):
            return True
        if type(seen).__name__ == "gaierror":
            return True
        if any(c.__name__ in _UNREACHABLE_NAMES for c in type(seen).__mro__):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class ObjectStoreBackend(Backend):
    """A store of objects addressed as ``bucket/key``, reached through an async HTTP client.

    Subclasses set ``name``, ``protocols``, ``scheme`` and ``option_specs``, implement
    :meth:`open_client`, :meth:`answer_of` and :meth:`open_range` plus the write and metadata
    methods of :class:`~cloudckpt.storage.Backend`, and call :meth:`call` / :meth:`run` for
    every request so that retries and error mapping stay the same on every store.
    """

    #: The scheme written in URIs for messages and listings (``"s3"``, ``"gs"``).
    scheme: ClassVar[str] = ""
    #: Tuning options this backend reads itself; the rest go to the store's client.
    option_specs: ClassVar[tuple[OptionSpec, ...]] = (
        OptionSpec("part_size", "size", 8 << 20, "bytes per upload part"),
        OptionSpec("read_part_size", "size", 8 << 20, "bytes per ranged GET"),
        OptionSpec("max_inflight_parts", "int", 8, "requests in flight per operation"),
    )
    #: Options of the store's client, declared so that checking them needs no import of the
    #: client (``known_options`` still asks the client's class about any other option).
    client_options: ClassVar[tuple[str, ...]] = ()
    #: Store error codes that mean "try again" whatever the status says.
    retryable_codes: ClassVar[frozenset[str]] = frozenset()
    #: Store error codes for a bucket that does not exist.
    missing_bucket_codes: ClassVar[frozenset[str]] = frozenset({"NoSuchBucket"})
    #: Store error codes for credentials the store refuses.
    credential_codes: ClassVar[frozenset[str]] = frozenset(
        {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken"}
    )

    part_size: int
    read_part_size: int
    max_inflight_parts: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # What config validation accepts: the options declared here (the rest of the store
        # client's own are added from fsspec_class).
        cls.accepted_options = frozenset((*cls.own_options(), *cls.client_options))

    def __init__(self, storage_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(storage_options)
        client_options = dict(self.storage_options)
        try:
            self.policy = RetryPolicy.from_options(client_options)
        except ValueError as e:
            raise ConfigError(f"{e} (for the {self.name} backend)") from None
        for spec in self.option_specs:
            value: Any = spec.default
            for key in (spec.name, *spec.aliases):
                if key in client_options:
                    value = client_options.pop(key)
            setattr(self, spec.name, spec.parse(value, self.name))
        self.endpoint = str(client_options.get("endpoint_url") or "")
        self.counter = RetryCounter()
        self.retrier = Retrier(self.policy, self.classify, self.counter)
        self._plain_lock = threading.Lock()
        self._http: plainhttp.ConnectionPool | None = None
        self._piece_pool: ThreadPoolExecutor | None = None
        self.open_client(client_options)

    @classmethod
    def own_options(cls) -> tuple[str, ...]:
        """Names of the options this backend reads itself (the rest go to its client)."""
        names = [n for s in cls.option_specs for n in (s.name, *s.aliases)]
        return (*names, *RetryPolicy.option_names())

    # -- what a plugin supplies -------------------------------------------------------------

    def open_client(self, options: dict[str, Any]) -> None:
        """Create the store's client from ``options`` (every option the base does not read)."""
        raise NotImplementedError

    def answer_of(self, exc: BaseException) -> StoreAnswer | None:
        """The store's answer behind ``exc``, or ``None`` if ``exc`` is not one."""
        status = getattr(exc, "status", None)
        return StoreAnswer(status, str(getattr(exc, "code", "") or "")) if status else None

    def open_range(
        self, bucket: str, key: str, first: int, last: int
    ) -> AsyncGenerator[bytes, None]:
        """The bytes ``first..last`` (inclusive) of an object, as they arrive."""
        raise NotImplementedError

    def range_request(self, bucket: str, key: str) -> RangeRequest | None:
        """The GET of an object's media as a plain HTTP request (the base adds ``Range``), so
        that reads land in the caller's buffers from the reading thread
        (:mod:`~cloudckpt.storage.plainhttp`); ``None`` (the default) reads through
        :meth:`open_range` on the async client instead."""
        return None

    def status_error(self, status: int, body: bytes, what: str) -> Exception:
        """A plain GET's error answer as the exception :meth:`answer_of` reads."""
        return StatusError(status, what, body)

    def tls_context(self) -> ssl.SSLContext:
        """The TLS context of plain requests to an ``https`` endpoint."""
        return ssl.create_default_context()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the client runs on (fsspec's IO thread unless the client has one)."""
        from fsspec.asyn import get_loop

        return get_loop()

    # -- addressing -------------------------------------------------------------------------

    def to_path(self, uri: str) -> str:
        for proto in self.protocols:
            if uri.startswith(f"{proto}://"):
                uri = uri[len(proto) + 3 :]
                break
        return uri.strip("/")

    def to_uri(self, path: str) -> str:
        return f"{self.scheme}://{path.lstrip('/')}"

    def split(self, path: str) -> tuple[str, str]:
        """``(bucket, key)`` of ``path``; a path without a bucket is refused."""
        bucket, _, key = path.strip("/").partition("/")
        if not bucket:
            raise BackendError(
                f"{self.to_uri(path)!r} names no bucket; use {self.scheme}://BUCKET/PATH"
            )
        return bucket, key

    # -- requests ---------------------------------------------------------------------------

    def run(self, coro: Awaitable[T]) -> T:
        """Run ``coro`` on the client's loop from a (non-loop) calling thread."""
        from fsspec.asyn import FSTimeoutError, sync

        try:
            return sync(self.loop, lambda: coro)
        except FSTimeoutError as e:
            raise TimeoutError(
                errno.ETIMEDOUT,
                f"{self.name}: no complete answer within {self.policy.request_timeout:g} s "
                "(storage option retry_request_timeout)",
            ) from e

    async def call(
        self, fn: Callable[[], Awaitable[T]], what: str, deadline: Deadline | None = None
    ) -> T:
        """``await fn()`` under the retry policy, with a failure mapped by :meth:`store_error`."""
        try:
            return await self.retrier.acall(fn, what=what, deadline=deadline)
        except Exception as e:
            mapped = self.store_error(e, what)
            if mapped is e:
                raise
            raise mapped from (None if isinstance(mapped, (FileNotFoundError, EOFError)) else e)

    def call_sync(self, fn: Callable[[], T], what: str, deadline: Deadline | None = None) -> T:
        """``fn()`` (a blocking client call) under the retry policy, mapped like :meth:`call`."""
        try:
            return self.retrier.call(fn, what=what, deadline=deadline)
        except Exception as e:
            mapped = self.store_error(e, what)
            if mapped is e:
                raise
            raise mapped from (None if isinstance(mapped, (FileNotFoundError, EOFError)) else e)

    def retry_total(self) -> int:
        return self.counter.total

    # -- error mapping ----------------------------------------------------------------------

    def classify(self, exc: BaseException) -> str | None:
        """Why ``exc`` is worth another attempt (``"503"``, ``"SlowDown"``), or ``None``."""
        if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, EOFError)):
            return None
        answer = self.answer_of(exc)
        if answer is not None and (answer.status or answer.code):
            if answer.code in self.retryable_codes:
                return answer.code
            if answer.status in RETRYABLE_HTTP_STATUSES:
                return str(answer.status)
            return None
        if is_unreachable(exc):
            return None
        return classify_network_error(exc)

    def store_error(self, exc: Exception, what: str) -> Exception:
        """``exc`` as the library raises it: a documented type that names ``what``."""
        if isinstance(exc, (BackendError, FileNotFoundError, FileExistsError, EOFError)):
            return exc
        answer = self.answer_of(exc)
        endpoint = self.endpoint or f"the {self.name} service"
        if answer is None:
            if is_unreachable(exc):
                return BackendError(
                    f"{what}: cannot reach the store at {endpoint} ({_short(exc)}). Check "
                    "endpoint_url and the network, and that the store is running"
                )
            if isinstance(exc, OSError):
                return exc
            return BackendError(f"{what}: {_short(exc)}")
        said = f"HTTP {answer.status}" + (f" {answer.code}" if answer.code else "")
        if answer.message:
            said += f": {answer.message[:200]}"
        if answer.code in self.missing_bucket_codes:
            return self.missing_bucket(what, self.split(self.to_path(what))[0], said)
        if answer.status == 404:
            return FileNotFoundError(errno.ENOENT, f"no such object ({said})", what)
        if answer.status == 412:
            return FileExistsError(errno.EEXIST, f"object exists or changed ({said})", what)
        if answer.status == 416:
            return EOFError(f"{what}: the range is past the end of the object ({said})")
        if answer.status in (401, 403) or answer.code in self.credential_codes:
            err = BackendError(
                f"{what}: the store refused the request ({said}). Check the credentials "
                f"and the permissions on the bucket (docs/backends/{self.name}.md)"
            )
            err.errno = errno.EACCES
            return err
        return BackendError(f"{what}: the store answered {said}")

    def missing_bucket(self, what: str, bucket: str, said: str) -> BackendError:
        """The error for a bucket that does not exist (``said``: the store's answer)."""
        endpoint = self.endpoint or f"the {self.name} service"
        return BackendError(
            f"{what}: the bucket {bucket!r} does not exist at {endpoint} ({said}), or these "
            "credentials cannot see it. Create it, or fix the bucket name in the URI"
        )

    # -- ranged reads -----------------------------------------------------------------------

    def read_into(self, path: str, offset: int, buffers_: Sequence[memoryview]) -> None:
        bucket, key = self.split(path)
        what = self.to_uri(path)
        views = [buffers.byte_view(b) for b in buffers_ if b.nbytes]
        pieces: list[Piece] = []
        start = offset
        for group in buffers.split(views, self.read_part_size):
            n = buffers.total(group)
            pieces.append(Piece(start, n, group))
            start += n
        if not pieces:
            return
        deadline = self.retrier.deadline()
        request = self.range_request(bucket, key)
        if request is not None:
            self._get_pieces(request, what, pieces, deadline)
            return

        async def fetch(p: Piece, sem: asyncio.Semaphore) -> None:
            async with sem:
                await self.call(lambda: self._fetch_piece(bucket, key, what, p), what, deadline)

        async def fetch_all() -> None:
            sem = asyncio.Semaphore(self.max_inflight_parts)
            tasks = [asyncio.ensure_future(fetch(p, sem)) for p in pieces]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

        self.run(fetch_all())

    def _get_pieces(
        self, request: RangeRequest, what: str, pieces: list[Piece], deadline: Deadline
    ) -> None:
        """Fetch ``pieces`` with plain ranged GETs: this thread and up to
        ``max_inflight_parts - 1`` of the backend's own take them in turn. After a failure no
        new piece starts; the first error is raised once every started piece has ended."""
        todo = iter(pieces)
        lock = threading.Lock()
        failed: list[BaseException] = []

        def work() -> None:
            while True:
                with lock:
                    p = None if failed else next(todo, None)
                if p is None:
                    return
                try:
                    self.call_sync(
                        functools.partial(self._get_piece, request, what, p), what, deadline
                    )
                except BaseException as e:
                    with lock:
                        failed.append(e)
                    return

        helpers = min(len(pieces), self.max_inflight_parts) - 1
        if helpers > 0:
            with self._plain_lock:
                if self._piece_pool is None:
                    self._piece_pool = ThreadPoolExecutor(
                        self.max_inflight_parts, thread_name_prefix=f"cloudckpt-{self.name}-get"
                    )
                pool = self._piece_pool
            started = [pool.submit(work) for _ in range(helpers)]
        else:
            started = []
        work()
        for f in started:
            if not f.cancel():  # a helper still queued behind other reads has nothing left
                f.result()
        if failed:
            raise failed[0]

    def _get_piece(self, request: RangeRequest, what: str, p: Piece) -> None:
        """One attempt at the rest of ``p`` (after a drop, from where it stopped)."""

        def landed(n: int) -> None:
            p.done += n

        try:
            plainhttp.get_range_into(
                self._connections(request.url),
                request,
                p.start + p.done,
                buffers.skip(p.views, p.done),
                landed,
            )
        except plainhttp.StatusAnswer as e:
            raise self.status_error(e.status, e.body, what) from None
        except EOFError as e:
            raise EOFError(f"{what}: {e}") from None

    def _connections(self, url: str) -> plainhttp.ConnectionPool:
        with self._plain_lock:
            if self._http is None:
                parts = urllib.parse.urlsplit(url)
                self._http = plainhttp.ConnectionPool(
                    f"{parts.scheme}://{parts.netloc}",
                    self.policy.request_timeout,
                    self.tls_context,
                )
            return self._http

    def close(self) -> None:
        """Close the plain GETs' connections and threads (the backend is unusable after)."""
        with self._plain_lock:
            http, self._http = self._http, None
            pool, self._piece_pool = self._piece_pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        if http is not None:
            http.close()

    async def _fetch_piece(self, bucket: str, key: str, what: str, p: Piece) -> None:
        """Fetch the rest of ``p`` (after a drop, from where it stopped) into its views."""
        first = p.start + p.done
        last = p.start + p.length - 1
        targets = deque(buffers.skip(p.views, p.done))
        async with contextlib.aclosing(self.open_range(bucket, key, first, last)) as body:
            async for data in body:
                p.done += buffers.scatter(data, targets)
                if not targets:
                    break
        if p.done < p.length:
            raise EOFError(
                f"{what}: object ends at byte {p.start + p.done}, {p.start + p.length} needed"
            )


def _short(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text[:300]}"
