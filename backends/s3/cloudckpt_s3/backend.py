"""The S3 backend: s3fs for credentials, endpoint and its event loop; the requests are our own.

Clients are made on first use. Listings, GETs, HEADs, single-object PUTs and deletes made
before anything needed s3fs go through :mod:`cloudckpt_s3.lite` (``http.client`` with
botocore's credentials and signer) where the options allow it, so a process that only looks
(``cloudckpt latest``) never imports s3fs, aiobotocore or aiohttp, and a small save never makes
their client; the first request that needs s3fs (a multipart upload, a ranged read, a listing
of uploads) makes its client, and from then on every request goes through it.

On :class:`cloudckpt.storage.objectstore.ObjectStoreBackend`, which owns options, retries, error
mapping and parallel ranged reads. What is S3's own:

- ``write_object``: one ``PutObject`` for an object up to ``multipart_threshold`` (64 MiB: a
  completed multipart upload costs the store a reassembly, and a small save's objects are
  written several at once anyway); otherwise a multipart upload. Parts are
  views of the writer's chunks (tensor memory), cut so that a large tensor goes as whole parts of
  its own with nothing copied; only parts that gather small chunks are joined. Parts go out on
  s3fs's event loop, at most ``max_inflight_parts`` across the backend. A failure aborts the
  upload: nothing half-written is ever completed.
- ``put_create_only``: ``PutObject`` with ``If-None-Match: *``; the store's 412 becomes
  ``FileExistsError`` (by status, on moto and SeaweedFS alike).
- ``read_version`` / ``put_replace``: the object with its ETag, and ``PutObject`` with
  ``If-Match: <that ETag>``; a 412 (replaced meanwhile) is ``FileExistsError``. A store that
  answers ``If-Match`` with 501 gets a plain ``PutObject`` from then on, with one warning.
- Multipart hygiene: a ``CreateMultipartUpload`` that needed a retry may have created an upload
  whose answer was lost; once the object is done (or failed), every other upload open on its key
  is aborted. ``abort_uploads(prefix)`` aborts every upload open under a prefix.
- Retries: botocore's and s3fs's are off; the base's policy retries 500, 502, 503 SlowDown, 504,
  429, resets and timeouts. Other 4xx fail at once; an endpoint nobody answers at fails at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import threading
from collections.abc import AsyncGenerator, Iterable
from concurrent.futures import Future
from typing import Any

from cloudckpt.errors import BackendError
from cloudckpt.storage import buffers
from cloudckpt.storage.buffers import Buffer
from cloudckpt.storage.interface import Capabilities, ObjectInfo, VersionedObject
from cloudckpt.storage.objectstore import ObjectStoreBackend, OptionSpec, StoreAnswer
from cloudckpt.storage.retry import Deadline

from . import lite

logger = logging.getLogger(__name__)

#: s3fs's own options (``S3FileSystem``'s parameters), declared so that checking them does not
#: import s3fs; any other option is checked against s3fs itself.
S3FS_OPTIONS = (
    "anon", "endpoint_url", "key", "secret", "token", "use_ssl", "client_kwargs",
    "requester_pays", "default_block_size", "default_fill_cache", "default_cache_type",
    "version_aware", "config_kwargs", "s3_additional_kwargs", "session", "username",
    "password", "cache_regions", "asynchronous", "loop", "max_concurrency",
    "fixed_upload_size", "local_expiry_check",
    "profile",  # not in s3fs's signature: it hands extra options to aiobotocore's session
)  # fmt: skip
_UNSET: Any = object()

_CONDITION_HEADERS = {"IfNoneMatch": "If-None-Match", "IfMatch": "If-Match"}
MIN_PART = 5 << 20  # S3's smallest part (all but the last)
MAX_PARTS = 10_000
DEFAULT_PART = 8 << 20
DEFAULT_MULTIPART_THRESHOLD = 64 << 20
NO_RETRIES = {"total_max_attempts": 1, "mode": "standard"}


class S3Backend(ObjectStoreBackend):
    """``s3://`` and ``s3a://`` on s3fs, with create-only commits and cloudckpt's retry policy.

    Storage options are s3fs's (``endpoint_url``, ``profile``, ``client_kwargs``,
    ``config_kwargs``, ...), plus ``part_size``, ``multipart_threshold``,
    ``max_inflight_parts``, ``read_part_size`` and the ``retry_*`` options of
    :meth:`cloudckpt.storage.retry.RetryPolicy.from_options`.
    """

    name = "s3"
    protocols = ("s3", "s3a")
    scheme = "s3"
    capabilities = Capabilities(create_only_commit=True, conditional_replace=True)
    option_specs = (
        OptionSpec("part_size", "size", DEFAULT_PART, "S3's smallest part is 5 MiB", MIN_PART),
        OptionSpec("read_part_size", "size", DEFAULT_PART, "bytes per ranged GET"),
        OptionSpec("max_inflight_parts", "int", 8, "requests in flight"),
        OptionSpec(
            "multipart_threshold",
            "size",
            DEFAULT_MULTIPART_THRESHOLD,
            "objects up to this size go in one PutObject",
        ),
    )
    client_options = S3FS_OPTIONS
    multipart_threshold: int
    retryable_codes = frozenset(
        {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
         "ConditionalRequestConflict", "OperationAborted"}
    )  # fmt: skip

    @classmethod
    def fsspec_class(cls, protocol: str) -> type | None:
        import s3fs

        return s3fs.S3FileSystem

    def open_client(self, options: dict[str, Any]) -> None:
        config = dict(options.pop("config_kwargs", None) or {})
        # Our policy decides about retries; botocore's and s3fs's would multiply them.
        # ("max_attempts" counts retries, not attempts: 1 would mean one botocore retry.)
        if config.get("retries", NO_RETRIES) != NO_RETRIES:
            logger.warning(
                "s3: config_kwargs 'retries' is ignored; cloudckpt retries itself (storage "
                "options retry_stall_timeout, retry_request_timeout, ...)"
            )
        config["retries"] = dict(NO_RETRIES)
        config.setdefault("connect_timeout", self.policy.request_timeout)
        config.setdefault("read_timeout", self.policy.request_timeout)
        # Our own CRC32C covers every tensor; botocore's request checksums cost ~25% per PUT.
        config.setdefault("request_checksum_calculation", "when_required")
        config.setdefault("response_checksum_validation", "when_required")
        # Parts are memoryviews of tensor memory, which botocore's validator does not know.
        config.setdefault("parameter_validation", False)
        self._fs_options = {**options, "config_kwargs": config}
        self._fs: Any = None
        self._plain: lite.PlainClient | None = _UNSET  # made with the first request
        self._clients = threading.Lock()
        self._inflight = threading.BoundedSemaphore(self.max_inflight_parts)
        self._if_match = True  # until the store answers If-Match with 501

    @property
    def fs(self) -> Any:
        """The s3fs filesystem (made on first use; the plain client is closed then)."""
        if self._fs is None:
            import s3fs

            with self._clients:
                if self._fs is None:
                    fs = s3fs.S3FileSystem(
                        skip_instance_cache=True, use_listings_cache=False, **self._fs_options
                    )
                    fs.retries = 1
                    self._fs = fs
                    plain, self._plain = self._plain, None
                    if plain is not None and plain is not _UNSET:
                        plain.close()
        return self._fs

    def _plain_client(self) -> lite.PlainClient | None:
        """The plain client for a request it makes, or ``None`` once s3fs is in use (or where
        the options need s3fs: see :func:`cloudckpt_s3.lite.plan`)."""
        if self._plain is _UNSET:
            with self._clients:
                if self._plain is _UNSET:
                    made = None  # other threads see _UNSET until it is made, and wait
                    if self._fs is None and (settings := lite.plan(self._fs_options)):
                        try:
                            made = lite.PlainClient(settings)
                        except Exception as e:  # s3fs's client reports it in its own words
                            logger.debug("s3: plain client unavailable: %s", e)
                    self._plain = made
        return self._plain

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.fs.loop

    def answer_of(self, exc: BaseException) -> StoreAnswer | None:
        seen: BaseException | None = exc
        while seen is not None:
            resp = getattr(seen, "response", None)
            if isinstance(resp, dict):
                err = resp.get("Error", {})
                status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
                code = str(err.get("Code", ""))
                if not status and code.isdigit():
                    status = int(code)
                return StoreAnswer(
                    int(status) if status else None, code, str(err.get("Message", ""))
                )
            seen = seen.__cause__ or seen.__context__
        return None

    def classify(self, exc: BaseException) -> str | None:
        answer = self.answer_of(exc)
        if answer is not None and answer.status == 409:  # a conditional write in flight
            return "409"
        return super().classify(exc)

    async def _client(self) -> Any:
        return await self.fs.set_session()

    async def _req(self, method: str, **kwargs: Any) -> Any:
        client = await self._client()
        return await getattr(client, method)(**kwargs)

    def _do(self, method: str, what: str, deadline: Deadline | None = None, /, **kw: Any) -> Any:
        return self.run(self.call(lambda: self._req(method, **kw), what, deadline))

    def _part_size_for(self, size: int) -> int:
        # Parts may come out as small as half this (see buffers.iter_parts): keep 2x headroom.
        need = -(-size // (MAX_PARTS // 2))
        return max(self.part_size, -(-need // (1 << 20)) * (1 << 20))

    # -- writes -------------------------------------------------------------------------------

    def write_object(self, path: str, chunks: Iterable[Buffer], size: int) -> None:
        bucket, key = self.split(path)
        what = self.to_uri(path)
        deadline = self.retrier.deadline()
        part_size = self._part_size_for(size)
        if size <= max(part_size, self.multipart_threshold):
            views = [buffers.byte_view(c) for c in chunks]
            got = buffers.total(views)
            if got != size:
                raise ValueError(f"{what}: expected {size} bytes, the writer produced {got}")
            self._put(bucket, key, views, what, deadline)
            return
        tries = [0]

        async def create() -> Any:
            tries[0] += 1
            return await self._req("create_multipart_upload", Bucket=bucket, Key=key)

        upload = self.run(self.call(create, what, deadline))
        upload_id = upload["UploadId"]
        try:
            self._upload_parts(bucket, key, upload_id, chunks, size, part_size, what, deadline)
        finally:
            if tries[0] > 1:  # an earlier try may have created an upload whose answer was lost
                self._abort_others(bucket, key, upload_id, what)

    def _put(
        self,
        bucket: str,
        key: str,
        body: list[memoryview],
        what: str,
        deadline: Deadline | None = None,
        **cond: str,
    ) -> None:
        """One ``PutObject`` of ``body`` (views, not joined); ``cond``: ``IfNoneMatch`` or
        ``IfMatch``, as botocore names them."""
        plain = self._plain_client()
        if plain is not None:
            headers = {_CONDITION_HEADERS[k]: v for k, v in cond.items()}
            self.call_sync(lambda: plain.put(bucket, key, body, headers), what, deadline)
            return
        from .parts import PartBody

        self._do("put_object", what, deadline, Bucket=bucket, Key=key, Body=PartBody(body), **cond)

    def _upload_parts(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        chunks: Iterable[Buffer],
        size: int,
        part_size: int,
        what: str,
        deadline: Deadline,
    ) -> None:
        futures: list[Future[Any]] = []
        try:
            sent = 0
            min_part = max(MIN_PART, part_size // 2)
            for number, views in enumerate(
                buffers.iter_parts(chunks, part_size, min_part=min_part), 1
            ):
                sent += buffers.total(views)
                futures.append(
                    self._send_part(bucket, key, upload_id, number, views, what, deadline)
                )
                self._raise_failed(futures)
            if sent != size:
                raise ValueError(f"{what}: expected {size} bytes, the writer produced {sent}")
            parts = [f.result() for f in futures]
            self._do(
                "complete_multipart_upload",
                what,
                deadline,
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            for f in futures:
                f.cancel()
            for f in futures:
                with contextlib.suppress(BaseException):
                    f.exception()
            self._abort(bucket, key, upload_id, what)
            raise

    @staticmethod
    def _raise_failed(futures: list[Future[Any]]) -> None:
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                f.result()

    def _send_part(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        number: int,
        body: list[memoryview],
        what: str,
        deadline: Deadline,
    ) -> Future[Any]:
        """Queue one part; blocks while ``max_inflight_parts`` are already on their way."""
        from .parts import PartBody

        self._inflight.acquire()

        async def send() -> dict[str, Any]:
            try:
                resp = await self.call(
                    lambda: self._req(
                        "upload_part",
                        Bucket=bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=PartBody(body),
                    ),
                    f"{what} part {number}",
                    deadline,
                )
                return {"PartNumber": number, "ETag": resp["ETag"]}
            finally:
                self._inflight.release()

        return asyncio.run_coroutine_threadsafe(send(), self.loop)

    def _abort(self, bucket: str, key: str, upload_id: str, what: str) -> None:
        try:
            self._do(
                "abort_multipart_upload",
                f"{what} (abort)",
                Deadline(min(30.0, self.policy.stall_timeout)),
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
            )
        except Exception as e:  # the bucket's abort lifecycle rule is the backstop
            logger.warning("%s: could not abort multipart upload %s: %s", what, upload_id, e)

    def _list_uploads(self, bucket: str, prefix: str, what: str) -> list[tuple[str, str]]:
        """``(key, upload id)`` of every multipart upload open under ``prefix``."""
        out: list[tuple[str, str]] = []
        markers: dict[str, str] = {}
        while True:
            page = self._do(
                "list_multipart_uploads", f"{what} (uploads)", Bucket=bucket, Prefix=prefix,
                **markers,
            )  # fmt: skip
            out += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return out
            markers = {
                "KeyMarker": page["NextKeyMarker"],
                "UploadIdMarker": page["NextUploadIdMarker"],
            }

    def _abort_others(self, bucket: str, key: str, keep: str, what: str) -> None:
        try:
            found = self._list_uploads(bucket, key, what)
        except Exception as e:
            logger.warning("%s: could not list multipart uploads: %s", what, e)
            return
        for k, upload_id in found:
            if k == key and upload_id != keep:
                logger.info("%s: aborting upload %s (its create answer was lost)", what, upload_id)
                self._abort(bucket, k, upload_id, what)

    def abort_uploads(self, path: str) -> int:
        bucket, key = self.split(path)
        found = self._list_uploads(bucket, key.rstrip("/") + "/", self.to_uri(path))
        for k, upload_id in found:
            self._abort(bucket, k, upload_id, self.to_uri(f"{bucket}/{k}"))
        return len(found)

    def read_version(self, path: str) -> VersionedObject | None:
        """The object and its ETag (one ``GetObject``)."""
        bucket, key = self.split(path)
        plain = self._plain_client()
        if plain is not None:
            try:
                body, etag = self.call_sync(
                    lambda: plain.get_versioned(bucket, key), self.to_uri(path)
                )
            except FileNotFoundError:
                return None
            return VersionedObject(body, etag)

        async def get() -> VersionedObject:
            resp = await self._req("get_object", Bucket=bucket, Key=key)
            try:
                return VersionedObject(bytes(await resp["Body"].read()), str(resp.get("ETag", "")))
            finally:
                resp["Body"].close()

        try:
            return self.run(self.call(get, self.to_uri(path)))
        except FileNotFoundError:
            return None

    def put_replace(self, path: str, data: bytes, expected_version: str) -> None:
        bucket, key = self.split(path)
        what = self.to_uri(path)
        cond = {"IfMatch": expected_version} if expected_version and self._if_match else {}
        try:
            self._put(bucket, key, [memoryview(data)], what, None, **cond)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "object was replaced meanwhile", what) from None
        except BackendError as e:
            answer = self.answer_of(e.__cause__) if e.__cause__ is not None else None
            if not cond or answer is None or answer.status != 501:
                raise
            self._if_match = False
            logger.warning(
                "%s: this S3 store does not implement If-Match on PUT; the manifest is replaced "
                "by a plain PUT (atomic for readers, not against a concurrent overwrite)",
                what,
            )
            self.put_replace(path, data, expected_version)

    def put_create_only(self, path: str, data: bytes) -> None:
        bucket, key = self.split(path)
        self._put(bucket, key, [memoryview(data)], self.to_uri(path), IfNoneMatch="*")

    # -- reads --------------------------------------------------------------------------------

    async def open_range(
        self, bucket: str, key: str, first: int, last: int
    ) -> AsyncGenerator[bytes, None]:
        resp = await self._req("get_object", Bucket=bucket, Key=key, Range=f"bytes={first}-{last}")
        body = resp["Body"]
        try:
            while data := await body.read(1 << 20):
                yield data
        finally:
            body.close()

    def read_bytes(self, path: str) -> bytes:
        bucket, key = self.split(path)
        plain = self._plain_client()
        if plain is not None:
            return self.call_sync(lambda: plain.get(bucket, key), self.to_uri(path))

        async def get() -> bytes:
            resp = await self._req("get_object", Bucket=bucket, Key=key)
            try:
                return bytes(await resp["Body"].read())
            finally:
                resp["Body"].close()

        return self.run(self.call(get, self.to_uri(path)))

    # -- metadata -----------------------------------------------------------------------------

    async def _list(self, bucket: str, prefix: str, *, delimiter: bool, limit: int = 0) -> Any:
        """``(objects, prefixes)`` under ``prefix``: every page, or the first ``limit`` keys."""
        objects: list[dict[str, Any]] = []
        prefixes: list[str] = []
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if delimiter:
            kw["Delimiter"] = "/"
        if limit:
            kw["MaxKeys"] = limit
        while True:
            page = await self._req("list_objects_v2", **kw)
            objects += page.get("Contents", [])
            prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
            token = page.get("NextContinuationToken")
            if limit or not page.get("IsTruncated") or not token:
                return objects, prefixes
            kw["ContinuationToken"] = token

    def _prefix(self, key: str) -> str:
        return f"{key.rstrip('/')}/" if key else ""

    def list_dir(self, path: str) -> list[ObjectInfo]:
        bucket, key = self.split(path)
        prefix = self._prefix(key)
        what = self.to_uri(path)
        listing = self._listing(bucket, prefix, True, what)
        found, prefixes = listing.objects, listing.prefixes
        out = [
            ObjectInfo(f"{bucket}/{p.rstrip('/')}", p.rstrip("/").rsplit("/", 1)[-1], 0, True)
            for p in prefixes
        ]
        for o in found:
            if o.key == prefix or o.key.endswith("/"):  # directory markers
                continue
            name = o.key.rsplit("/", 1)[-1]
            out.append(ObjectInfo(f"{bucket}/{o.key}", name, o.size, False, o.mtime))
        return sorted(out, key=lambda i: i.name)

    def delete(self, path: str, *, recursive: bool = False) -> None:
        bucket, key = self.split(path)
        what = self.to_uri(path)
        keys = [key] if key else []
        plain = self._plain_client()
        if recursive:
            keys += [o.key for o in self._listing(bucket, self._prefix(key), False, what).objects]
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            if plain is not None:
                self.call_sync(functools.partial(plain.delete_many, bucket, batch), what)
                continue
            objects = {"Objects": [{"Key": k} for k in batch], "Quiet": True}
            self._do("delete_objects", what, Bucket=bucket, Delete=objects)
        if recursive and key:
            self._remove_dir_markers(bucket, key, what)

    def _listing(self, bucket: str, prefix: str, delimiter: bool, what: str) -> lite.Listing:
        """Every page of a listing under ``prefix``, by the plain client or s3fs."""
        plain = self._plain_client()
        if plain is not None:
            return self.call_sync(lambda: plain.list(bucket, prefix, delimiter=delimiter), what)
        objects, prefixes = self.run(
            self.call(lambda: self._list(bucket, prefix, delimiter=delimiter), what)
        )
        found = []
        for o in objects:
            mtime = o.get("LastModified")
            when = mtime.timestamp() if hasattr(mtime, "timestamp") else None
            found.append(lite.ListedObject(str(o["Key"]), int(o.get("Size", 0)), when))
        return lite.Listing(found, prefixes)

    def _remove_dir_markers(self, bucket: str, key: str, what: str) -> None:
        """Stores with real directories (SeaweedFS) keep empty ``dir/`` entries listed after
        their objects are gone: remove them, deepest first."""
        for p in self._listing(bucket, self._prefix(key), True, what).prefixes:
            self._remove_dir_markers(bucket, p.rstrip("/"), what)
        marker = self._prefix(key)
        plain = self._plain_client()
        with contextlib.suppress(OSError):
            if plain is not None:
                self.call_sync(lambda: plain.delete(bucket, marker), what)
            else:
                self._do("delete_object", what, Bucket=bucket, Key=marker)

    def exists(self, path: str) -> bool:
        bucket, key = self.split(path)
        plain = self._plain_client()
        if plain is not None:
            return self.call_sync(lambda: self._plain_exists(plain, bucket, key), self.to_uri(path))

        async def check() -> bool:
            if key:
                try:
                    await self._req("head_object", Bucket=bucket, Key=key)
                    return True
                except Exception as e:
                    answer = self.answer_of(e)
                    if answer is None or answer.status != 404:
                        raise
            objects, prefixes = await self._list(bucket, self._prefix(key), delimiter=True, limit=1)
            return bool(objects or prefixes)

        return self.run(self.call(check, self.to_uri(path)))

    def _plain_exists(self, plain: lite.PlainClient, bucket: str, key: str) -> bool:
        if key:
            try:
                plain.head(bucket, key)
                return True
            except lite.PlainHTTPError as e:
                answer = self.answer_of(e)
                if answer is None or answer.status != 404:
                    raise
        listing = plain.list(bucket, self._prefix(key), delimiter=True, limit=1)
        return bool(listing.objects or listing.prefixes)

    def check_location(self, path: str) -> None:
        bucket, _ = self.split(path)
        what = self.to_uri(path)
        plain = self._plain_client()
        try:
            if plain is not None:
                self.call_sync(lambda: plain.head(bucket), what)
            else:
                self._do("head_bucket", what, Bucket=bucket)
        except FileNotFoundError:  # HEAD has no body: a bare 404 is the bucket
            raise self.missing_bucket(what, bucket, "HTTP 404 on HeadBucket") from None

    def size(self, path: str) -> int:
        bucket, key = self.split(path)
        head = self._do("head_object", self.to_uri(path), Bucket=bucket, Key=key)
        return int(head["ContentLength"])

    def close(self) -> None:
        """Close the clients' connections (the backend is unusable afterwards)."""
        with self._clients:
            plain, self._plain = self._plain, None
        if plain is not None and plain is not _UNSET:
            plain.close()
        fs = self._fs
        creator = getattr(fs, "_s3creator", None)
        if creator is not None:
            fs._s3 = None
            fs._s3creator = None
            with contextlib.suppress(Exception):
                self.run(creator.__aexit__(None, None, None))
