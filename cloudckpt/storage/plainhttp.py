"""Ranged GETs over ``http.client`` that land straight in the caller's buffers.

An async client (aiohttp under gcsfs and s3fs) hands a response body over as ``bytes`` chunks on
its one event-loop thread: every byte is copied out of the socket into a new chunk and again into
its destination, on one core for all requests in flight. Here each ranged GET runs in the thread
that asked for it and ``readinto`` moves the body from the socket into the destination memory
(a tensor's bytes) in one copy, with the GIL released while it waits. Reading 77 MB from
fake-gcs-server took 0.06 s of CPU this way against 0.14-0.19 s for gcsfs ``cat_file``.

A store plugin builds the request (URL and headers with its credentials:
:class:`RangeRequest`) and turns an error answer into its own exception; the base
:class:`~cloudckpt.storage.objectstore.ObjectStoreBackend` owns retries and resuming.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

#: The most of an error answer's body kept for its message.
_ERROR_BODY_MAX = 64 << 10
_SKIP_CHUNK = 1 << 20


@dataclass(frozen=True)
class RangeRequest:
    """A ranged GET as the store wants it sent: its full URL and every header but ``Range``
    (credentials included: never logged, never in a message)."""

    url: str
    headers: Mapping[str, str]

    def __repr__(self) -> str:  # the headers carry credentials
        return f"RangeRequest(url={self.url!r})"


class StatusAnswer(Exception):
    """An answer outside 2xx/416 to a ranged GET: the plugin turns it into its own error."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class ConnectionPool:
    """Idle keep-alive connections to one origin (``http``/``https``), shared by threads.

    ``timeout`` bounds every socket read, and the connect unless ``connect_timeout`` is given;
    ``tls`` makes the TLS context for an ``https`` origin (called once, on the first connection).
    """

    def __init__(
        self,
        origin: str,
        timeout: float,
        tls: Callable[[], ssl.SSLContext] | None = None,
        *,
        connect_timeout: float | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {origin!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self._tls = tls or ssl.create_default_context
        self._context: ssl.SSLContext | None = None
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def take(self) -> http.client.HTTPConnection:
        """An idle connection, or a new one (connected, ``TCP_NODELAY``)."""
        with self._lock:
            if self._closed:
                raise ConnectionAbortedError("the backend was closed")
            if self._idle:
                return self._idle.pop()
            if self.scheme == "https" and self._context is None:
                self._context = self._tls()
        conn: http.client.HTTPConnection
        if self.scheme == "https":
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.connect_timeout, context=self._context
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout)
        conn.connect()
        if conn.sock is not None:
            conn.sock.settimeout(self.timeout)
            # A request's headers and body go in separate sends: without this, Nagle's
            # algorithm holds a small body back until the headers are acknowledged.
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def give(self, conn: http.client.HTTPConnection, reusable: bool) -> None:
        """Return ``conn`` for the next request, or close it (``reusable`` false, or closed)."""
        with self._lock:
            if reusable and not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def get_range_into(
    pool: ConnectionPool,
    request: RangeRequest,
    first: int,
    views: Sequence[memoryview],
    progress: Callable[[int], None],
) -> None:
    """GET bytes ``first..`` of ``request``'s object into ``views`` (filled in turn), calling
    ``progress(n)`` as each ``n`` bytes land (so a retry resumes after them).

    Raises :class:`EOFError` when the object ends first (416, or a complete answer that is
    short), :class:`StatusAnswer` for another error answer, and the socket's own errors
    (``ConnectionResetError`` for an answer cut short) for the caller's retry policy."""
    want = sum(v.nbytes for v in views)
    path = urllib.parse.urlsplit(request.url)
    target = path.path + (f"?{path.query}" if path.query else "")
    headers = dict(request.headers)
    headers["Range"] = f"bytes={first}-{first + want - 1}"
    conn = pool.take()
    resp: http.client.HTTPResponse | None = None
    try:
        conn.request("GET", target, headers=headers)
        resp = conn.getresponse()
        if resp.status == 416:
            resp.read()
            raise EOFError(f"the object ends before byte {first + want}")
        if resp.status not in (200, 206):
            raise StatusAnswer(resp.status, resp.read(_ERROR_BODY_MAX))
        if resp.status == 200 and first:  # a server that ignored the Range header
            _discard(resp, first)
        for view in views:
            at = 0
            while at < view.nbytes:
                try:
                    n = resp.readinto(view[at:])
                except http.client.IncompleteRead as e:
                    raise ConnectionResetError(f"the answer was cut short ({e})") from e
                if not n:
                    total = (resp.getheader("Content-Range") or "").rpartition("/")[2]
                    if (total.isdigit() and int(total) < first + want) or resp.length == 0:
                        raise EOFError(f"the object ends before byte {first + want}")
                    raise ConnectionResetError("the answer ended early (connection dropped)")
                at += n
                progress(n)
    finally:
        # reused only when the answer was read to its end and the server keeps the connection
        pool.give(conn, resp is not None and resp.isclosed() and not resp.will_close)


def _discard(resp: http.client.HTTPResponse, n: int) -> None:
    scratch = memoryview(bytearray(min(n, _SKIP_CHUNK)))
    while n:
        got = resp.readinto(scratch[: min(n, len(scratch))])
        if not got:
            raise EOFError(f"the object ends {n} bytes before the range starts")
        n -= got
