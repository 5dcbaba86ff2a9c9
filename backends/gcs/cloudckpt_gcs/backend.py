"""The GCS backend: gcsfs for credentials, endpoint and session; the data path speaks the JSON API.

Why not plain gcsfs calls: ``GCSFileSystem`` retries inside every request on its own schedule
(six tries, up to half a minute), caches listings (stale after writes made elsewhere) and buffers
writes. Here every request is one attempt and cloudckpt's retry policy decides about the next, under
one deadline; writes stream from the caller's buffers; reads land in the caller's buffers.

- ``write_object``: a resumable upload, sent in ``part_size`` pieces straight from the chunk
  memoryviews (no copy). The object exists only once the last piece lands, so a failure or a
  killed process leaves nothing. A failed piece is resumed from the offset the server persisted.
- ``put_create_only``: a simple (multipart) upload with ``ifGenerationMatch=0``: the store refuses
  it (412) when any live object has the name, so of two writers exactly one commits.
- ``read_into``: ranged GETs, ``read_part_size`` pieces in parallel, each streamed into its slice
  of the destination buffers and resumed from where it stopped after a dropped connection.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, TypeVar

from cloudckpt.backends import Backend, Buffer, ObjectInfo
from cloudckpt.errors import BackendError
from cloudckpt.retry import (
    RETRY_OPTIONS,
    Retrier,
    RetryCounter,
    RetryPolicy,
    classify_network_error,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

_KIB256 = 256 << 10
#: HTTP statuses worth another attempt (GCS's documented transient answers).
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

#: Options that tune this backend; every other option goes to ``gcsfs.GCSFileSystem``.
OWN_OPTIONS = ("part_size", "read_part_size", "read_concurrency")


class GCSStatusError(OSError):
    """The store answered ``status``; the message names the object and the store's words."""

    def __init__(self, status: int, what: str, detail: str) -> None:
        code = {401: errno.EACCES, 403: errno.EACCES}.get(status, errno.EIO)
        super().__init__(code, f"GCS answered HTTP {status} for {what}: {detail}")
        self.status = status

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUSES


def classify(exc: BaseException) -> str | None:
    """Why ``exc`` is worth another attempt (``"503"``, ``"connection"``), or ``None``."""
    if isinstance(exc, GCSStatusError):
        return str(exc.status) if exc.retryable else None
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, EOFError)):
        return None
    return classify_network_error(exc)


def _error_detail(body: bytes) -> str:
    """The store's message from an error body (JSON API or plain text), shortened."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        err = json.loads(text)["error"]
        text = err if isinstance(err, str) else str(err.get("message", text))
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return text[:300] or "(no message)"


def _as_bytes_view(chunk: Buffer) -> memoryview:
    view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _slice_views(views: Sequence[memoryview], skip: int) -> list[memoryview]:
    """``views`` without their first ``skip`` bytes (no copy)."""
    out: list[memoryview] = []
    for v in views:
        if skip >= v.nbytes:
            skip -= v.nbytes
            continue
        out.append(v[skip:] if skip else v)
        skip = 0
    return out


def _split_views(views: Sequence[memoryview], size: int) -> list[list[memoryview]]:
    """``views`` cut into consecutive groups of ``size`` bytes (the last may be shorter)."""
    groups: list[list[memoryview]] = []
    cur: list[memoryview] = []
    room = size
    for v in views:
        while v.nbytes:
            take = min(room, v.nbytes)
            cur.append(v[:take])
            v = v[take:]
            room -= take
            if room == 0:
                groups.append(cur)
                cur, room = [], size
    if cur:
        groups.append(cur)
    return groups


_BODY_SLICE = 1 << 20


async def _body(views: Sequence[memoryview]) -> AsyncIterator[memoryview]:
    """The request body, in slices of at most 1 MiB: asyncio copies whatever part of a write the
    socket does not take at once, so whole views would cost up to a piece per request in flight.
    """
    for v in views:
        for i in range(0, v.nbytes, _BODY_SLICE):
            yield v[i : i + _BODY_SLICE]


@dataclass
class _Piece:
    """One ranged read: bytes ``start``..``start+length`` of the object into ``views``."""

    start: int
    length: int
    views: list[memoryview]
    done: int = 0


class GCSBackend(Backend):
    """``gs://bucket/key`` and ``gcs://bucket/key`` on Google Cloud Storage (or an emulator)."""

    name = "gcs"
    protocols = ("gs", "gcs")
    create_only_commit = True
    accepted_options: ClassVar[frozenset[str] | None] = RETRY_OPTIONS | set(OWN_OPTIONS)

    @classmethod
    def fsspec_class(cls, protocol: str) -> type | None:
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem

    #: Bytes per resumable-upload request (a multiple of 256 KiB, as GCS requires).
    part_size: int = 16 << 20
    #: Bytes per ranged GET; a larger read is split and fetched in parallel.
    read_part_size: int = 16 << 20
    #: Ranged GETs in flight per ``read_into`` call.
    read_concurrency: int = 8
    #: Objects up to this size go as one simple upload rather than a resumable session.
    simple_upload_max: int = 8 << 20

    def __init__(self, storage_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(storage_options)
        fs_options = dict(self.storage_options)
        self.policy = RetryPolicy.from_options(fs_options)
        self.counter = RetryCounter()
        self.retrier = Retrier(self.policy, classify, self.counter)
        fs_options.setdefault("requests_timeout", self.policy.request_timeout)
        for key in OWN_OPTIONS:
            if key in fs_options:
                setattr(self, key, int(fs_options.pop(key)))
        if self.part_size < _KIB256 or self.part_size % _KIB256:
            raise BackendError(
                f"GCS option part_size={self.part_size} must be a positive multiple of 256 KiB "
                f"({_KIB256} bytes); GCS refuses other resumable-upload piece sizes"
            )
        if self.read_part_size < 1 or self.read_concurrency < 1:
            raise BackendError("GCS options read_part_size and read_concurrency must be >= 1")
        # The plain JSON-API filesystem class, not gcsfs's experimental zonal/HNS subclass: that
        # one probes a gRPC endpoint per bucket (a stall of about a minute against an emulator),
        # and this backend's data path is the JSON API either way.
        from gcsfs.core import GCSFileSystem

        try:
            self.fs = GCSFileSystem(**fs_options)
        except (TypeError, ValueError) as e:
            raise BackendError(
                f"cannot open GCS with options {sorted(fs_options)}: {e}. The options are "
                "gcsfs.GCSFileSystem's (project, token, endpoint_url, requester_pays, ...)."
            ) from e

    # -- addressing -------------------------------------------------------------------------

    def to_path(self, uri: str) -> str:
        for prefix in ("gs://", "gcs://"):
            if uri.startswith(prefix):
                uri = uri[len(prefix) :]
                break
        return uri.strip("/")

    def to_uri(self, path: str) -> str:
        return f"gs://{path.lstrip('/')}"

    def _split(self, path: str) -> tuple[str, str]:
        bucket, _, key = path.strip("/").partition("/")
        if not bucket:
            raise BackendError(f"{self.to_uri(path)!r} names no bucket; use gs://BUCKET/PATH")
        return bucket, key

    # -- requests ---------------------------------------------------------------------------

    @property
    def _base(self) -> str:
        return str(self.fs._location)

    def _object_url(self, bucket: str, key: str, *, media: bool = False) -> str:
        q = urllib.parse.quote
        url = f"{self._base}/storage/v1/b/{q(bucket, safe='')}/o/{q(key, safe='')}"
        return url + "?alt=media" if media else url

    def _run(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run a coroutine on gcsfs's event-loop thread from the calling thread."""
        from fsspec.asyn import FSTimeoutError, sync

        try:
            return sync(self.fs.loop, fn, *args, **kwargs)
        except FSTimeoutError as e:  # aiohttp's timeout, re-raised by fsspec without a word
            raise TimeoutError(
                errno.ETIMEDOUT,
                f"GCS sent no complete answer within {self.fs.requests_timeout} s (storage "
                "option retry_request_timeout)",
            ) from e

    def _retry(self, what: str, attempt: Callable[[], T]) -> T:
        """One logical operation: ``attempt`` again while the shared retry policy allows."""
        return self.retrier.call(attempt, what=what)

    def retry_total(self) -> int:
        return self.counter.total

    async def _request(
        self,
        method: str,
        url: str,
        what: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
        ok: Iterable[int] = (200, 201, 204),
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One HTTP request; a status outside ``ok`` raises (404 as ``FileNotFoundError``)."""
        await self.fs._set_session()
        async with self.fs.session.request(
            method,
            url,
            params=self.fs._get_params(dict(params or {})),
            headers=self.fs._get_headers(dict(headers or {})),
            data=data,
            timeout=self.fs.requests_timeout,
            allow_redirects=False,
        ) as r:
            body = await r.read()
            if r.status in tuple(ok):
                return r.status, r.headers, body
            self._raise_for(r.status, body, what)
        raise AssertionError("unreachable")

    def _raise_for(self, status: int, body: bytes, what: str) -> None:
        detail = _error_detail(body)
        if status == 404:
            raise FileNotFoundError(errno.ENOENT, f"not found on GCS ({detail})", what)
        if status == 412:
            raise FileExistsError(errno.EEXIST, "object exists (ifGenerationMatch=0 failed)", what)
        if status in (401, 403):
            raise PermissionError(
                errno.EACCES,
                f"GCS refused access (HTTP {status}: {detail}); check the credentials (token, "
                "GOOGLE_APPLICATION_CREDENTIALS) and the IAM roles in docs/backends/gcs.md",
                what,
            )
        raise GCSStatusError(status, what, detail)

    # -- writes -----------------------------------------------------------------------------

    def write_object(self, path: str, chunks: Iterable[Buffer], size: int) -> None:
        bucket, key = self._split(path)
        what = self.to_uri(path)
        if size <= self.simple_upload_max:
            data = b"".join(bytes(_as_bytes_view(c)) for c in chunks)
            self._check_size(what, len(data), size)
            self._retry(what, lambda: self._run(self._simple_upload, bucket, key, data, False))
            return
        session = self._retry(what, lambda: self._run(self._start_resumable, bucket, key, what))
        try:
            self._stream_parts(session, what, chunks, size)
        except BaseException:
            self._cancel_session(session)
            raise

    @staticmethod
    def _check_size(what: str, got: int, size: int) -> None:
        if got != size:
            raise ValueError(f"{what}: the chunks hold {got} bytes but {size} were announced")

    def _stream_parts(self, session: str, what: str, chunks: Iterable[Buffer], size: int) -> None:
        """Cut ``chunks`` into ``part_size`` pieces and send each as soon as it is complete."""
        pending: list[memoryview] = []
        pending_bytes = 0
        offset = 0
        for chunk in chunks:
            view = _as_bytes_view(chunk)
            while view.nbytes:
                take = min(view.nbytes, self.part_size - pending_bytes)
                pending.append(view[:take])
                pending_bytes += take
                view = view[take:]
                if pending_bytes == self.part_size and offset + pending_bytes < size:
                    self._send_part(session, what, pending, offset, size)
                    offset += pending_bytes
                    pending, pending_bytes = [], 0
        self._check_size(what, offset + pending_bytes, size)
        # The last piece (possibly exactly part_size) finalizes the object.
        self._send_part(session, what, pending, offset, size)

    def _send_part(
        self, session: str, what: str, views: list[memoryview], offset: int, size: int
    ) -> None:
        """Send ``views`` (bytes ``offset``.. of the object), resuming after a failure."""
        end = offset + sum(v.nbytes for v in views)
        state: dict[str, Any] = {"sent": offset, "failed": ""}

        def attempt() -> None:
            # After a dropped connection the piece is first resent from the last offset the
            # store confirmed (GCS skips bytes it already holds). Only if the store refuses that
            # is the session queried for its offset: fake-gcs-server finalizes an upload on a
            # status query, so the query must stay the exception.
            if state["failed"] == "query":
                state["sent"] = max(
                    state["sent"], self._run(self._query_session, session, what, size)
                )
                if state["sent"] >= end:
                    return
            try:
                persisted = self._run(
                    self._put_range,
                    session,
                    what,
                    _slice_views(views, state["sent"] - offset),
                    state["sent"],
                    end,
                    size,
                )
            except GCSStatusError as e:
                if not e.retryable and state["failed"] == "lost":
                    state["failed"] = "query"
                    raise GCSStatusError(503, what, f"resend refused ({e}); asking") from e
                state["failed"] = "answered"
                raise
            except Exception:
                state["failed"] = "lost"
                raise
            if persisted < end:  # the store kept less than was sent: send the rest
                state["sent"] = max(state["sent"], persisted)
                state["failed"] = "answered"
                raise GCSStatusError(503, what, f"GCS kept {persisted} of {end} bytes")

        self._retry(what, attempt)

    async def _start_resumable(self, bucket: str, key: str, what: str) -> str:
        _, headers, _ = await self._request(
            "POST",
            f"{self._base}/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o",
            what,
            params={"uploadType": "resumable", "name": key},
            headers={
                "Content-Type": "application/json; charset=UTF-8",
                "X-Upload-Content-Type": "application/octet-stream",
            },
            data=json.dumps({"name": key}).encode(),
        )
        location = headers.get("Location")
        if not location:
            raise BackendError(f"{what}: GCS started a resumable upload but sent no session URL")
        # Keep the session on the endpoint we were given: an emulator (or a proxy in front of
        # GCS) may answer with its own external address, which the client may not reach.
        loc, base = urllib.parse.urlsplit(str(location)), urllib.parse.urlsplit(self._base)
        if loc.netloc and loc.netloc != base.netloc:
            location = urllib.parse.urlunsplit((base.scheme, base.netloc, *loc[2:]))
        return str(location)

    async def _put_range(
        self, session: str, what: str, views: list[memoryview], start: int, end: int, size: int
    ) -> int:
        """PUT bytes ``start..end`` of the upload; returns the offset the store now holds."""
        headers = {
            "Content-Length": str(end - start),
            "Content-Range": f"bytes {start}-{end - 1}/{size}"
            if end > start
            else f"bytes */{size}",
            "Content-Type": "application/octet-stream",
        }
        status, rh, body = await self._request(
            "PUT", session, what, headers=headers, data=_body(views), ok=(200, 201, 308)
        )
        if status in (200, 201):
            return self._finalized_size(body, what, size)
        if end == size:
            raise GCSStatusError(503, what, "the last piece was not accepted (HTTP 308)")
        return self._persisted(rh)

    @staticmethod
    def _finalized_size(body: bytes, what: str, size: int) -> int:
        """``size``, after checking that the finished object really holds ``size`` bytes."""
        try:
            got = int(json.loads(body)["size"])
        except (ValueError, KeyError, TypeError):
            return size  # no object resource in the answer: nothing to check against
        if got != size:
            raise BackendError(
                f"{what}: the store finished the resumable upload at {got} of {size} bytes "
                "(fake-gcs-server does this on a status query; GCS answers 308). The object is "
                "not committed; save again"
            )
        return size

    @staticmethod
    def _persisted(headers: Mapping[str, str]) -> int:
        rng = headers.get("Range")  # "bytes=0-N": N+1 bytes persisted; absent: none
        return int(rng.rsplit("-", 1)[1]) + 1 if rng else 0

    async def _query_session(self, session: str, what: str, size: int) -> int:
        """How many bytes of the upload the store holds (``size`` once it is finalized)."""
        status, rh, body = await self._request(
            "PUT",
            session,
            what,
            headers={"Content-Length": "0", "Content-Range": f"bytes */{size}"},
            ok=(200, 201, 308),
        )
        if status in (200, 201):
            return self._finalized_size(body, what, size)
        return self._persisted(rh)

    def _cancel_session(self, session: str) -> None:
        """Abandon a resumable upload (best effort: an unfinished session expires anyway)."""
        try:
            self._run(self._request, "DELETE", session, "upload session", ok=(200, 204, 499))
        except Exception as e:  # the original error matters more
            logger.debug("cancelling a GCS upload session failed: %s", type(e).__name__)

    async def _simple_upload(self, bucket: str, key: str, data: bytes, create_only: bool) -> None:
        boundary = f"cloudckpt-{uuid.uuid4().hex}"
        meta = json.dumps({"name": key, "contentType": "application/octet-stream"})
        body = b"".join(
            [
                f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
                f"{meta}\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        params = {"uploadType": "multipart", "name": key}
        if create_only:
            params["ifGenerationMatch"] = "0"
        await self._request(
            "POST",
            f"{self._base}/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o",
            self.to_uri(f"{bucket}/{key}"),
            params=params,
            headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
            data=body,
        )

    def put_create_only(self, path: str, data: bytes) -> None:
        bucket, key = self._split(path)
        what = self.to_uri(path)
        tried = {"n": 0}

        def attempt() -> None:
            tried["n"] += 1
            try:
                self._run(self._simple_upload, bucket, key, bytes(data), True)
            except FileExistsError:
                # A retry after a lost response finds our own object: that is success.
                if tried["n"] > 1 and self._read_or_none(path) == bytes(data):
                    return
                raise

        self._retry(what, attempt)

    def _read_or_none(self, path: str) -> bytes | None:
        try:
            return self.read_bytes(path)
        except FileNotFoundError:
            return None

    # -- reads ------------------------------------------------------------------------------

    def read_into(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        bucket, key = self._split(path)
        what = self.to_uri(path)
        views = [_as_bytes_view(b) for b in buffers if b.nbytes]
        pieces = []
        start = offset
        for group in _split_views(views, self.read_part_size):
            n = sum(v.nbytes for v in group)
            pieces.append(_Piece(start, n, group))
            start += n
        if not pieces:
            return
        url = self._object_url(bucket, key, media=True)

        def attempt() -> None:
            self._run(self._fetch_pieces, url, what, [p for p in pieces if p.done < p.length])

        self._retry(what, attempt)

    async def _fetch_pieces(self, url: str, what: str, pieces: list[_Piece]) -> None:
        limit = asyncio.Semaphore(self.read_concurrency)

        async def one(p: _Piece) -> None:
            async with limit:
                await self._fetch_piece(url, what, p)

        tasks = [asyncio.ensure_future(one(p)) for p in pieces]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _fetch_piece(self, url: str, what: str, p: _Piece) -> None:
        """GET the rest of ``p`` and copy the body into its views as it arrives."""
        first = p.start + p.done
        last = p.start + p.length - 1
        await self.fs._set_session()
        async with self.fs.session.get(
            url,
            params=self.fs._get_params({}),
            headers=self.fs._get_headers({"Range": f"bytes={first}-{last}"}),
            timeout=self.fs.requests_timeout,
        ) as r:
            if r.status == 416:
                raise EOFError(f"{what}: object ends before byte {first}, {last + 1} needed")
            if r.status not in (200, 206):
                self._raise_for(r.status, await r.read(), what)
            skip = first if r.status == 200 else 0  # a server that ignored the Range header
            targets = _slice_views(p.views, p.done)
            ti = 0
            while ti < len(targets):
                data = await r.content.readany()
                if not data:
                    break
                src = memoryview(data)
                if skip:
                    cut = min(skip, src.nbytes)
                    src, skip = src[cut:], skip - cut
                while src.nbytes and ti < len(targets):
                    dst = targets[ti]
                    n = min(dst.nbytes, src.nbytes)
                    dst[:n] = src[:n]
                    p.done += n
                    src = src[n:]
                    if n == dst.nbytes:
                        ti += 1
                    else:
                        targets[ti] = dst[n:]
            if p.done < p.length:
                total = r.headers.get("Content-Range", "").rpartition("/")[2]
                if total.isdigit() and int(total) < p.start + p.length:
                    raise EOFError(
                        f"{what}: object ends at byte {total}, {p.start + p.length} needed"
                    )
                raise GCSStatusError(503, what, "the response ended early (connection dropped)")

    def read_bytes(self, path: str) -> bytes:
        bucket, key = self._split(path)
        what = self.to_uri(path)
        url = self._object_url(bucket, key, media=True)

        async def get() -> bytes:
            return (await self._request("GET", url, what))[2]

        return self._retry(what, lambda: self._run(get))

    # -- metadata ---------------------------------------------------------------------------

    async def _stat(self, bucket: str, key: str, what: str) -> dict[str, Any] | None:
        try:
            _, _, body = await self._request("GET", self._object_url(bucket, key), what)
        except FileNotFoundError:
            return None
        return dict(json.loads(body))

    async def _list(
        self, bucket: str, prefix: str, what: str, *, delimiter: bool, max_results: int = 1000
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Every object (and with ``delimiter``, every sub-prefix) under ``prefix``."""
        items: list[dict[str, Any]] = []
        prefixes: list[str] = []
        token: str | None = None
        url = f"{self._base}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o"
        while True:
            params = {"prefix": prefix, "maxResults": str(max_results)}
            if delimiter:
                params["delimiter"] = "/"
            if token:
                params["pageToken"] = token
            _, _, body = await self._request("GET", url, what, params=params)
            page = json.loads(body)
            items.extend(page.get("items", []))
            prefixes.extend(page.get("prefixes", []))
            token = page.get("nextPageToken")
            if not token or max_results == 1:  # one answer is enough for exists()
                return items, prefixes

    def check_location(self, path: str) -> None:
        bucket, _ = self._split(path)
        what = self.to_uri(bucket)
        try:
            self._retry(
                what,
                lambda: self._run(self._list, bucket, "", what, delimiter=True, max_results=1),
            )
        except FileNotFoundError:
            raise BackendError(
                f"{self.to_uri(path)}: the bucket {bucket!r} does not exist (or these "
                "credentials cannot see it); check the URI, or create the bucket first"
            ) from None

    def list_dir(self, path: str) -> list[ObjectInfo]:
        bucket, key = self._split(path)
        prefix = f"{key.rstrip('/')}/" if key else ""
        what = self.to_uri(path)
        try:
            items, prefixes = self._retry(
                what, lambda: self._run(self._list, bucket, prefix, what, delimiter=True)
            )
        except FileNotFoundError:  # no such bucket
            return []
        out = [
            ObjectInfo(f"{bucket}/{p.rstrip('/')}", p.rstrip("/").rsplit("/", 1)[-1], 0, True)
            for p in prefixes
        ]
        for it in items:
            name = str(it["name"])
            if name == prefix:  # a directory marker
                continue
            out.append(
                ObjectInfo(
                    f"{bucket}/{name}",
                    name.rsplit("/", 1)[-1],
                    int(it.get("size", 0)),
                    False,
                    _timestamp(it.get("updated")),
                )
            )
        return sorted(out, key=lambda i: i.name)

    def delete(self, path: str, *, recursive: bool = False) -> None:
        bucket, key = self._split(path)
        what = self.to_uri(path)
        keys = [key] if key else []
        if recursive:
            items, _ = self._retry(
                what,
                lambda: self._run(
                    self._list, bucket, f"{key.rstrip('/')}/" if key else "", what, delimiter=False
                ),
            )
            keys += [str(it["name"]) for it in items]
        for k in keys:
            self._retry(what, lambda k=k: self._run(self._delete_one, bucket, k, what))  # type: ignore[misc]

    async def _delete_one(self, bucket: str, key: str, what: str) -> None:
        try:
            await self._request("DELETE", self._object_url(bucket, key), what)
        except FileNotFoundError:
            pass

    def exists(self, path: str) -> bool:
        bucket, key = self._split(path)
        what = self.to_uri(path)

        async def check() -> bool:
            if key and await self._stat(bucket, key, what) is not None:
                return True
            try:
                items, prefixes = await self._list(
                    bucket, f"{key}/" if key else "", what, delimiter=True, max_results=1
                )
            except FileNotFoundError:
                return False
            return bool(items or prefixes)

        return self._retry(what, lambda: self._run(check))

    def size(self, path: str) -> int:
        bucket, key = self._split(path)
        what = self.to_uri(path)
        info = self._retry(what, lambda: self._run(self._stat, bucket, key, what))
        if info is None:
            raise FileNotFoundError(errno.ENOENT, "no such object on GCS", what)
        return int(info["size"])

    def close(self) -> None:
        """Nothing to release: the session belongs to gcsfs's shared filesystem instance."""


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
