"""Request bodies made of views of tensor memory (aiohttp's payload: loaded with the first
write, so a process that only lists and reads manifests never imports aiohttp)."""

from __future__ import annotations

from typing import Any

from aiohttp import payload

from cloudckpt.storage import buffers

_SLICE = 256 << 10


class PartBody(payload.Payload):
    """An object's or a part's bytes, views of tensor memory, as a request body (no copy).

    aiohttp hands a whole ``bytes``/``memoryview`` body to the socket layer at once, which
    copies every byte the socket does not take right away: a part's worth of memory per part in
    flight. This body is written in slices of about 256 KiB (large views cut, small ones
    gathered), each after the previous one drained. It is also seekable and readable, which is
    what botocore needs to sign it and to rewind it.
    """

    def __init__(self, views: list[memoryview]) -> None:
        super().__init__(views, content_type="application/octet-stream")
        self.views = [v for v in views if v.nbytes]
        self._size = buffers.total(self.views)
        self.pos = 0

    def __len__(self) -> int:
        return self._size or 0

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else len(self) + pos)
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        end = len(self) if n is None or n < 0 else min(len(self), self.pos + n)
        out = b"".join(buffers.window(self.views, self.pos, end - self.pos))
        self.pos = end
        return out

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a checkpoint part is binary")

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        views = self.views
        if content_length is not None and content_length < len(self):
            views = buffers.window(views, 0, content_length)
        batch: list[memoryview] = []
        held = 0
        for v in views:
            for i in range(0, v.nbytes, _SLICE):
                piece = v[i : i + _SLICE]
                if not batch and piece.nbytes == _SLICE:
                    await writer.write(piece)  # a whole slice of one tensor: as it is
                    continue
                batch.append(piece)
                held += piece.nbytes
                if held >= _SLICE:
                    await writer.write(b"".join(batch))
                    batch, held = [], 0
        if batch:
            await writer.write(batch[0] if len(batch) == 1 else b"".join(batch))
