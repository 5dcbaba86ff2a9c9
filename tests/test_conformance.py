"""The backend conformance suite: every test runs on every storage target in tests/stores/."""

from __future__ import annotations

import errno
import itertools

import pytest
import torch
from stores import StoreTarget

import cloudckpt
from cloudckpt.protocol import open_checkpoint
from cloudckpt.storage import resolve


def _backend(store: StoreTarget, *parts: str):  # type: ignore[no-untyped-def]
    return resolve(store.uri(*parts), backend=store.backend, storage_options=store.storage_options)


def _sd(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "w": torch.randn(64, 32, generator=g),
            "b": torch.randn(32, generator=g).to(torch.bfloat16),
        },
        "small": [torch.arange(i, dtype=torch.int64) for i in range(5)],
        "step": 7 + seed,
        "name": "run",
    }


def _assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b)  # type: ignore[arg-type]
        for k in a:
            _assert_same(a[k], b[k])  # type: ignore[index]
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)  # type: ignore[arg-type]
        for x, y in zip(a, b):  # type: ignore[call-overload]
            _assert_same(x, y)
    else:
        assert type(a) is type(b) and a == b


# -- the Backend interface ------------------------------------------------------------------


def test_write_then_ranged_read_into_buffers(store: StoreTarget) -> None:
    backend, path = _backend(store, "obj")
    payload = bytes(range(256)) * 1000
    backend.write_object(path, [payload[:1000], memoryview(payload)[1000:]], len(payload))
    assert backend.exists(path)
    assert backend.size(path) == len(payload)
    a, b = bytearray(10), bytearray(5000)
    backend.read_into(path, 300, [memoryview(a), memoryview(b)])
    assert bytes(a) == payload[300:310] and bytes(b) == payload[310:5310]
    assert backend.read_bytes(path) == payload


def test_read_past_end_raises_eof(store: StoreTarget) -> None:
    backend, path = _backend(store, "short")
    backend.write_object(path, [b"abc"], 3)
    with pytest.raises(EOFError):
        backend.read_into(path, 1, [memoryview(bytearray(10))])


def test_missing_object_raises_file_not_found(store: StoreTarget) -> None:
    backend, path = _backend(store, "nothing-here")
    assert not backend.exists(path)
    with pytest.raises(FileNotFoundError):
        backend.read_bytes(path)


def test_failed_write_leaves_nothing(store: StoreTarget) -> None:
    backend, path = _backend(store, "partial")

    def chunks():  # type: ignore[no-untyped-def]
        yield b"x" * 1000
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        backend.write_object(path, chunks(), 2000)
    assert not backend.exists(path)
    assert backend.list_dir(backend.join(path.rsplit("/", 1)[0])) == [] or all(
        "partial" not in i.name for i in backend.list_dir(path.rsplit("/", 1)[0])
    )


def test_put_create_only_refuses_existing(store: StoreTarget) -> None:
    backend, path = _backend(store, "commit.json")
    backend.put_create_only(path, b"first")
    with pytest.raises(FileExistsError):
        backend.put_create_only(path, b"second")
    assert backend.read_bytes(path) == b"first"


def test_list_and_delete(store: StoreTarget) -> None:
    backend, root = _backend(store, "tree")
    for name in ("a/x", "a/y", "b"):
        backend.write_object(backend.join(root, name), [b"1"], 1)
    names = [(i.name, i.is_dir) for i in backend.list_dir(root)]
    assert names == [("a", True), ("b", False)]
    backend.delete(backend.join(root, "a"), recursive=True)
    assert [i.name for i in backend.list_dir(root)] == ["b"]
    backend.delete(backend.join(root, "b"))
    backend.delete(backend.join(root, "b"))  # missing is not an error
    assert not backend.exists(backend.join(root, "b"))


# -- checkpoints through the public API -----------------------------------------------------


def test_round_trip(store: StoreTarget) -> None:
    sd = _sd()
    uri = store.uri("ckpt")
    cloudckpt.save(uri, sd, **store.config_kwargs())
    _assert_same(cloudckpt.load(uri, **store.config_kwargs()), sd)


def test_partial_in_place_load(store: StoreTarget) -> None:
    sd = _sd()
    uri = store.uri("ckpt")
    cloudckpt.save(uri, sd, **store.config_kwargs())
    target = {"model": {"w": torch.zeros(64, 32)}}
    ptr = target["model"]["w"].data_ptr()
    out = cloudckpt.load(uri, target, strict=True, **store.config_kwargs())
    assert out is target and out["model"]["w"].data_ptr() == ptr
    assert torch.equal(out["model"]["w"], sd["model"]["w"])


def test_every_dtype_and_shape_round_trip(store: StoreTarget) -> None:
    """Fresh destinations get a byte view from their address for the common dtypes and the
    numpy route for the rest; both, and in-place loads, must deliver every byte."""
    g = torch.Generator().manual_seed(3)
    bits = torch.randint(0, 256, (4, 16), dtype=torch.uint8, generator=g)
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
              torch.int16, torch.uint8, torch.complex64, torch.float8_e4m3fn, torch.uint16)  # fmt: skip
    sd: dict[str, object] = {str(dt): bits.view(dt) for dt in dtypes}
    sd["bool"] = bits > 127
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.empty(0, 3)
    sd["many"] = [torch.full((7,), i, dtype=torch.int32) for i in range(300)]
    uri = store.uri("dtypes")
    cloudckpt.save(uri, sd, **store.config_kwargs())

    def same_bytes(a: torch.Tensor, b: object) -> None:
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape)
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))

    out = cloudckpt.load(uri, **store.config_kwargs())
    for k, v in sd.items():
        for a, b in zip(v, out[k]) if isinstance(v, list) else [(v, out[k])]:
            same_bytes(a, b)
    target = {k: torch.zeros_like(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    cloudckpt.load(uri, target, **store.config_kwargs())
    for k, t in target.items():
        same_bytes(sd[k], t)  # type: ignore[arg-type]


def test_commit_is_create_only(store: StoreTarget) -> None:
    uri = store.uri("ckpt")
    cloudckpt.save(uri, _sd(0), **store.config_kwargs())
    with pytest.raises(cloudckpt.CheckpointExistsError, match="already at"):
        cloudckpt.save(uri, _sd(1), **store.config_kwargs())
    assert cloudckpt.load(uri, **store.config_kwargs())["step"] == 7
    cloudckpt.save(uri, _sd(1), overwrite=True, **store.config_kwargs())
    assert cloudckpt.load(uri, **store.config_kwargs())["step"] == 8


def test_uncommitted_and_missing_are_told_apart(store: StoreTarget) -> None:
    backend, root = _backend(store, "half")
    backend.write_object(backend.join(root, "data/rank-00000-0000.safetensors"), [b"x" * 16], 16)
    with pytest.raises(cloudckpt.CheckpointNotCommittedError, match="not a committed checkpoint"):
        cloudckpt.load(store.uri("half"), **store.config_kwargs())
    with pytest.raises(cloudckpt.CheckpointNotFoundError, match="nothing is stored there"):
        cloudckpt.load(store.uri("never"), **store.config_kwargs())


def test_flipped_byte_is_caught(store: StoreTarget) -> None:
    uri = store.uri("ckpt")
    cloudckpt.save(uri, _sd(), **store.config_kwargs())
    backend, root = _backend(store, "ckpt")
    rel = open_checkpoint(uri, store.backend, store.storage_options).manifest.ranks[0].files[0]
    path = backend.join(root, rel)
    raw = bytearray(backend.read_bytes(path))
    raw[-3] ^= 0x40
    backend.delete(path)
    backend.write_object(path, [bytes(raw)], len(raw))
    with pytest.raises(cloudckpt.CorruptCheckpointError, match="CRC32C mismatch for key"):
        cloudckpt.load(uri, **store.config_kwargs())


def _small_sd() -> dict[str, torch.Tensor]:
    """Small tensors of several dtypes and shapes, stored back to back at aligned offsets."""
    g = torch.Generator().manual_seed(5)
    dtypes = (torch.float32, torch.bfloat16, torch.int64, torch.float16, torch.uint8, torch.bool)
    sd: dict[str, torch.Tensor] = {}
    for i in range(48):
        dt = dtypes[i % len(dtypes)]
        shape = (8, 4 + i % 3) if i % 2 else (16 + 8 * i,)
        bits = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        sd[f"t{i}"] = bits > 127 if dt == torch.bool else bits.to(dt)
    sd["scalar"] = torch.tensor(1.5, dtype=torch.float64)
    return sd


def test_small_tensors_share_storage_without_overlap(store: StoreTarget) -> None:
    """A fresh load gives runs of small tensors one storage each; every tensor keeps its own
    bytes (values, dtype, shape), and writing one leaves its neighbours as they were."""
    sd = _small_sd()
    uri = store.uri("small")
    cloudckpt.save(uri, sd, **store.config_kwargs())
    out = cloudckpt.load(uri, **store.config_kwargs())
    _assert_same(out, sd)
    spans: dict[int, list[tuple[int, int]]] = {}
    for t in out.values():
        start = t.data_ptr() - t.untyped_storage().data_ptr()
        assert start % t.element_size() == 0 and t.is_contiguous()
        spans.setdefault(t.untyped_storage().data_ptr(), []).append((start, start + t.nbytes))
    assert max(len(s) for s in spans.values()) > 1  # some tensors do share a storage
    for ranges in spans.values():
        ranges.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(ranges))
    out["t3"].fill_(0)
    for k in ("t2", "t4"):
        _assert_same(out[k], sd[k])


def test_odd_offsets_get_their_own_storage(store: StoreTarget) -> None:
    """A tensor stored at an offset that is not a multiple of its item size cannot be a view
    of a shared storage: it is allocated alone (aligned) and still loads exactly."""
    sd = {
        "a": torch.arange(3, dtype=torch.uint8),
        "b": torch.randn(5, dtype=torch.float32),  # 3 bytes into the data: misaligned
        "c": torch.arange(2, dtype=torch.uint8),
        "d": torch.arange(6, dtype=torch.int16),  # odd again
        "e": torch.arange(4, dtype=torch.uint8),
    }
    uri = store.uri("odd")
    cloudckpt.save(uri, sd, **store.config_kwargs())
    index = open_checkpoint(uri, store.backend, store.storage_options).read_index(0)
    offsets = {rec.key: rec.offset for rec in index.tensors}
    assert offsets["b"] % 4 and offsets["d"] % 2  # the layout this test is about
    out = cloudckpt.load(uri, **store.config_kwargs())
    _assert_same(out, sd)
    for k in ("b", "d"):
        assert out[k].untyped_storage().data_ptr() != out["a"].untyped_storage().data_ptr()
        assert out[k].data_ptr() % out[k].element_size() == 0


def test_flipped_byte_in_one_small_tensor_names_it(store: StoreTarget) -> None:
    sd = _small_sd()
    uri = store.uri("small")
    cloudckpt.save(uri, sd, **store.config_kwargs())
    ckpt = open_checkpoint(uri, store.backend, store.storage_options)
    rec = next(r for r in ckpt.read_index(0).tensors if r.key == "t7")
    backend, root = _backend(store, "small")
    path = backend.join(root, ckpt.read_index(0).files[rec.file].path)
    raw = bytearray(backend.read_bytes(path))
    raw[rec.offset + 5] ^= 0x10
    backend.delete(path)
    backend.write_object(path, [bytes(raw)], len(raw))
    with pytest.raises(cloudckpt.CorruptCheckpointError, match=r"CRC32C mismatch for key t7 "):
        cloudckpt.load(uri, **store.config_kwargs())


def test_many_files_written_and_read(store: StoreTarget) -> None:
    from cloudckpt import CheckpointerConfig, CheckpointWriterConfig, StorageConfig

    cfg = CheckpointerConfig(
        writer_config=CheckpointWriterConfig(file_size="16KiB", concurrency=4),
        storage=StorageConfig(backend=store.backend, options=store.storage_options),
    )
    sd = {f"t{i}": torch.full((1024,), float(i)) for i in range(20)}  # 4 KiB each
    uri = store.uri("many")
    cloudckpt.save(uri, sd, config=cfg)
    m = open_checkpoint(uri, store.backend, store.storage_options).manifest
    backend, root = _backend(store, "many", "data", m.attempt)
    assert len(backend.list_dir(root)) == 5 == len(m.ranks[0].files)
    _assert_same(cloudckpt.load(uri, config=cfg), sd)


def test_unwritable_destination_names_uri(tmp_path) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    target = str(blocker / "ckpt")
    with pytest.raises(cloudckpt.BackendError) as info:
        cloudckpt.save(target, {"x": torch.zeros(2)})
    assert target in str(info.value)
    assert info.value.__cause__ is not None
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOTDIR


def test_capabilities_are_declared(store: StoreTarget) -> None:
    from cloudckpt.storage import Capabilities

    backend, _ = _backend(store, "x")
    caps = backend.capabilities
    assert isinstance(caps, Capabilities)
    in_process = store.name in ("memory", "memobj")
    assert caps.process_shareable is not in_process
    assert caps.create_only_commit is (store.name != "memory")
    assert backend.create_only_commit is caps.create_only_commit
