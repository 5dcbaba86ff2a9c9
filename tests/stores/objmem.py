"""A third store on the object-store base, as proof that a new one is small: ``memobj://``.

Buckets and keys live in fsspec's in-memory filesystem (so the store is inside this process:
``process_shareable`` is false). Uploads gather their parts and publish the object at the end;
create-only commits hold a lock; ranged reads go through the base's parallel piece reader.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import AsyncGenerator, Iterable
from typing import Any

import pytest

from cloudckpt.storage import (
    Buffer,
    Capabilities,
    ObjectInfo,
    ObjectStoreBackend,
    OptionSpec,
    buffers,
    register_backend,
)
from stores import StoreTarget, fresh_name

STORE_FIXTURES = ["objmem_store"]
IN_PROCESS_FIXTURES = ["objmem_store"]


class MemObjectBackend(ObjectStoreBackend):
    """``memobj://bucket/key`` in this process's memory."""

    name = "memobj"
    protocols = ("memobj",)
    scheme = "memobj"
    capabilities = Capabilities(process_shareable=False, create_only_commit=True)
    option_specs = (
        OptionSpec("part_size", "size", 1 << 20, "bytes per part"),
        OptionSpec("read_part_size", "size", 64 << 10, "bytes per ranged read"),
        OptionSpec("max_inflight_parts", "int", 4, "ranged reads in flight"),
    )
    _lock = threading.Lock()

    def open_client(self, options: dict[str, Any]) -> None:
        from fsspec.implementations.memory import MemoryFileSystem

        if options:
            raise TypeError(f"memobj takes no client options, got {sorted(options)}")
        self.fs = MemoryFileSystem()

    def _p(self, path: str) -> str:
        bucket, key = self.split(path)
        return f"/memobj/{bucket}/{key}".rstrip("/")

    def write_object(self, path: str, chunks: Iterable[Buffer], size: int) -> None:
        parts = [b"".join(views) for views in buffers.iter_parts(chunks, self.part_size)]
        data = b"".join(parts)
        if len(data) != size:
            raise ValueError(f"{self.to_uri(path)}: expected {size} bytes, got {len(data)}")
        with self._lock:  # the object appears whole, at the end
            self.fs.pipe_file(self._p(path), data)

    def put_create_only(self, path: str, data: bytes) -> None:
        with self._lock:
            if self.fs.isfile(self._p(path)):
                raise FileExistsError(errno.EEXIST, "object exists", self.to_uri(path))
            self.fs.pipe_file(self._p(path), bytes(data))

    async def open_range(
        self, bucket: str, key: str, first: int, last: int
    ) -> AsyncGenerator[bytes, None]:
        where = self._p(f"{bucket}/{key}")
        if not self.fs.isfile(where):
            raise FileNotFoundError(errno.ENOENT, "no such object", self.to_uri(f"{bucket}/{key}"))
        data = self.fs.cat_file(where, start=first, end=last + 1)
        for i in range(0, len(data), 16 << 10):  # as a network body would arrive
            yield data[i : i + (16 << 10)]

    def read_bytes(self, path: str) -> bytes:
        if not self.fs.isfile(self._p(path)):
            raise FileNotFoundError(errno.ENOENT, "no such object", self.to_uri(path))
        return bytes(self.fs.cat_file(self._p(path)))

    def list_dir(self, path: str) -> list[ObjectInfo]:
        root = self._p(path)
        if not self.fs.isdir(root):
            return []
        out = []
        for e in self.fs.ls(root, detail=True):
            rel = str(e["name"])[len("/memobj/") :]
            is_dir = e["type"] == "directory"
            out.append(ObjectInfo(rel, rel.rsplit("/", 1)[-1], int(e.get("size") or 0), is_dir))
        return sorted(out, key=lambda i: i.name)

    def delete(self, path: str, *, recursive: bool = False) -> None:
        where = self._p(path)
        if self.fs.isfile(where):
            self.fs.rm_file(where)
        elif recursive and self.fs.isdir(where):
            self.fs.rm(where, recursive=True)

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(self._p(path)))

    def size(self, path: str) -> int:
        if not self.fs.isfile(self._p(path)):
            raise FileNotFoundError(errno.ENOENT, "no such object", self.to_uri(path))
        return int(self.fs.size(self._p(path)))


register_backend(MemObjectBackend, clobber=True)


@pytest.fixture
def objmem_store() -> StoreTarget:
    return StoreTarget("memobj", f"memobj://bucket-{fresh_name()}/{fresh_name()}")
