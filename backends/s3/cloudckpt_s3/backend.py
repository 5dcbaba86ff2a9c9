"""The S3 backend: s3fs for credentials, endpoints and its event loop; our own data path.

- ``write_object``: one ``PutObject`` for a small object; otherwise a multipart upload whose
  parts are filled from the writer's buffers on the calling thread and uploaded on s3fs's event
  loop, several at once (bounded across the whole backend, so memory stays at
  ``max_inflight_parts * part_size``). The part size grows with the object so no upload needs
  more than 10,000 parts. A failure aborts the upload: nothing half-written is ever completed.
- ``put_create_only``: ``PutObject`` with ``If-None-Match: *``. A 412 (moto: with a
  ``<Condition>``; SeaweedFS: without one, which s3fs turns into ``OSError(EINVAL)``) becomes
  ``FileExistsError``.
- ``read_into``: ranged ``GetObject`` pieces in parallel, each streamed into its slice of the
  caller's buffers. Sizes come from the caller (the index), never from extra HEADs.
- Retries: s3fs's and botocore's own retries are turned off; :mod:`cloudckpt.retry` retries
  500, 502, 503 SlowDown, 504, 429, resets and timeouts with jittered backoff until the operation
  makes no progress for ``retry_stall_timeout`` seconds. Other 4xx fail at once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, ClassVar

from cloudckpt.backends import Buffer, FsspecBackend
from cloudckpt.errors import BackendError
from cloudckpt.retry import (
    RETRY_OPTIONS,
    Deadline,
    Retrier,
    RetryCounter,
    RetryPolicy,
    classify_network_error,
    is_retryable_status,
)

logger = logging.getLogger(__name__)

MIN_PART = 5 << 20  # S3's smallest part (all but the last)
MAX_PARTS = 10_000
DEFAULT_PART = 8 << 20
OWN_OPTIONS = ("part_size", "max_inflight_parts", "read_part_size")


def _status(exc: BaseException) -> int | None:
    """The HTTP status behind an exception (s3fs translates botocore errors; look through)."""
    seen: BaseException | None = exc
    while seen is not None:
        resp = getattr(seen, "response", None)
        if isinstance(resp, dict):
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status:
                return int(status)
            code = resp.get("Error", {}).get("Code")
            if code and str(code).isdigit():
                return int(code)
        seen = seen.__cause__ or seen.__context__
    return None


def _error_code(exc: BaseException) -> str:
    seen: BaseException | None = exc
    while seen is not None:
        resp = getattr(seen, "response", None)
        if isinstance(resp, dict):
            return str(resp.get("Error", {}).get("Code", ""))
        seen = seen.__cause__ or seen.__context__
    return ""


def classify(exc: BaseException) -> str | None:
    """Why ``exc`` is worth a retry (``"503"``, ``"connection"``, ...), or ``None`` if fatal."""
    status = _status(exc)
    if status is not None:
        if is_retryable_status(status) or status == 409:  # 409: a conditional write in flight
            return str(status)
        return None
    code = _error_code(exc)
    if code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"):
        return code
    text = str(exc)
    if "SlowDown" in text or "reduce your request rate" in text:
        return "SlowDown"
    return classify_network_error(exc)


def _is_precondition_failed(exc: BaseException) -> bool:
    if _status(exc) == 412 or _error_code(exc) in ("PreconditionFailed", "412"):
        return True
    text = str(exc)
    return isinstance(exc, OSError) and (
        "PreconditionFailed" in text or "412" in text or "Precondition" in text
    )


def _slices(buffers: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """The parts of ``buffers`` (concatenated) covering ``[start, start + length)``."""
    out, pos, end = [], 0, start + length
    for b in buffers:
        b_end = pos + b.nbytes
        if b_end > start and pos < end:
            out.append(b[max(start, pos) - pos : min(end, b_end) - pos])
        pos = b_end
        if pos >= end:
            break
    return out


class S3Backend(FsspecBackend):
    """``s3://`` and ``s3a://`` on s3fs, with create-only commits and our own retry policy.

    Storage options are s3fs's (``endpoint_url``, ``profile``, ``client_kwargs``,
    ``config_kwargs``, ...), plus ``part_size``, ``max_inflight_parts``, ``read_part_size`` and
    the ``retry_*`` options of :meth:`cloudckpt.retry.RetryPolicy.from_options`.
    """

    name = "s3"
    protocols = ("s3", "s3a")
    create_only_commit = True
    accepted_options: ClassVar[frozenset[str] | None] = RETRY_OPTIONS | {
        "part_size",
        "read_part_size",
        "max_inflight_parts",
    }

    @classmethod
    def fsspec_class(cls, protocol: str) -> type | None:
        import s3fs

        return s3fs.S3FileSystem

    def __init__(self, storage_options: Mapping[str, Any] | None = None) -> None:
        import s3fs

        options = dict(storage_options or {})
        self.storage_options = dict(options)
        self.protocol = "s3"
        self.policy = RetryPolicy.from_options(options)
        self.part_size = int(options.pop("part_size", DEFAULT_PART))
        self.read_part_size = int(options.pop("read_part_size", DEFAULT_PART))
        self.max_inflight = int(options.pop("max_inflight_parts", 8))
        if self.part_size < MIN_PART:
            raise ValueError(f"part_size must be at least {MIN_PART} bytes (S3's minimum part)")
        config = dict(options.pop("config_kwargs", None) or {})
        # Our policy decides about retries; botocore's and s3fs's would multiply them.
        config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        config.setdefault("connect_timeout", self.policy.request_timeout)
        config.setdefault("read_timeout", self.policy.request_timeout)
        # Our own CRC32C covers every tensor; botocore's request checksums cost ~25% per PUT.
        config.setdefault("request_checksum_calculation", "when_required")
        config.setdefault("response_checksum_validation", "when_required")
        self.fs = s3fs.S3FileSystem(
            config_kwargs=config, skip_instance_cache=True, use_listings_cache=False, **options
        )
        self.fs.retries = 1
        self.counter = RetryCounter()
        self.retrier = Retrier(self.policy, classify, self.counter)
        self._inflight = threading.BoundedSemaphore(self.max_inflight)

    def retry_total(self) -> int:
        return self.counter.total

    def to_uri(self, path: str) -> str:
        return f"s3://{path.lstrip('/')}"

    def _split(self, path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    def _run(self, coro: Any) -> Any:
        """Run ``coro`` on s3fs's event loop from this (non-loop) thread."""
        from fsspec.asyn import sync

        return sync(self.fs.loop, lambda: coro)

    def _submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.fs.loop)

    async def _call(self, method: str, what: str, deadline: Deadline, **kwargs: Any) -> Any:
        return await self.retrier.acall(
            lambda: self.fs._call_s3(method, **kwargs), what=what, deadline=deadline
        )

    def _part_size_for(self, size: int) -> int:
        need = -(-size // MAX_PARTS)
        return max(self.part_size, -(-need // (1 << 20)) * (1 << 20))

    # -- writes -------------------------------------------------------------------------------

    def write_object(self, path: str, chunks: Iterable[Buffer], size: int) -> None:
        bucket, key = self._split(path)
        what = self.to_uri(path)
        deadline = self.retrier.deadline()
        part_size = self._part_size_for(size)
        if size <= part_size:
            body = bytearray(size)
            pos = 0
            for chunk in chunks:
                n = memoryview(chunk).nbytes
                body[pos : pos + n] = chunk
                pos += n
            if pos != size:
                raise ValueError(f"{what}: expected {size} bytes, the writer produced {pos}")
            self._run(self._call("put_object", what, deadline, Bucket=bucket, Key=key, Body=body))
            return
        upload = self._run(
            self._call("create_multipart_upload", what, deadline, Bucket=bucket, Key=key)
        )
        upload_id = upload["UploadId"]
        futures: list[Future[Any]] = []
        try:
            number = 0
            part = bytearray(part_size)
            fill = 0
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                while view.nbytes:
                    n = min(view.nbytes, part_size - fill)
                    part[fill : fill + n] = view[:n]
                    fill += n
                    view = view[n:]
                    if fill == part_size:
                        number += 1
                        futures.append(
                            self._send_part(bucket, key, upload_id, number, part, what, deadline)
                        )
                        part, fill = bytearray(part_size), 0
                self._raise_failed(futures)
            if fill:
                number += 1
                futures.append(
                    self._send_part(bucket, key, upload_id, number, part[:fill], what, deadline)
                )
            parts = [f.result() for f in futures]
            self._run(
                self._call(
                    "complete_multipart_upload",
                    what,
                    deadline,
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            )
        except BaseException:
            for f in futures:
                f.cancel()
            for f in futures:
                try:
                    f.exception()
                except BaseException:
                    pass
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
        body: bytearray,
        what: str,
        deadline: Deadline,
    ) -> Future[Any]:
        """Queue one part; blocks while ``max_inflight_parts`` are already on their way."""
        self._inflight.acquire()

        async def send() -> dict[str, Any]:
            try:
                resp = await self._call(
                    "upload_part",
                    f"{what} part {number}",
                    deadline,
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                )
                return {"PartNumber": number, "ETag": resp["ETag"]}
            finally:
                self._inflight.release()

        return self._submit(send())

    def _abort(self, bucket: str, key: str, upload_id: str, what: str) -> None:
        try:
            self._run(
                self._call(
                    "abort_multipart_upload",
                    f"{what} (abort)",
                    Deadline(min(30.0, self.policy.stall_timeout)),
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                )
            )
        except Exception as e:  # the bucket's abort lifecycle rule is the backstop
            logger.warning("%s: could not abort multipart upload %s: %s", what, upload_id, e)

    def put_create_only(self, path: str, data: bytes) -> None:
        bucket, key = self._split(path)
        what = self.to_uri(path)
        try:
            self._run(
                self._call(
                    "put_object",
                    what,
                    self.retrier.deadline(),
                    Bucket=bucket,
                    Key=key,
                    Body=data,
                    IfNoneMatch="*",
                )
            )
        except Exception as e:
            if _is_precondition_failed(e):
                raise FileExistsError(errno.EEXIST, "object exists", what) from None
            raise

    # -- reads --------------------------------------------------------------------------------

    def read_into(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        bucket, key = self._split(path)
        what = self.to_uri(path)
        total = sum(b.nbytes for b in buffers)
        if total == 0:
            return
        deadline = self.retrier.deadline()
        step = self.read_part_size
        pieces = [(s, min(step, total - s)) for s in range(0, total, step)]

        async def fetch(start: int, length: int, sem: asyncio.Semaphore) -> None:
            views = _slices(buffers, start, length)
            first, last = offset + start, offset + start + length - 1

            async def attempt() -> None:
                resp = await self.fs._call_s3(
                    "get_object", Bucket=bucket, Key=key, Range=f"bytes={first}-{last}"
                )
                body = resp["Body"]
                got = 0
                try:
                    for v in views:
                        filled = 0
                        while filled < v.nbytes:
                            data = await body.read(min(v.nbytes - filled, 1 << 20))
                            if not data:
                                raise EOFError(
                                    f"{what}: object ends at byte {first + got}, "
                                    f"{length - got} more expected"
                                )
                            v[filled : filled + len(data)] = data
                            filled += len(data)
                            got += len(data)
                finally:
                    body.close()

            async with sem:
                await self.retrier.acall(attempt, what=what, deadline=deadline)

        async def fetch_all() -> None:
            sem = asyncio.Semaphore(self.max_inflight)
            await asyncio.gather(*(fetch(s, n, sem) for s, n in pieces))

        try:
            self._run(fetch_all())
        except Exception as e:
            status = _status(e)
            if status == 404 or isinstance(e, FileNotFoundError):
                raise FileNotFoundError(errno.ENOENT, "no such object", what) from None
            if status == 416:
                raise EOFError(f"{what}: range from byte {offset} is past the end") from None
            raise

    def read_bytes(self, path: str) -> bytes:
        bucket, key = self._split(path)
        what = self.to_uri(path)

        async def get() -> bytes:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return bytes(await resp["Body"].read())
            finally:
                resp["Body"].close()

        try:
            return bytes(self._run(self.retrier.acall(get, what=what)))
        except Exception as e:
            if _status(e) == 404 or isinstance(e, FileNotFoundError):
                raise FileNotFoundError(errno.ENOENT, "no such object", what) from None
            raise

    # -- metadata (s3fs calls under our retry policy) -----------------------------------------

    def list_dir(self, path: str) -> list[Any]:
        return self.retrier.call(
            lambda: super(S3Backend, self).list_dir(path), what=self.to_uri(path)
        )

    def delete(self, path: str, *, recursive: bool = False) -> None:
        self.retrier.call(
            lambda: super(S3Backend, self).delete(path, recursive=recursive),
            what=self.to_uri(path),
        )
        if recursive:
            self._remove_dir_markers(path)

    def _remove_dir_markers(self, path: str) -> None:
        """Stores with real directories (SeaweedFS) keep empty ``dir/`` entries listed after
        their objects are gone: remove them, deepest first."""
        for info in super().list_dir(path):
            if info.is_dir:
                self._remove_dir_markers(info.path)
        bucket, key = self._split(path)
        if key:
            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key.rstrip("/") + "/")
            except OSError:
                pass

    def exists(self, path: str) -> bool:
        return bool(self.retrier.call(lambda: self.fs.exists(path), what=self.to_uri(path)))

    def check_location(self, path: str) -> None:
        bucket, _ = self._split(path)

        def head() -> None:
            self._run(self.fs._call_s3("head_bucket", Bucket=bucket))

        try:
            self.retrier.call(head, what=self.to_uri(bucket))
        except FileNotFoundError:
            raise BackendError(
                f"{self.to_uri(path)}: the bucket {bucket!r} does not exist (or these "
                "credentials cannot see it); check the URI, or create the bucket first"
            ) from None

    def size(self, path: str) -> int:
        return int(self.retrier.call(lambda: self.fs.size(path), what=self.to_uri(path)))
