"""The backends the core ships, both over filesystems:

- ``local`` (:class:`LocalBackend`): plain paths and ``file://``, written to a temporary name,
  fsynced, then linked or renamed into place; data files of 64 MiB and more are written, and
  large uncached ranges read, with ``O_DIRECT`` through a pool of page-aligned buffers;
- ``fsspec`` (:class:`FsspecBackend`): any protocol fsspec knows (``memory://`` included);
  commits are create-only only as far as the store allows.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import logging
import mmap
import os
import shutil
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import BackendError, ConfigError
from ..units import parse_size
from . import buffers
from .buffers import Buffer
from .interface import Backend, Capabilities, ObjectInfo, VersionedObject
from .messages import plugin_install_hint

logger = logging.getLogger(__name__)

__all__ = ["FsspecBackend", "LocalBackend"]

_IOV_MAX = 1024


def _write_all(fd: int, views: list[memoryview]) -> None:
    """Write ``views`` to ``fd`` with as few ``writev`` calls as the kernel allows."""
    while views:
        batch = views[:_IOV_MAX]
        written = os.writev(fd, batch)
        views = buffers.skip(batch, written) + views[len(batch) :]


_O_DIRECT: int = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none (macOS)
DIRECT_ALIGN = 4096  # offsets, lengths and buffer addresses of O_DIRECT writes
DIRECT_BLOCK = 4 << 20  # one aligned staging buffer
DIRECT_DEPTH = 8  # staging buffers in flight per object, at most
DIRECT_POOL = 16  # staging buffers of one backend in all (64 MiB), shared by its objects
DIRECT_AUTO_MIN = 64 << 20  # "auto": objects from this size on go through O_DIRECT ...
DIRECT_AUTO_MEAN = 64 << 10  # ... when their pieces average this size or more,
DIRECT_AUTO_PEEK = 64  # judged on this many first pieces (or fewer, once they hold 4 MiB)
DIRECT_THREADS = 16  # the backend's writer threads, shared by the objects it writes at once
READ_PIECE = 8 << 20  # buffered reads larger than this go as pieces of this size, in parallel
READ_THREADS = 16  # the backend's reader threads, shared by the reads in flight
DIRECT_READ_MIN = 8 << 20  # "auto": ranges from this size on are read with O_DIRECT ...
DIRECT_READ_CACHED = 0.5  # ... unless this fraction of their pages is in the page cache
DIRECT_READ_SPAN = 64 << 10  # the least aligned interior of a view read straight into it


def parse_direct_io(value: Any) -> bool | None:
    """The ``direct_io`` storage option: ``True``, ``False`` or ``None`` for ``"auto"``."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(
        f"storage option direct_io = {value!r} is not valid for the local backend: use "
        '"auto" (the default: O_DIRECT for large objects where the filesystem accepts it), '
        "true or false"
    )


def parse_direct_io_min(value: Any) -> int:
    """The ``direct_io_min`` storage option: the smallest object ``"auto"`` writes with
    ``O_DIRECT``, in bytes (an int or a size such as ``"16MiB"``)."""
    try:
        return parse_size(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"storage option direct_io_min = {value!r} is not valid for the local backend: "
            f"{e}. It is the smallest data file written with O_DIRECT when direct_io is "
            '"auto" (default "64MiB")'
        ) from None


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """Write all of ``view`` at ``offset`` (``pwrite`` may write less than asked)."""
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # pragma: no cover - the kernel raises ENOSPC/EIO instead
            raise OSError(f"pwrite wrote {n} bytes")
        view, offset = view[n:], offset + n


def _pread_all(fd: int, path: str, offset: int, views: list[memoryview]) -> None:
    """Fill ``views`` from ``fd`` at ``offset`` (``preadv`` may read less than asked);
    ``EOFError`` where the file ends first."""
    while views:
        batch = views[:_IOV_MAX]
        got = os.preadv(fd, batch, offset)
        if got == 0:
            want = buffers.total(views)
            raise EOFError(f"{path}: object ends at byte {offset}, {want} more expected")
        offset += got
        views = buffers.skip(batch, got) + views[len(batch) :]


_libc_fallocate: Any = None


def _fallocate(fd: int, length: int) -> int:
    """Reserve ``length`` bytes for ``fd`` (``fallocate(2)``, no emulation); returns the size
    reserved, 0 where the filesystem cannot. A full disk raises ``ENOSPC`` here, early."""
    global _libc_fallocate
    if length <= 0 or not sys.platform.startswith("linux"):
        return 0
    if _libc_fallocate is None:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        fn.restype = ctypes.c_int
        _libc_fallocate = fn
    if _libc_fallocate(fd, 0, 0, length) == 0:
        return length
    err = ctypes.get_errno()
    if err in (errno.ENOSPC, errno.EDQUOT):
        raise OSError(err, os.strerror(err))
    return 0  # EOPNOTSUPP and the like: write without reserving


_SYS_CACHESTAT = 451  # the same number on every Linux architecture (added after the unified table)
_libc_syscall: Any = None
_no_cachestat = False


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


def _cached_fraction(fd: int, offset: int, length: int) -> float | None:
    """The fraction of the pages of ``[offset, offset + length)`` that are in the page cache
    (``cachestat(2)``, Linux 6.5+; it starts no IO); ``None`` where the kernel cannot say."""
    global _libc_syscall, _no_cachestat
    if _no_cachestat or length <= 0 or not sys.platform.startswith("linux"):
        return None
    if _libc_syscall is None:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syscall
        fn.restype = ctypes.c_long
        _libc_syscall = fn
    rng, out = _CachestatRange(offset, length), _Cachestat()
    args = (ctypes.c_long(_SYS_CACHESTAT), ctypes.c_long(fd))
    if _libc_syscall(*args, ctypes.byref(rng), ctypes.byref(out), ctypes.c_long(0)) != 0:
        if ctypes.get_errno() == errno.ENOSYS:
            _no_cachestat = True
        return None
    first, last = offset // mmap.PAGESIZE, (offset + length - 1) // mmap.PAGESIZE
    return min(1.0, out.nr_cache / (last - first + 1))


def _mostly_large(chunks: Iterable[Buffer]) -> tuple[Iterator[Buffer], bool]:
    """Whether ``chunks`` look like pieces of ``DIRECT_AUTO_MEAN`` bytes or more on average,
    judged on the first ``DIRECT_AUTO_PEEK`` (fewer once those hold ``DIRECT_AUTO_MEAN *
    DIRECT_AUTO_PEEK`` bytes, so at most ~4 MiB of pieces is taken ahead); and the chunks to
    write, the ones looked at first."""
    rest = iter(chunks)
    seen: list[Buffer] = []
    total = 0
    for chunk in rest:
        seen.append(chunk)
        total += memoryview(chunk).nbytes
        if len(seen) >= DIRECT_AUTO_PEEK or total >= DIRECT_AUTO_MEAN * DIRECT_AUTO_PEEK:
            break
    return itertools.chain(seen, rest), total >= DIRECT_AUTO_MEAN * max(1, len(seen))


def _address(view: memoryview) -> int | None:
    """The address of a large writable buffer (for ``memmove``); ``None`` for small or
    read-only ones, which are copied by slice assignment."""
    if view.nbytes < (64 << 10) or view.readonly:
        return None
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


@dataclass
class _Staging:
    """One page-aligned staging buffer: the map, a view of it and its address."""

    map: mmap.mmap
    view: memoryview
    address: int


def _copy_out(buf: _Staging, pos: int, views: list[memoryview], n: int) -> None:
    """Copy ``n`` bytes of ``buf`` from ``pos`` on into ``views``, in order."""
    for view in views:
        if n <= 0:
            break
        k = min(view.nbytes, n)
        dst = _address(view)
        if dst is not None:  # memmove lets the other threads run meanwhile
            ctypes.memmove(dst, buf.address + pos, k)
        else:
            view[:k] = buf.view[pos : pos + k]
        pos, n = pos + k, n - k


class _StagingPool:
    """At most ``limit`` staging buffers shared by the objects a backend writes at once, all
    unmapped when the last of those objects is done (an idle backend holds no memory).

    An object that holds a buffer never waits for the pool (it reuses its own), so one waiting
    here always gets one from an object that finishes: no deadlock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._cond = threading.Condition()
        self._free: list[_Staging] = []
        self._count = 0
        self._users = 0

    def enter(self) -> None:
        with self._cond:
            self._users += 1

    def leave(self, held: list[_Staging]) -> None:
        with self._cond:
            self._free.extend(held)
            self._users -= 1
            if self._users == 0:
                self._free.clear()  # the maps go with their last reference
                self._count = 0
            self._cond.notify_all()

    def give(self, buf: _Staging) -> None:
        """Return one buffer taken with :meth:`take` (by a user that has entered)."""
        with self._cond:
            self._free.append(buf)
            self._cond.notify()

    def try_take(self) -> _Staging | None:
        with self._cond:
            return self._take_locked()

    def take(self) -> _Staging:
        with self._cond:
            while (buf := self._take_locked()) is None:
                self._cond.wait()
            return buf

    def _take_locked(self) -> _Staging | None:
        if self._free:
            return self._free.pop()
        if self._count >= self.limit:
            return None
        self._count += 1
        m = mmap.mmap(-1, DIRECT_BLOCK)  # page-aligned, zero-filled
        return _Staging(m, memoryview(m), ctypes.addressof(ctypes.c_char.from_buffer(m)))


class LocalBackend(Backend):
    """Plain paths and ``file://``: temporary name, fsync, then rename (link for create-only).

    Large objects are written with ``O_DIRECT`` (storage option ``direct_io``): chunks are
    copied into page-aligned staging buffers that ``DIRECT_DEPTH`` at a time go to the disk from
    the backend's writer threads, bypassing the page cache; the unaligned tail is written padded
    to the block size and the file truncated to its size. A filesystem that refuses ``O_DIRECT``
    (tmpfs) gets buffered writes instead. Durability is the same either way: fsync of the file,
    rename, fsync of the directory.
    """

    name = "local"
    protocols = ("", "file", "local")
    accepted_options: ClassVar[frozenset[str] | None] = frozenset({"direct_io", "direct_io_min"})

    def __init__(self, storage_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(storage_options)
        self.direct_io = parse_direct_io(self.storage_options.get("direct_io", "auto"))
        self.direct_io_min = parse_direct_io_min(
            self.storage_options.get("direct_io_min", DIRECT_AUTO_MIN)
        )
        if _O_DIRECT and self.direct_io is not False:
            self.capabilities = Capabilities(read_alignment=DIRECT_ALIGN)
        self._pool: ThreadPoolExecutor | None = None
        self._read_pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._no_direct: set[int] = set()  # st_dev of filesystems that refused O_DIRECT
        self._staging = _StagingPool(DIRECT_POOL)

    def close(self) -> None:
        with self._pool_lock:
            pools, self._pool, self._read_pool = (self._pool, self._read_pool), None, None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True)

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

    def _wants_direct(self, size: int) -> bool:
        if not _O_DIRECT or self.direct_io is False:
            return False
        return self.direct_io is True or size >= self.direct_io_min

    def _writer_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(DIRECT_THREADS, thread_name_prefix="cloudckpt-dio")
            return self._pool

    def _reader_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._read_pool is None:
                self._read_pool = ThreadPoolExecutor(
                    READ_THREADS, thread_name_prefix="cloudckpt-pread"
                )
            return self._read_pool

    def _open_temp(self, path: str, direct: bool) -> tuple[str, int, bool]:
        """A new temporary file next to ``path``: its name, fd, and whether it is O_DIRECT."""
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = self._temp_name(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        if direct and os.stat(parent).st_dev not in self._no_direct:
            try:
                return tmp, os.open(tmp, flags | _O_DIRECT, 0o644), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._refused_direct(parent)
                try:  # some filesystems (ramfs) create the file before refusing the flag
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
        return tmp, os.open(tmp, flags, 0o644), False

    def _refused_direct(self, parent: str, dev: int | None = None) -> None:
        if dev is None:
            dev = os.stat(parent).st_dev
        if dev not in self._no_direct:
            self._no_direct.add(dev)
            log = logger.warning if self.direct_io else logger.debug
            log("%s: the filesystem refuses O_DIRECT; using the page cache", parent)

    def _write_temp(self, path: str, chunks: Iterable[Buffer], size: int | None = None) -> str:
        direct = size is not None and self._wants_direct(size)
        if direct and self.direct_io is None:
            # "auto": many small pieces (20,000 tensors of 15 KiB) cost more to copy one by one
            # into aligned buffers than the page cache's writev + fsync of the same bytes
            chunks, direct = _mostly_large(chunks)
        tmp, fd, direct = self._open_temp(path, direct)
        try:
            if direct:
                assert size is not None
                self._write_direct(fd, path, chunks, size)
            else:
                self._write_buffered(fd, chunks)
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

    @staticmethod
    def _write_buffered(fd: int, chunks: Iterable[Buffer]) -> None:
        pending: list[memoryview] = []
        pending_bytes = 0
        for chunk in chunks:
            view = buffers.byte_view(chunk)
            if view.nbytes == 0:
                continue
            pending.append(view)
            pending_bytes += view.nbytes
            if len(pending) >= _IOV_MAX or pending_bytes >= (8 << 20):
                _write_all(fd, pending)
                pending, pending_bytes = [], 0
        _write_all(fd, pending)

    def _write_direct(self, fd: int, path: str, chunks: Iterable[Buffer], size: int) -> None:
        """Copy ``chunks`` into aligned staging buffers, up to ``DIRECT_DEPTH`` of them writing
        at once; the buffers come from the backend's pool, shared with concurrent objects."""
        pool = self._writer_pool()
        staging = self._staging
        parent = os.path.dirname(path)
        mine: list[_Staging] = []
        free: list[_Staging] = []
        inflight: deque[tuple[Future[None], _Staging]] = deque()

        def write(view: memoryview, offset: int) -> None:
            try:
                _pwrite_all(fd, view, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # Opened with O_DIRECT but refused at write time: go on through the page cache.
                self._refused_direct(parent)
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
                _pwrite_all(fd, view, offset)

        def take() -> _Staging:
            if free:
                return free.pop()
            buf = staging.try_take() if len(mine) < DIRECT_DEPTH else None
            if buf is None and inflight:
                future, buf = inflight.popleft()
                future.result()
                return buf
            if buf is None:  # nothing of our own yet: wait for another object's buffer
                buf = staging.take()
            mine.append(buf)
            return buf

        def submit(buf: _Staging, n: int, offset: int) -> None:
            padded = -(-n // DIRECT_ALIGN) * DIRECT_ALIGN
            if padded != n:
                buf.view[n:padded] = bytes(padded - n)  # the tail's padding, cut by ftruncate
            inflight.append((pool.submit(write, buf.view[:padded], offset), buf))

        total = 0
        # Allocated up front, the writes land inside the file: ext4 and XFS then run them in
        # parallel (writes that extend a file take its lock one at a time).
        allocated = _fallocate(fd, -(-size // DIRECT_ALIGN) * DIRECT_ALIGN)
        staging.enter()
        try:
            buf, fill = take(), 0
            for chunk in chunks:
                view = memoryview(chunk)
                if view.format != "B" or view.ndim != 1:
                    view = view.cast("B")
                src = _address(view)
                pos = 0
                while pos < view.nbytes:
                    n = min(view.nbytes - pos, DIRECT_BLOCK - fill)
                    if src is not None:  # memmove lets the other threads run meanwhile
                        ctypes.memmove(buf.address + fill, src + pos, n)
                    else:
                        buf.view[fill : fill + n] = view[pos : pos + n]
                    fill += n
                    pos += n
                    if fill == DIRECT_BLOCK:
                        submit(buf, fill, total)
                        total += fill
                        buf, fill = take(), 0
            if fill:
                submit(buf, fill, total)
                total += fill
            while inflight:
                inflight.popleft()[0].result()
            if total % DIRECT_ALIGN or (allocated and total != allocated):
                os.ftruncate(fd, total)
            logger.debug("%s: %d bytes written with O_DIRECT", path, total)
        finally:
            # On an error: nothing may still write to ``fd`` (or a buffer) once this returns.
            for future, _ in inflight:
                future.cancel()
            for future, _ in inflight:
                if not future.cancelled():
                    future.exception()
            inflight.clear()
            staging.leave(mine)

    def write_object(self, path: str, chunks: Iterable[Buffer], size: int) -> None:
        tmp = self._write_temp(path, chunks, size)
        os.replace(tmp, path)
        self._fsync_dir(os.path.dirname(path))

    def read_into(self, path: str, offset: int, dest: Sequence[memoryview]) -> None:
        """Fill ``dest`` from ``path`` at ``offset``: with ``O_DIRECT`` through aligned staging
        buffers where :meth:`_wants_direct_read` says so, else with buffered ``preadv``."""
        views = [buffers.byte_view(b) for b in dest if b.nbytes]
        length = buffers.total(views)
        fd = os.open(path, os.O_RDONLY)
        try:
            dev = os.fstat(fd).st_dev
            dfd = (
                self._open_direct(path, dev)
                if self._wants_direct_read(fd, dev, offset, length)
                else None
            )
            if dfd is None:
                self._read_buffered(fd, path, offset, views)
                return
            try:
                self._read_direct(fd, dfd, dev, path, offset, views)
            finally:
                os.close(dfd)
        finally:
            os.close(fd)

    def _wants_direct_read(self, fd: int, dev: int, offset: int, length: int) -> bool:
        """``direct_io = true``: every read; ``"auto"``: ranges of ``DIRECT_READ_MIN`` bytes and
        more of which less than ``DIRECT_READ_CACHED`` is in the page cache (a warm file is a
        memory copy away; the disk is not); never where the filesystem refused ``O_DIRECT``."""
        if not _O_DIRECT or self.direct_io is False or not length or dev in self._no_direct:
            return False
        if self.direct_io is None:
            if length < DIRECT_READ_MIN:
                return False
            cached = _cached_fraction(fd, offset, length)
            if cached is not None and cached >= DIRECT_READ_CACHED:
                return False
        return True

    def _open_direct(self, path: str, dev: int) -> int | None:
        """A second, ``O_DIRECT`` descriptor of ``path``; ``None`` where the filesystem refuses."""
        try:
            return os.open(path, os.O_RDONLY | _O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._refused_direct(os.path.dirname(path), dev)
            return None

    def _read_buffered(self, fd: int, path: str, offset: int, views: list[memoryview]) -> None:
        """``preadv`` into ``views``; a range over ``READ_PIECE`` bytes is read as pieces of
        that size on the backend's threads, ``READ_THREADS`` at a time across the reads in
        flight (one sequential read of a cold file waits on the disk one request at a time)."""
        if buffers.total(views) <= READ_PIECE:
            _pread_all(fd, path, offset, views)
            return
        tasks = []
        for piece in buffers.split(views, READ_PIECE):
            tasks.append((_pread_all, (fd, path, offset, piece)))
            offset += buffers.total(piece)
        self._run_pieces(tasks)

    def _run_pieces(self, tasks: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> None:
        """Run ``tasks`` on the backend's reader threads and wait for all of them."""
        pool = self._reader_pool()
        futures = [pool.submit(fn, *args) for fn, args in tasks]
        try:
            for future in futures:
                future.result()
        finally:  # on an error: nothing may still read into ``dest`` once this returns
            for future in futures:
                future.cancel()
            wait(futures)

    def _read_direct(
        self, fd: int, dfd: int, dev: int, path: str, offset: int, views: list[memoryview]
    ) -> None:
        """Read ``views`` with ``O_DIRECT`` where the memory allows it: the block-aligned
        interior of a view whose address is congruent to its file offset (the reader allocates
        tensors so, see ``Capabilities.read_alignment``) goes straight into it in
        ``DIRECT_BLOCK`` pieces. The rest (heads and tails of such views, other views) is read
        buffered in ``"auto"``, and with ``direct_io = true`` through aligned staging buffers
        then copied (bytes at unaligned addresses cannot be read with ``O_DIRECT`` directly)."""
        tasks: list[tuple[int, Callable[..., None], tuple[Any, ...]]] = []
        staged = self.direct_io is True
        if not staged and hasattr(os, "posix_fadvise"):
            # the buffered reads here are heads and tails of a few KiB between direct reads:
            # no readahead (it would read again what goes straight into the tensors)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)

        def copies(start: int, run: list[memoryview]) -> None:
            if not run:
                return
            if not staged:
                for piece in buffers.split(run, READ_PIECE):
                    tasks.append((start, _pread_all, (fd, path, start, piece)))
                    start += buffers.total(piece)
                return
            end = start + buffers.total(run)
            a, edge = start, start - start % DIRECT_BLOCK + DIRECT_BLOCK
            while a < end:
                b = min(end, edge)
                piece = buffers.window(run, a - start, b - a)
                tasks.append((a, self._read_staged, (fd, dfd, dev, path, a, b, piece)))
                a, edge = b, edge + DIRECT_BLOCK

        pos, run_start, run = offset, offset, []
        for view in views:
            addr = _address(view)
            lo = -(-pos // DIRECT_ALIGN) * DIRECT_ALIGN
            hi = (pos + view.nbytes) // DIRECT_ALIGN * DIRECT_ALIGN
            if addr is None or (addr - pos) % DIRECT_ALIGN or hi - lo < DIRECT_READ_SPAN:
                run.append(view)
                pos += view.nbytes
                continue
            if lo > pos:
                run.append(view[: lo - pos])
            copies(run_start, run)
            for k in range(lo, hi, DIRECT_BLOCK):
                piece = view[k - pos : min(hi, k + DIRECT_BLOCK) - pos]
                tasks.append((k, self._read_straight, (fd, dfd, dev, path, k, piece)))
            run_start, run = hi, ([view[hi - pos :]] if hi < pos + view.nbytes else [])
            pos += view.nbytes
        copies(run_start, run)
        tasks.sort(key=lambda t: t[0])  # in file order
        straight = sum(t[2][-1].nbytes for t in tasks if t[1] == self._read_straight)
        if staged or straight:
            logger.debug(
                "%s: %d bytes at %d read with O_DIRECT, %d of them straight into the destination",
                path,
                buffers.total(views) if staged else straight,
                offset,
                straight,
            )
        self._staging.enter()
        try:
            if len(tasks) == 1:
                _, fn, args = tasks[0]
                fn(*args)
            else:
                self._run_pieces([(fn, args) for _, fn, args in tasks])
        finally:
            self._staging.leave([])

    def _read_straight(
        self, fd: int, dfd: int, dev: int, path: str, offset: int, view: memoryview
    ) -> None:
        """``view`` (aligned address and length) from ``offset`` (aligned) with ``O_DIRECT``;
        what it did not deliver (the file's end, a refusal) is read buffered, which raises
        ``EOFError`` at a short file."""
        got = self._pread_direct(dfd, dev, path, offset, view, view.nbytes)
        if got < view.nbytes:
            _pread_all(fd, path, offset + got, [view[got:]])

    def _pread_direct(
        self, dfd: int, dev: int, path: str, offset: int, view: memoryview, need: int
    ) -> int:
        """Bytes read with ``O_DIRECT`` into ``view`` (aligned) from ``offset`` (aligned), until
        ``need`` of them are in or the file ends; 0 where the filesystem refuses ``O_DIRECT``
        (remembered for its device, so the caller reads buffered)."""
        if dev in self._no_direct:
            return 0
        got = 0
        try:
            while got < need:
                n = os.preadv(dfd, [view[got:]], offset + got)
                got += n
                if n <= 0 or n % DIRECT_ALIGN:  # the file ends here
                    break
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._refused_direct(os.path.dirname(path), dev)
            return 0
        return got

    def _read_staged(
        self, fd: int, dfd: int, dev: int, path: str, a: int, b: int, views: list[memoryview]
    ) -> None:
        """Bytes ``[a, b)`` of the file into ``views``; what ``O_DIRECT`` did not deliver (the
        file's end, a refusal) is read buffered, which raises ``EOFError`` at a short file."""
        lo = a - a % DIRECT_ALIGN
        hi = -(-b // DIRECT_ALIGN) * DIRECT_ALIGN
        have = 0
        if dev not in self._no_direct:
            buf = self._staging.take()
            try:
                got = self._pread_direct(dfd, dev, path, lo, buf.view[: hi - lo], b - lo)
                have = max(0, min(got, b - lo) - (a - lo))
                _copy_out(buf, a - lo, views, have)
            finally:
                self._staging.give(buf)
        if have < b - a:
            _pread_all(fd, path, a + have, buffers.skip(views, have))

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

    def check_location(self, path: str) -> None:
        parent = path
        while not os.path.lexists(parent):
            up = os.path.dirname(parent)
            if up == parent:
                return
            parent = up
        if parent != path and not os.path.isdir(parent):
            raise BackendError(
                f"{path}: cannot hold checkpoints: {parent} is a file, not a directory; check "
                "the path"
            )
        if parent == path and not os.path.isdir(path):
            raise BackendError(f"{path}: is a file, not a directory of checkpoints")

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
    accepted_options: ClassVar[frozenset[str] | None] = frozenset()

    @classmethod
    def fsspec_class(cls, protocol: str) -> type | None:
        import fsspec

        try:
            return fsspec.get_filesystem_class(protocol or "file")
        except (ValueError, ImportError):
            return None  # construction reports the unknown protocol

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
                f"provides it, or {plugin_install_hint(protocol)}."
            ) from e
        from fsspec.implementations.memory import MemoryFileSystem

        # The filesystem decides: an in-process store is invisible to a writer process.
        self.capabilities = Capabilities(
            process_shareable=not isinstance(self.fs, MemoryFileSystem),
            create_only_commit=False,
        )

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

    def read_into(self, path: str, offset: int, dest: Sequence[memoryview]) -> None:
        total = buffers.total(dest)
        data = self.fs.cat_file(path, start=offset, end=offset + total)
        if len(data) < total:
            raise EOFError(f"{path}: object ends at byte {offset + len(data)}, {total} expected")
        buffers.scatter(data, deque(buffers.byte_view(b) for b in dest))

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
