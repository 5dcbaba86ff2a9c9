"""The local backend's O_DIRECT paths. Writes: aligned and unaligned sizes, the page-cache
fallback where a filesystem refuses O_DIRECT (ramfs; tmpfs too before Linux 6.6), full disks,
and the ``direct_io`` option. Reads: unaligned offsets, addresses and lengths, the file's tail,
the refusal fallback, the page-cache check of "auto", and checksums still caught."""

from __future__ import annotations

import ctypes
import itertools
import logging
import mmap
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import cloudckpt
from cloudckpt.storage import LocalBackend
from cloudckpt.storage.filesystems import (
    DIRECT_ALIGN,
    DIRECT_AUTO_MEAN,
    DIRECT_AUTO_MIN,
    DIRECT_BLOCK,
    DIRECT_READ_MIN,
    READ_PIECE,
)

SIZES = [0, 1, DIRECT_ALIGN - 1, DIRECT_ALIGN, DIRECT_ALIGN + 1, DIRECT_BLOCK - 1, DIRECT_BLOCK,
         3 * DIRECT_BLOCK + 12345]  # fmt: skip


def _pattern(size: int) -> bytes:
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def _chunks(data: bytes, sizes: tuple[int, ...] = (7, 4096, 100_003, 1 << 20)) -> Iterator[bytes]:
    """``data`` cut into pieces of uneven sizes, as a writer hands over header + tensors."""
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        yield data[pos : pos + n]
        pos, i = pos + n, i + 1


@pytest.fixture
def tiny_ext4(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB ext4 filesystem on a loop device: it accepts O_DIRECT, and fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root (CI runs as root)")
    image, mnt = tmp_path / "ext4.img", tmp_path / "ext4"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A real ramfs: it refuses O_DIRECT at open with EINVAL."""
    if os.geteuid() != 0:
        pytest.skip("mounting a ramfs needs root (CI runs as root)")
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _direct_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "with O_DIRECT" in r.getMessage()]


@pytest.mark.parametrize("size", SIZES)
def test_direct_write_round_trips_every_size(
    tmp_path: Path, size: int, caplog: pytest.LogCaptureFixture
) -> None:
    backend = LocalBackend({"direct_io": True})
    data = _pattern(size)
    path = str(tmp_path / "obj")
    with caplog.at_level(logging.DEBUG, logger="cloudckpt.storage.filesystems"):
        backend.write_object(path, _chunks(data), size)
    backend.close()
    assert os.path.getsize(path) == size  # the padded tail is cut off
    assert Path(path).read_bytes() == data
    assert _direct_log(caplog) == [f"{path}: {size} bytes written with O_DIRECT"]
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


def test_auto_uses_direct_only_for_large_objects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In "auto", objects of ``direct_io_min`` bytes and more go O_DIRECT (default 64 MiB,
    here set lower so the test stays small), smaller ones through the page cache."""
    assert LocalBackend().direct_io_min == DIRECT_AUTO_MIN == 64 << 20
    cut = 1 << 20
    backend = LocalBackend({"direct_io_min": "1MiB"})
    small, edge, large = _pattern(100_000), _pattern(cut - 1), _pattern(cut)
    with caplog.at_level(logging.DEBUG, logger="cloudckpt.storage.filesystems"):
        for name, data in (("small", small), ("edge", edge), ("large", large)):
            backend.write_object(str(tmp_path / name), _chunks(data), len(data))
    for name, data in (("small", small), ("edge", edge), ("large", large)):
        assert (tmp_path / name).read_bytes() == data
    assert _direct_log(caplog) == [f"{tmp_path / 'large'}: {cut} bytes written with O_DIRECT"]


@pytest.mark.parametrize(("value", "parsed"), [("16MiB", 16 << 20), (0, 0), ("4096", 4096)])
def test_direct_io_min_values(value: object, parsed: int) -> None:
    assert LocalBackend({"direct_io_min": value}).direct_io_min == parsed


@pytest.mark.parametrize("value", ["big", -1, True, "16 parsecs"])
def test_bad_direct_io_min_is_a_config_error(tmp_path: Path, value: object) -> None:
    with pytest.raises(
        cloudckpt.ConfigError,
        match=r"storage option direct_io_min = .* is not valid for the local backend: .*"
        r"smallest data file written with O_DIRECT",
    ):
        cloudckpt.save(str(tmp_path / "c"), {"x": 1}, storage_options={"direct_io_min": value})


def test_both_write_paths_store_the_same_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same state saved through the page cache (default cut-over) and with O_DIRECT
    (``direct_io_min = 0``) gives byte-identical data files and the same loaded state."""
    g = torch.Generator().manual_seed(5)
    state = {"w": torch.randn(1000, 1001, generator=g), "b": torch.randn(7, generator=g), "n": 3}
    with caplog.at_level(logging.DEBUG, logger="cloudckpt.storage.filesystems"):
        cloudckpt.save(str(tmp_path / "buffered"), state)
        assert _direct_log(caplog) == []
        cloudckpt.save(str(tmp_path / "direct"), state, storage_options={"direct_io_min": 0})
        assert any("data" in m for m in _direct_log(caplog))

    def data_files(name: str) -> list[bytes]:
        files = sorted((tmp_path / name).rglob("*.safetensors"))
        assert files
        return [f.read_bytes() for f in files]

    assert data_files("buffered") == data_files("direct")
    for name in ("buffered", "direct"):
        assert cloudckpt.verify(str(tmp_path / name)).ok
        out = cloudckpt.load(str(tmp_path / name))
        assert torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"])
        assert out["n"] == 3


def test_auto_leaves_many_small_pieces_to_the_page_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A large object of small pieces (many small tensors) is written through the page cache
    in "auto" (copying 15 KiB pieces one by one into aligned buffers cost more than writev +
    fsync); ``direct_io = true`` still writes it with O_DIRECT."""
    data = _pattern(DIRECT_BLOCK + 5)
    piece = DIRECT_AUTO_MEAN // 4
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
    auto = LocalBackend({"direct_io_min": DIRECT_BLOCK})
    with caplog.at_level(logging.DEBUG, logger="cloudckpt.storage.filesystems"):
        auto.write_object(str(tmp_path / "auto"), iter(pieces), len(data))
        LocalBackend({"direct_io": True}).write_object(
            str(tmp_path / "forced"), iter(pieces), len(data)
        )
    assert (tmp_path / "auto").read_bytes() == data == (tmp_path / "forced").read_bytes()
    assert _direct_log(caplog) == [
        f"{tmp_path / 'forced'}: {len(data)} bytes written with O_DIRECT"
    ]


def test_direct_io_false_never_uses_direct(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = LocalBackend({"direct_io": False, "direct_io_min": 0})
    data = _pattern(DIRECT_BLOCK + 1)
    with caplog.at_level(logging.DEBUG, logger="cloudckpt.storage.filesystems"):
        backend.write_object(str(tmp_path / "obj"), _chunks(data), len(data))
    assert (tmp_path / "obj").read_bytes() == data
    assert _direct_log(caplog) == []


def test_refused_direct_falls_back_to_the_page_cache(
    ramfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = LocalBackend({"direct_io": True})
    data = _pattern(300_001)
    with caplog.at_level(logging.DEBUG, logger="cloudckpt.storage.filesystems"):
        backend.write_object(str(ramfs / "a"), _chunks(data), len(data))
        backend.write_object(str(ramfs / "b"), _chunks(data), len(data))
    assert (ramfs / "a").read_bytes() == data == (ramfs / "b").read_bytes()
    assert _direct_log(caplog) == []
    refusals = [r for r in caplog.records if "refuses O_DIRECT" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING  # once per filesystem
    assert str(ramfs) in refusals[0].getMessage()
    assert [n for n in os.listdir(ramfs) if ".tmp-" in n] == []


def test_full_tmpfs_with_direct_io(tiny_disk: Path) -> None:
    """tmpfs takes O_DIRECT on recent kernels and refuses it on older ones: full either way."""
    opts = {"direct_io": True}
    with pytest.raises(cloudckpt.BackendError, match=r"the disk is full"):
        cloudckpt.save(str(tiny_disk / "b"), {"big": torch.zeros(1 << 19)}, storage_options=opts)
    leftovers = [n for _, _, files in os.walk(tiny_disk) for n in files if ".tmp-" in n]
    assert leftovers == []


def test_checkpoint_round_trips_on_disk_tmpfs_and_ramfs(
    tmp_path: Path, tiny_disk: Path, ramfs: Path
) -> None:
    g = torch.Generator().manual_seed(3)
    state = {
        "w": torch.randn(1000, 1001, generator=g),  # ~4 MB, an unaligned size
        "b": torch.randn(17, generator=g).to(torch.bfloat16),
        "step": 5,
    }
    small = {"x": torch.arange(1000, dtype=torch.int32), "n": "tmpfs"}
    opts = {"direct_io": True}
    for uri, sd in (
        (str(tmp_path / "c"), state),
        (str(tiny_disk / "c"), small),
        (str(ramfs / "c"), state),
    ):
        cloudckpt.save(uri, sd, storage_options=opts)
        out = cloudckpt.load(uri, storage_options=opts)
        assert out.keys() == sd.keys()
        for k, v in sd.items():
            assert torch.equal(out[k], v) if isinstance(v, torch.Tensor) else out[k] == v


def test_full_disk_on_the_direct_path(tiny_ext4: Path) -> None:
    opts = {"direct_io": True}
    cloudckpt.save(str(tiny_ext4 / "a"), {"x": torch.ones(1000)}, storage_options=opts)
    with pytest.raises(cloudckpt.BackendError, match=r"the disk is full") as info:
        big = {"big": torch.zeros(1 << 21)}  # 8 MiB on a 4 MiB filesystem
        cloudckpt.save(str(tiny_ext4 / "b"), big, storage_options=opts)
    assert str(tiny_ext4 / "b") in str(info.value)
    assert torch.equal(cloudckpt.load(str(tiny_ext4 / "a"))["x"], torch.ones(1000))
    with pytest.raises(cloudckpt.CheckpointNotCommittedError):
        cloudckpt.load(str(tiny_ext4 / "b"))
    leftovers = [n for _, _, files in os.walk(tiny_ext4) for n in files if ".tmp-" in n]
    assert leftovers == []
    # The space came back: a save that fits succeeds after the failed one.
    cloudckpt.save(str(tiny_ext4 / "c"), {"y": torch.ones(1 << 18)}, storage_options=opts)
    assert torch.equal(cloudckpt.load(str(tiny_ext4 / "c"))["y"], torch.ones(1 << 18))


@pytest.mark.parametrize("value", ["sometimes", 2, 1.0])
def test_bad_direct_io_option_is_a_config_error(tmp_path: Path, value: object) -> None:
    with pytest.raises(cloudckpt.ConfigError, match=r"direct_io = .* is not valid .* \"auto\""):
        cloudckpt.save(str(tmp_path / "c"), {"x": 1}, storage_options={"direct_io": value})


@pytest.mark.parametrize(("value", "parsed"), [("auto", None), (True, True), ("false", False)])
def test_direct_io_values(value: object, parsed: bool | None) -> None:
    assert LocalBackend({"direct_io": value}).direct_io is parsed


def test_large_reads_go_in_parallel_pieces(tmp_path: Path) -> None:
    """A range over READ_PIECE bytes is read as pieces on the backend's threads, scattered into
    destination views that pieces cut anywhere (here across uneven views); a file that ends
    early is an EOFError naming it, and no piece is still reading once read_into returns."""
    size = 3 * READ_PIECE + 12345
    data = _pattern(size)
    path = tmp_path / "obj"
    path.write_bytes(data)
    be = LocalBackend()
    try:
        offset = 100
        cuts = [0, 7, READ_PIECE - 3, 2 * READ_PIECE + 1, size - offset]
        dest = [memoryview(bytearray(b - a)) for a, b in itertools.pairwise(cuts)]
        be.read_into(str(path), offset, dest)
        assert b"".join(bytes(d) for d in dest) == data[offset:]
        assert any(t.name.startswith("cloudckpt-pread") for t in threading.enumerate())
        too_long = [memoryview(bytearray(size))]
        with pytest.raises(
            EOFError, match=rf"{path}: object ends at byte {size}, 100 more expected"
        ):
            be.read_into(str(path), 100, too_long)
    finally:
        be.close()


def _read_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "read with O_DIRECT" in r.getMessage()]


def _evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (written and fsync'd: nothing is lost)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _congruent(size: int, offset: int) -> tuple[mmap.mmap, memoryview]:
    """A writable view of ``size`` bytes whose address is ``offset`` modulo DIRECT_ALIGN (as
    the reader places large tensors); the view keeps the map alive."""
    m = mmap.mmap(-1, size + DIRECT_ALIGN)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    shift = (offset - base) % DIRECT_ALIGN
    return m, memoryview(m)[shift : shift + size]


READ_SIZE = 3 * DIRECT_BLOCK + 12345


@pytest.mark.parametrize("offset", [0, 1, 100, DIRECT_ALIGN - 1, DIRECT_ALIGN, DIRECT_BLOCK + 7])
@pytest.mark.parametrize("congruent", [True, False])
def test_direct_reads_at_any_offset_address_and_length(
    tmp_path: Path, offset: int, congruent: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Ranges starting anywhere, ending anywhere (the file's unaligned tail included), into
    views at aligned and unaligned addresses, cut unevenly: every byte arrives, whether read
    straight into the memory or through the staging buffers."""
    data = _pattern(READ_SIZE)
    path = tmp_path / "obj"
    path.write_bytes(data)
    _evict(path)
    keep = []
    for mode in (
        True,
        None,
    ):  # direct_io = true stages what is not congruent; auto reads it buffered
        be = LocalBackend({"direct_io": mode})
        try:
            for end in (READ_SIZE, READ_SIZE - 1, offset + 2 * DIRECT_BLOCK + 3):
                length = end - offset
                if congruent:
                    m, big = _congruent(length - 5, offset + 5)
                    keep.append(m)
                    dest = [memoryview(bytearray(5)), big]
                else:
                    cuts = sorted({0, 7, length // 3, length - 1, length})
                    dest = [memoryview(bytearray(b - a)) for a, b in itertools.pairwise(cuts)]
                caplog.clear()
                _evict(path)  # "auto" reads cold ranges only with O_DIRECT
                with caplog.at_level(logging.DEBUG, logger="cloudckpt.storage.filesystems"):
                    be.read_into(str(path), offset, dest)
                assert b"".join(bytes(d) for d in dest) == data[offset:end], (mode, end)
                logged = _read_log(caplog)
                if mode is True:
                    assert len(logged) == 1 and f"{length} bytes at {offset} read" in logged[0]
                if congruent:
                    assert ", 0 of them straight" not in logged[0]
                elif mode is None:  # nothing congruent: "auto" reads it all buffered
                    assert logged == []
        finally:
            be.close()


def test_direct_read_past_the_end_is_an_eoferror(tmp_path: Path) -> None:
    data = _pattern(DIRECT_BLOCK + 100)
    path = tmp_path / "obj"
    path.write_bytes(data)
    be = LocalBackend({"direct_io": True})
    try:
        for congruent in (True, False):
            if congruent:
                _, view = _congruent(len(data) + 4000, 0)
                dest = [view]
            else:
                dest = [memoryview(bytearray(len(data) + 4000))]
            with pytest.raises(
                EOFError, match=rf"{path}: object ends at byte {len(data)}, \d+ more expected"
            ):
                be.read_into(str(path), 0, dest)
            assert bytes(dest[0][: len(data)]) == data
    finally:
        be.close()


def test_auto_reads_direct_only_what_the_page_cache_lacks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _pattern(DIRECT_READ_MIN + 4096)
    path = tmp_path / "obj"
    path.write_bytes(data)
    be = LocalBackend()
    _, view = _congruent(len(data), 0)
    try:
        _evict(path)
        with caplog.at_level(logging.DEBUG, logger="cloudckpt.storage.filesystems"):
            be.read_into(str(path), 0, [view])  # cold: O_DIRECT, and it stays cold
            be.read_into(str(path), 0, [view])
            assert path.read_bytes() == data  # now in the page cache
            be.read_into(str(path), 0, [view])  # warm: a memory copy, no disk
            be.read_into(str(path), 0, [view[:4096]])  # small: buffered
        assert bytes(view) == data
        assert (
            _read_log(caplog)
            == [
                f"{path}: {len(data)} bytes at 0 read with O_DIRECT, {len(data)} of them straight "
                "into the destination"
            ]
            * 2
        )
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="cloudckpt.storage.filesystems"):
            LocalBackend({"direct_io": False}).read_into(str(path), 0, [view])
            _evict(path)
            LocalBackend({"direct_io": False}).read_into(str(path), 0, [view])
        assert _read_log(caplog) == []
    finally:
        be.close()


def test_direct_read_falls_back_where_refused(
    ramfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _pattern(2 * DIRECT_BLOCK + 5)
    path = ramfs / "obj"
    path.write_bytes(data)
    be = LocalBackend({"direct_io": True})
    try:
        with caplog.at_level(logging.DEBUG, logger="cloudckpt.storage.filesystems"):
            for _ in range(2):
                _, view = _congruent(len(data) - 3, 3)
                be.read_into(str(path), 3, [view])
                assert bytes(view) == data[3:]
        assert _read_log(caplog) == []
        refusals = [r for r in caplog.records if "refuses O_DIRECT" in r.getMessage()]
        assert len(refusals) == 1 and str(ramfs) in refusals[0].getMessage()
    finally:
        be.close()


@pytest.mark.parametrize("where", ["interior", "head"])
@pytest.mark.parametrize("direct_io", ["auto", True])
def test_direct_reads_still_catch_damaged_bytes(
    tmp_path: Path, where: str, direct_io: object, caplog: pytest.LogCaptureFixture
) -> None:
    """A flipped byte in a tensor read straight into its memory with O_DIRECT (or in its
    unaligned head, read otherwise) fails the CRC32C check like any other."""
    uri = str(tmp_path / "c")
    big = torch.arange(DIRECT_READ_MIN // 4 + 999, dtype=torch.float32)
    cloudckpt.save(uri, {"small": torch.ones(3), "big": big})
    index = next((tmp_path / "c" / "index").rglob("rank-00000.json"))
    import json

    rec = next(t for t in json.loads(index.read_text())["tensors"] if t[0] == "big")
    offset = rec[4]
    (data_file,) = (tmp_path / "c" / "data").rglob("*.safetensors")
    opts = {"direct_io": direct_io}
    _evict(data_file)
    with caplog.at_level(logging.DEBUG, logger="cloudckpt.storage.filesystems"):
        assert torch.equal(cloudckpt.load(uri, storage_options=opts)["big"], big)
    assert any("straight into the destination" in m for m in _read_log(caplog))
    pos = offset + (1 if where == "head" else DIRECT_BLOCK + 10)
    with open(data_file, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x10]))
    _evict(data_file)
    with pytest.raises(cloudckpt.CorruptCheckpointError, match=r"CRC32C mismatch for key big"):
        cloudckpt.load(uri, storage_options=opts)


def test_loaded_tensors_are_placed_for_direct_reads(tmp_path: Path) -> None:
    """Large tensors the reader allocates sit at their file offset modulo DIRECT_ALIGN, in a
    storage at most DIRECT_ALIGN bytes larger; small ones and other backends get plain ones."""
    uri = str(tmp_path / "c")
    sd = {"big": torch.randn(1 << 19), "half": torch.randn(1 << 19).half(), "small": torch.ones(5)}
    cloudckpt.save(uri, sd)
    out = cloudckpt.load(uri)
    for k, v in sd.items():
        assert torch.equal(out[k], v)
        assert out[k].untyped_storage().nbytes() - out[k].nbytes <= DIRECT_ALIGN
    assert out["small"].storage_offset() == 0
    for k in ("big", "half"):
        assert out[k].is_contiguous()
        out[k].add_(1)  # an ordinary, writable tensor
