"""The GCS backend: gcsfs for credentials, endpoint and session; the data path speaks the JSON API.

On :class:`cloudckpt.storage.objectstore.ObjectStoreBackend`, which owns options, retries, error mapping
and parallel ranged reads (each resumed from where it stopped after a dropped connection).

Why not plain gcsfs calls: ``GCSFileSystem`` retries inside every request on its own schedule
(six tries, up to half a minute), caches listings (stale after writes made elsewhere) and buffers
writes. Here every request is one attempt and cloudckpt's retry policy decides about the next, under
one deadline; writes stream from the caller's buffers; reads land in the caller's buffers.

- ``write_object``: a resumable upload, sent in ``part_size`` pieces straight from the chunk
  memoryviews (no copy). The object exists only once the last piece lands, so a failure or a
  killed process leaves nothing. A failed piece is resumed from the offset the server persisted.
- ``put_create_only``: a simple (multipart) upload with ``ifGenerationMatch=0``: the store refuses
  it (412) when any live object has the name, so of two writers exactly one commits.
- ``read_version`` / ``put_replace``: the object with its generation (metadata, then the media
  at that generation), and an upload with ``ifGenerationMatch=<that generation>``: 412 when
  another writer replaced it meanwhile.
- ``range_request``: the media GET as a plain request (gcsfs's headers and parameters), which
  the base sends over ``http.client`` with ``readinto`` straight into the caller's buffers;
  ``open_range`` (one ranged GET on gcsfs's aiohttp session) where gcsfs's session differs from
  a plain connection (mTLS, ``session_kwargs``). The base cuts reads into ``read_part_size``
  pieces either way.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import urllib.parse
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from cloudckpt.errors import BackendError, ConfigError
from cloudckpt.storage import buffers
from cloudckpt.storage.buffers import Buffer
from cloudckpt.storage.interface import Capabilities, ObjectInfo, VersionedObject
from cloudckpt.storage.objectstore import ObjectStoreBackend, OptionSpec, StoreAnswer
from cloudckpt.storage.plainhttp import RangeRequest

logger = logging.getLogger(__name__)

_KIB256 = 256 << 10


class GCSStatusError(OSError):
    """The store answered ``status`` (``code``: the JSON API's reason, or a cloudckpt name such
    as ``NoSuchBucket``); the message names the object and the store's words."""

    def __init__(self, status: int, what: str, detail: str, code: str = "") -> None:
        super().__init__(errno.EIO, f"GCS answered HTTP {status} for {what}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


def _error_detail(body: bytes) -> tuple[str, str]:
    """The store's message and reason from an error body (JSON API or plain text)."""
    text = body.decode("utf-8", errors="replace").strip()
    reason = ""
    try:
        err = json.loads(text)["error"]
        if isinstance(err, str):
            text = err
        else:
            text = str(err.get("message", text))
            reason = str((err.get("errors") or [{}])[0].get("reason", ""))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        pass
    return text[:300] or "(no message)", reason


_BODY_SLICE = 1 << 20


async def _body(views: Sequence[memoryview]) -> AsyncIterator[memoryview]:
    """The request body, in slices of at most 1 MiB: asyncio copies whatever part of a write the
    socket does not take at once, so whole views would cost up to a piece per request in flight.
    """
    for v in views:
        for i in range(0, v.nbytes, _BODY_SLICE):
            yield v[i : i + _BODY_SLICE]


class GCSBackend(ObjectStoreBackend):
    """``gs://bucket/key`` and ``gcs://bucket/key`` on Google Cloud Storage (or an emulator).

    Options: gcsfs.GCSFileSystem's (``project``, ``token``, ``endpoint_url``, ...) plus
    ``part_size`` (a multiple of 256 KiB), ``read_part_size``, ``max_inflight_parts`` (alias
    ``read_concurrency``) and the ``retry_*`` options.
    """

    name = "gcs"
    protocols = ("gs", "gcs")
    scheme = "gs"
    capabilities = Capabilities(create_only_commit=True, conditional_replace=True)
    option_specs = (
        OptionSpec("part_size", "size", 16 << 20, "bytes per resumable-upload piece", _KIB256),
        OptionSpec("read_part_size", "size", 16 << 20, "bytes per ranged GET"),
        OptionSpec("max_inflight_parts", "int", 8, "ranged GETs in flight per read",
                   aliases=("read_concurrency",)),
    )  # fmt: skip
    #: Objects up to this size go as one simple upload rather than a resumable session.
    simple_upload_max: int = 8 << 20

    @classmethod
    def fsspec_class(cls, protocol: str) -> type | None:
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem

    def open_client(self, options: dict[str, Any]) -> None:
        if self.part_size % _KIB256:
            raise ConfigError(
                f"storage option part_size={self.part_size} for the gcs backend: must be a "
                f"multiple of 256 KiB ({_KIB256} bytes); GCS refuses other resumable-upload "
                "piece sizes"
            )
        options.setdefault("requests_timeout", self.policy.request_timeout)
        # The plain JSON-API filesystem class, not gcsfs's experimental zonal/HNS subclass: that
        # one probes a gRPC endpoint per bucket (a stall of about a minute against an emulator),
        # and this backend's data path is the JSON API either way.
        from gcsfs.core import GCSFileSystem

        try:
            self.fs = GCSFileSystem(**options)
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"cannot open GCS with options {sorted(options)}: {e}. The options are "
                "gcsfs.GCSFileSystem's (project, token, endpoint_url, requester_pays, ...)."
            ) from e
        self.endpoint = self.endpoint or str(self.fs._location)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.fs.loop

    def answer_of(self, exc: BaseException) -> StoreAnswer | None:
        if isinstance(exc, GCSStatusError):
            return StoreAnswer(exc.status, exc.code, exc.detail)
        return None

    # -- requests ---------------------------------------------------------------------------

    @property
    def _base(self) -> str:
        return str(self.fs._location)

    def _object_url(self, bucket: str, key: str, *, media: bool = False) -> str:
        q = urllib.parse.quote
        url = f"{self._base}/storage/v1/b/{q(bucket, safe='')}/o/{q(key, safe='')}"
        return url + "?alt=media" if media else url

    def _sync(self, what: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` (a coroutine function) on gcsfs's loop under the retry policy."""
        return self.run(self.call(lambda: fn(*args), what))

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
        """One HTTP request; a status outside ``ok`` raises :class:`GCSStatusError`."""
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
            detail, reason = _error_detail(body)
            raise GCSStatusError(r.status, what, detail, reason)

    # -- writes -----------------------------------------------------------------------------

    def write_object(self, path: str, chunks: Iterable[Buffer], size: int) -> None:
        bucket, key = self.split(path)
        what = self.to_uri(path)
        if size <= self.simple_upload_max:
            data = b"".join(buffers.byte_view(c) for c in chunks)
            self._check_size(what, len(data), size)
            self._sync(what, self._simple_upload, bucket, key, data, None)
            return
        session = self._sync(what, self._start_resumable, bucket, key, what)
        try:
            offset = 0
            for views in buffers.iter_parts(chunks, self.part_size):
                n = buffers.total(views)
                if offset + n > size:
                    self._check_size(what, offset + n, size)
                self._send_part(session, what, views, offset, size)
                offset += n
            self._check_size(what, offset, size)
        except BaseException:
            self._cancel_session(session)
            raise

    @staticmethod
    def _check_size(what: str, got: int, size: int) -> None:
        if got != size:
            raise ValueError(f"{what}: the chunks hold {got} bytes but {size} were announced")

    def _send_part(
        self, session: str, what: str, views: list[memoryview], offset: int, size: int
    ) -> None:
        """Send ``views`` (bytes ``offset``.. of the object), resuming after a failure; the
        piece that reaches ``size`` finalizes the object."""
        end = offset + buffers.total(views)
        state: dict[str, Any] = {"sent": offset, "failed": ""}

        def attempt() -> None:
            # After a dropped connection the piece is first resent from the last offset the
            # store confirmed (GCS skips bytes it already holds). Only if the store refuses that
            # is the session queried for its offset: fake-gcs-server finalizes an upload on a
            # status query, so the query must stay the exception.
            if state["failed"] == "query":
                state["sent"] = max(
                    state["sent"], self.run(self._query_session(session, what, size))
                )
                if state["sent"] >= end:
                    return
            try:
                persisted = self.run(
                    self._put_range(
                        session, what, buffers.skip(views, state["sent"] - offset),
                        state["sent"], end, size,
                    )
                )  # fmt: skip
            except GCSStatusError as e:
                if self.classify(e) is None and state["failed"] == "lost":
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

        self.call_sync(attempt, what)

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
            self.run(self._request("DELETE", session, "upload session", ok=(200, 204, 499)))
        except Exception as e:  # the original error matters more
            logger.debug("cancelling a GCS upload session failed: %s", type(e).__name__)

    async def _simple_upload(
        self, bucket: str, key: str, data: bytes, if_generation: str | None
    ) -> None:
        """One multipart upload; ``if_generation``: only over that generation ("0": none)."""
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
        if if_generation is not None:
            params["ifGenerationMatch"] = if_generation
        await self._request(
            "POST",
            f"{self._base}/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o",
            self.to_uri(f"{bucket}/{key}"),
            params=params,
            headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
            data=body,
        )

    def put_create_only(self, path: str, data: bytes) -> None:
        bucket, key = self.split(path)
        what = self.to_uri(path)
        tried = {"n": 0}

        async def attempt() -> None:
            tried["n"] += 1
            try:
                await self._simple_upload(bucket, key, bytes(data), "0")
            except GCSStatusError as e:
                # A retry after a lost response finds our own object: that is success.
                if (
                    e.status == 412
                    and tried["n"] > 1
                    and await self._get_or_none(bucket, key) == data
                ):
                    return
                raise

        self.run(self.call(attempt, what))

    def read_version(self, path: str) -> VersionedObject | None:
        """The object and its generation (metadata, then the media at that generation)."""
        bucket, key = self.split(path)
        what = self.to_uri(path)

        async def get() -> VersionedObject | None:
            for _ in range(5):  # replaced between the two requests: read again
                meta = await self._stat(bucket, key, what)
                if meta is None:
                    return None
                generation = str(meta["generation"])
                try:
                    _, _, body = await self._request(
                        "GET",
                        self._object_url(bucket, key),
                        what,
                        params={"alt": "media", "ifGenerationMatch": generation},
                    )
                except GCSStatusError as e:
                    if e.status == 412:
                        continue
                    raise
                return VersionedObject(bytes(body), generation)
            raise GCSStatusError(409, what, "the object keeps changing while it is read")

        return self._sync(what, get)

    def put_replace(self, path: str, data: bytes, expected_version: str) -> None:
        """An upload with ``ifGenerationMatch=<expected_version>``: ``FileExistsError`` (412)
        when another writer replaced the object meanwhile."""
        bucket, key = self.split(path)
        what = self.to_uri(path)
        try:
            self._sync(
                what, self._simple_upload, bucket, key, bytes(data), expected_version or None
            )
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "object was replaced meanwhile", what) from None

    async def _get_or_none(self, bucket: str, key: str) -> bytes | None:
        try:
            return await self._get(bucket, key)
        except GCSStatusError as e:
            if e.status == 404:
                return None
            raise

    async def _get(self, bucket: str, key: str) -> bytes:
        url = self._object_url(bucket, key, media=True)
        return (await self._request("GET", url, self.to_uri(f"{bucket}/{key}")))[2]

    # -- reads ------------------------------------------------------------------------------

    async def open_range(
        self, bucket: str, key: str, first: int, last: int
    ) -> AsyncGenerator[bytes, None]:
        what = self.to_uri(f"{bucket}/{key}")
        await self.fs._set_session()
        async with self.fs.session.get(
            self._object_url(bucket, key, media=True),
            params=self.fs._get_params({}),
            headers=self.fs._get_headers({"Range": f"bytes={first}-{last}"}),
            timeout=self.fs.requests_timeout,
        ) as r:
            if r.status == 416:
                raise EOFError(f"{what}: object ends before byte {first}, {last + 1} needed")
            if r.status not in (200, 206):
                detail, reason = _error_detail(await r.read())
                raise GCSStatusError(r.status, what, detail, reason)
            skip = first if r.status == 200 else 0  # a server that ignored the Range header
            want = last + 1 - first
            got = 0
            while got < want:
                # The body as the socket delivered it (up to 256 KiB a chunk): no joining into
                # larger blocks, which copied every byte once more (the reader's destinations
                # are large shared storages or whole tensors, so few views per chunk).
                data, _ = await r.content.readchunk()
                if not data:
                    break
                if skip:
                    cut = min(skip, len(data))
                    data, skip = data[cut:], skip - cut
                data = data[: want - got]
                got += len(data)
                if data:
                    yield data
            if got < want:
                total = r.headers.get("Content-Range", "").rpartition("/")[2]
                if not (total.isdigit() and int(total) < last + 1):
                    raise GCSStatusError(503, what, "the response ended early (connection dropped)")

    def range_request(self, bucket: str, key: str) -> RangeRequest | None:
        """Media GETs as plain requests, with gcsfs's own headers (credentials, refreshed as
        gcsfs refreshes them) and parameters (``userProject``), except where gcsfs's session
        differs from a plain connection: a client certificate (mTLS) or ``session_kwargs``
        (a proxy, a custom connector)."""
        if self.fs._use_client_cert or self.fs.session_kwargs:
            return None
        url = self._object_url(bucket, key, media=True)
        params = self.fs._get_params({})
        if params:
            url += "&" + urllib.parse.urlencode(params)
        return RangeRequest(url, self.fs._get_headers({}))

    def status_error(self, status: int, body: bytes, what: str) -> Exception:
        detail, reason = _error_detail(body)
        return GCSStatusError(status, what, detail, reason)

    def read_bytes(self, path: str) -> bytes:
        bucket, key = self.split(path)
        return self._sync(self.to_uri(path), self._get, bucket, key)

    # -- metadata ---------------------------------------------------------------------------

    async def _stat(self, bucket: str, key: str, what: str) -> dict[str, Any] | None:
        try:
            _, _, body = await self._request("GET", self._object_url(bucket, key), what)
        except GCSStatusError as e:
            if e.status == 404:
                return None
            raise
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
            try:
                _, _, body = await self._request("GET", url, what, params=params)
            except GCSStatusError as e:
                if e.status == 404:  # listing a bucket's objects: only the bucket can be missing
                    raise GCSStatusError(404, what, e.detail, "NoSuchBucket") from None
                raise
            page = json.loads(body)
            items.extend(page.get("items", []))
            prefixes.extend(page.get("prefixes", []))
            token = page.get("nextPageToken")
            if not token or max_results == 1:  # one answer is enough for exists()
                return items, prefixes

    def check_location(self, path: str) -> None:
        bucket, _ = self.split(path)
        what = self.to_uri(path)
        self._sync(what, lambda: self._list(bucket, "", what, delimiter=True, max_results=1))

    def list_dir(self, path: str) -> list[ObjectInfo]:
        bucket, key = self.split(path)
        prefix = f"{key.rstrip('/')}/" if key else ""
        what = self.to_uri(path)
        items, prefixes = self._sync(what, lambda: self._list(bucket, prefix, what, delimiter=True))
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
        bucket, key = self.split(path)
        what = self.to_uri(path)
        keys = [key] if key else []
        if recursive:
            prefix = f"{key.rstrip('/')}/" if key else ""
            items, _ = self._sync(what, lambda: self._list(bucket, prefix, what, delimiter=False))
            keys += [str(it["name"]) for it in items]
        for k in keys:
            self._sync(what, self._delete_one, bucket, k, what)

    async def _delete_one(self, bucket: str, key: str, what: str) -> None:
        try:
            await self._request("DELETE", self._object_url(bucket, key), what)
        except GCSStatusError as e:
            if e.status != 404:
                raise

    def exists(self, path: str) -> bool:
        bucket, key = self.split(path)
        what = self.to_uri(path)

        async def check() -> bool:
            if key and await self._stat(bucket, key, what) is not None:
                return True
            items, prefixes = await self._list(
                bucket, f"{key}/" if key else "", what, delimiter=True, max_results=1
            )
            return bool(items or prefixes)

        return self._sync(what, check)

    def size(self, path: str) -> int:
        bucket, key = self.split(path)
        what = self.to_uri(path)
        info = self._sync(what, self._stat, bucket, key, what)
        if info is None:
            raise FileNotFoundError(errno.ENOENT, "no such object on GCS", what)
        return int(info["size"])

    def close(self) -> None:
        """Close the plain GETs' connections (gcsfs's session belongs to its shared instance)."""
        super().close()


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
