"""The core on a local directory: tree, format, commit, load, errors and corruption."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import threading
from collections import OrderedDict, defaultdict
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import pytest
import torch
from layout_helpers import (
    all_objects,
    data_file,
    data_files,
    index_file,
    read_manifest_doc,
    write_manifest_doc,
)
from state_asserts import same

import cloudckpt
from cloudckpt.format.encoding import parse_safetensors_header
from cloudckpt.protocol.records import MANIFEST_NAME
from cloudckpt.storage import OwnedBackends
from cloudckpt.tree import MAX_DEPTH


def _plain_dtypes() -> list[torch.dtype]:
    out = []
    for d in sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str):
        try:
            torch.zeros(2, dtype=d).view(torch.uint8)
        except Exception:
            continue  # quantized dtypes: not plain strided tensors
        out.append(d)
    return out


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)


def trainer_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model(torch.randn(5, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1, "loss": 0.5}


# -- round trips ----------------------------------------------------------------------------


def test_trainer_state_round_trip(tmp_path: Path) -> None:
    sd = trainer_state()
    cloudckpt.save(str(tmp_path / "c"), sd)
    out = cloudckpt.load(str(tmp_path / "c"))
    same(out, sd)
    # and it resumes: Adam accepts the loaded optimizer state
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model.load_state_dict(out["model"])
    opt = torch.optim.Adam(model.parameters())
    opt.load_state_dict(out["optimizer"])


def test_file_uri_and_plain_path_are_the_same(tmp_path: Path) -> None:
    cloudckpt.save(f"file://{tmp_path}/c", {"x": torch.ones(3)})
    assert torch.equal(cloudckpt.load(str(tmp_path / "c"))["x"], torch.ones(3))


@pytest.mark.parametrize("dtype", _plain_dtypes(), ids=str)
def test_every_dtype_round_trips(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = {
        "t": _random((3, 5), dtype),
        "zero_dim": _random((), dtype, 1),
        "empty": torch.empty((0, 4), dtype=dtype),
    }
    cloudckpt.save(str(tmp_path / "c"), sd)
    same(cloudckpt.load(str(tmp_path / "c")), sd)


def test_itemsize_table_agrees_with_torch() -> None:
    """Index checks take item sizes from a plain table (so the command needs no torch): each
    entry equals torch's, every torch dtype is still accepted, an unknown name is refused."""
    from cloudckpt.format.encoding import _ITEMSIZE, dtype_itemsize

    sizes = {
        str(d).removeprefix("torch."): d.itemsize
        for d in vars(torch).values()
        if isinstance(d, torch.dtype)
    }
    assert {name: sizes.get(name) for name in _ITEMSIZE} == _ITEMSIZE
    assert {name: dtype_itemsize(name, "i.json") for name in sizes} == sizes
    with pytest.raises(cloudckpt.CorruptCheckpointError, match=r"i.json: unknown dtype 'float9'"):
        dtype_itemsize("float9", "i.json")


def test_every_leaf_and_container_type(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {
        "ints": {0: 1, 1: -(2**70), "s": 3},
        "floats": [1.5, float("inf"), float("-inf"), float("nan"), -0.0],
        "flags": (True, False),
        "none": None,
        "text": "héllo\n",
        "raw": b"\x00\xffbytes",
        "ordered": OrderedDict([("b", 1), ("a", 2)]),
        "nested": {"deep": [({"x": (1, [2, {3: "three"}])},)]},
        "views": {"t": base.t(), "col": base[:, 2], "slice": base[1:3], "base": base},
        "param": torch.nn.Parameter(torch.ones(2)),
        "empty_list": [],
        "empty_dict": {},
        "empty_tuple": (),
    }
    cloudckpt.save(str(tmp_path / "c"), sd)
    out = cloudckpt.load(str(tmp_path / "c"))
    expected = dict(sd)
    expected["param"] = torch.ones(2)  # parameters come back as plain tensors
    same(out, expected)
    assert out["views"]["t"].is_contiguous()


def test_file_size_packs_and_splits(tmp_path: Path) -> None:
    cfg = cloudckpt.CheckpointerConfig(
        writer_config=cloudckpt.CheckpointWriterConfig(file_size="1KiB")
    )
    sd = {"small": [torch.zeros(16) for _ in range(40)], "big": torch.zeros(4096)}
    cloudckpt.save(str(tmp_path / "c"), sd, config=cfg)
    files = data_files(tmp_path / "c")
    # 40 x 64 B in 1 KiB files -> 3 files, the 16 KiB tensor in one of its own
    assert len(files) == 4
    sizes = [os.path.getsize(f) for f in files]
    assert max(sizes) > 16384 and all(s < 16384 for s in sorted(sizes)[:-1])
    same(cloudckpt.load(str(tmp_path / "c"), config=cfg), sd)


def test_data_files_open_with_safetensors(tmp_path: Path) -> None:
    from safetensors import safe_open

    sd = trainer_state()
    sd["odd"] = torch.zeros(3, dtype=torch.complex64)  # unknown to safetensors: stored as bytes
    cloudckpt.save(str(tmp_path / "c"), sd)
    seen = {}
    for f in data_files(tmp_path / "c"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                seen[k] = st.get_tensor(k)
    assert torch.equal(seen["model.0.weight"], sd["model"]["0.weight"])
    assert torch.equal(seen["optimizer.state.0.exp_avg"], sd["optimizer"]["state"][0]["exp_avg"])
    assert seen["odd"].dtype == torch.uint8 and seen["odd"].numel() == 24


# -- partial, in place, strict, map_location -------------------------------------------------


def test_partial_nested_load_reads_only_requested(tmp_path: Path) -> None:
    sd = trainer_state()
    cloudckpt.save(str(tmp_path / "c"), sd)
    target = {"optimizer": {"state": {1: {"exp_avg": None}}}, "step": None}
    out = cloudckpt.load(str(tmp_path / "c"), target)
    assert out is target
    assert set(out) == {"optimizer", "step"} and out["step"] == 1
    assert torch.equal(
        out["optimizer"]["state"][1]["exp_avg"], sd["optimizer"]["state"][1]["exp_avg"]
    )
    assert set(out["optimizer"]["state"][1]) == {"exp_avg"}


def test_in_place_load_keeps_target_storage(tmp_path: Path) -> None:
    sd = trainer_state()
    cloudckpt.save(str(tmp_path / "c"), sd)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    target = {"model": model.state_dict()}
    ptrs = {k: v.data_ptr() for k, v in target["model"].items()}
    cloudckpt.load(str(tmp_path / "c"), target, strict=True)
    for k, v in model.state_dict().items():
        assert v.data_ptr() == ptrs[k]
        assert torch.equal(v, sd["model"][k])


def test_in_place_into_non_contiguous_target(tmp_path: Path) -> None:
    cloudckpt.save(str(tmp_path / "c"), {"w": torch.arange(6.0).reshape(2, 3)})
    holder = torch.zeros(3, 2)
    target = {"w": holder.t()}
    cloudckpt.load(str(tmp_path / "c"), target)
    assert torch.equal(holder.t(), torch.arange(6.0).reshape(2, 3))


def test_strict_missing_keys_raise_runtime_error(tmp_path: Path) -> None:
    cloudckpt.save(str(tmp_path / "c"), {"a": torch.ones(1)})
    target = {"a": torch.zeros(1), "b": torch.zeros(1), "c": {"d": 1}}
    with pytest.raises(RuntimeError, match=r"missing keys: b, c") as info:
        cloudckpt.load(str(tmp_path / "c"), target, strict=True)
    assert isinstance(info.value, cloudckpt.StateDictMismatchError)
    out = cloudckpt.load(str(tmp_path / "c"), target)  # not strict: kept as they were
    assert torch.equal(out["a"], torch.ones(1)) and torch.equal(out["b"], torch.zeros(1))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            {"a": torch.zeros(2)},
            r"a: the target tensor is \(2,\) torch.float32 but .* holds \(3,\)",
        ),
        ({"a": torch.zeros(3, dtype=torch.int32)}, r"a: the target tensor is \(3,\) torch.int32"),
        ({"n": torch.zeros(1)}, r"n: the target holds a tensor but .* holds a int there"),
        ({"a": {"x": 1}}, r"a: the target holds a dict but .* holds a tensor there"),
    ],
)
def test_shape_dtype_mismatch_always_raises(tmp_path: Path, target: Any, message: str) -> None:
    cloudckpt.save(str(tmp_path / "c"), {"a": torch.ones(3), "n": 1})
    with pytest.raises(RuntimeError, match=message):
        cloudckpt.load(str(tmp_path / "c"), target)


def test_map_location_cpu_and_meta_like_device(tmp_path: Path) -> None:
    cloudckpt.save(str(tmp_path / "c"), {"a": torch.ones(3)})
    out = cloudckpt.load(str(tmp_path / "c"), default_map_location="cpu")
    assert out["a"].device.type == "cpu"
    out = cloudckpt.load(str(tmp_path / "c"), default_map_location="meta")
    assert out["a"].device.type == "meta" and out["a"].shape == (3,)


# -- refused values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            {"optimizer": {"param_groups": [{"fn": lambda x: x}]}},
            "optimizer.param_groups[0].fn: cannot save a function",
        ),
        ({"m": {"dev": torch.device("cpu")}}, "m.dev: cannot save a value of type torch.device"),
        ({"w": torch.empty(3, device="meta")}, "w: cannot save a tensor on the meta device"),
        ({"s": torch.eye(3).to_sparse()}, "s: cannot save a tensor with layout torch.sparse_coo"),
        ({"k": {(1, 2): 3}}, "k.(1, 2): cannot save a dict key of type tuple"),
        ({"x": {1.5}}, "x: cannot save a value of type builtins.set"),
    ],
)
def test_unsupported_values_are_refused_before_writing(
    tmp_path: Path, value: Any, message: str
) -> None:
    with pytest.raises(cloudckpt.UnsupportedValueError) as info:
        cloudckpt.save(str(tmp_path / "c"), value)
    assert str(info.value).startswith(message)
    assert isinstance(info.value, TypeError)
    assert not (tmp_path / "c").exists()


class _Point(NamedTuple):
    x: int
    y: int


class _Params(dict):  # type: ignore[type-arg]
    pass


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            {"opt": defaultdict(list)},
            "opt: collections.defaultdict is not a container cloudckpt walks (dict, OrderedDict, "
            "list and tuple, exactly, so every value comes back as the type it was saved as); "
            "convert it with dict(value)",
        ),
        (
            {"m": [_Params(w=torch.ones(1))]},
            "m[0]: test_core._Params is not a container cloudckpt walks",
        ),
        (
            {"p": _Point(1, 2)},
            "p: test_core._Point is not a container cloudckpt walks (dict, OrderedDict, list and "
            "tuple, exactly, so every value comes back as the type it was saved as); convert it "
            "with tuple(value), or value._asdict() for a dict",
        ),
        ({"shape": torch.Size([2, 3])}, "shape: torch.Size is not a container cloudckpt walks"),
        (
            {"frozen": MappingProxyType({"a": 1})},
            "frozen: builtins.mappingproxy is not a container cloudckpt walks",
        ),
    ],
)
def test_container_look_alikes_are_refused_with_advice(
    tmp_path: Path, value: Any, message: str
) -> None:
    with pytest.raises(cloudckpt.UnsupportedValueError) as info:
        cloudckpt.save(str(tmp_path / "c"), value)
    assert str(info.value).startswith(message)
    assert not (tmp_path / "c").exists()


def test_nesting_deeper_than_the_limit_is_refused(tmp_path: Path) -> None:
    deep: Any = torch.ones(1)
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(cloudckpt.UnsupportedValueError) as info:
        cloudckpt.save(str(tmp_path / "c"), {"d": deep})
    assert str(info.value).startswith(f"d{'[0]' * (MAX_DEPTH - 1)}: containers nested more than")
    assert not (tmp_path / "c").exists()


def test_a_look_alike_load_target_is_a_mismatch(tmp_path: Path) -> None:
    cloudckpt.save(str(tmp_path / "c"), {"opt": {"lr": 0.1}})
    target = {"opt": defaultdict(float, lr=0.0)}
    with pytest.raises(cloudckpt.StateDictMismatchError) as info:
        cloudckpt.load(str(tmp_path / "c"), target)
    assert str(info.value).startswith(
        "opt: collections.defaultdict is not a container cloudckpt walks"
    )


def test_map_location_keeps_the_targets_containers(tmp_path: Path) -> None:
    sd = {"m": OrderedDict(w=torch.ones(2)), "t": (torch.zeros(1), [torch.ones(1)])}
    cloudckpt.save(str(tmp_path / "c"), sd)
    target: dict[str, Any] = {"m": OrderedDict(w=torch.empty(2)), "t": None}
    inner = target["m"]
    out = cloudckpt.load(str(tmp_path / "c"), target, default_map_location="meta")
    assert out is target and out["m"] is inner and type(out["t"]) is tuple
    assert out["m"]["w"].device.type == "meta" and out["t"][1][0].device.type == "meta"


def test_reference_cycle_is_refused(tmp_path: Path) -> None:
    sd: dict[str, Any] = {"a": {}}
    sd["a"]["self"] = sd["a"]
    with pytest.raises(
        cloudckpt.UnsupportedValueError, match=r"a.self: the state dict contains itself"
    ):
        cloudckpt.save(str(tmp_path / "c"), sd)


# -- hooks ------------------------------------------------------------------------------------


class RecordingHook(cloudckpt.WriterHook):
    def __init__(self, root: Path) -> None:
        self.calls: list[tuple[str, str, bool, dict[str, Any]]] = []
        self.root = root

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        self.calls.append(("pre", path, (self.root / MANIFEST_NAME).exists(), kwargs))

    def post_commit(self, path: str, **kwargs: Any) -> None:
        self.calls.append(("post", path, (self.root / MANIFEST_NAME).exists(), kwargs))


def test_hooks_run_in_order_around_the_manifest(tmp_path: Path) -> None:
    root = tmp_path / "c"
    hook = RecordingHook(root)
    ckpt = cloudckpt.make_sync_checkpointer(commit_hook=hook)
    ckpt.save(str(root), {"x": torch.ones(1)}, tag="v1")
    ckpt.close()
    assert [c[:3] for c in hook.calls] == [("pre", str(root), False), ("post", str(root), True)]
    assert hook.calls[0][3] == {"tag": "v1"}


def test_seed_style_checkpointer_api(tmp_path: Path) -> None:
    rank_info = cloudckpt.RankInfo(global_rank=0, global_world_size=1)
    cfg = cloudckpt.CheckpointerConfig(barrier_config=cloudckpt.BarrierConfig(barrier_type=None))
    ckpt = cloudckpt.make_sync_checkpointer(config=cfg, rank_info=rank_info)
    assert ckpt.save(str(tmp_path / "c"), {"x": torch.ones(2)}) is None
    out = ckpt.load(str(tmp_path / "c"), state_dict=None, default_map_location=None, strict=False)
    assert torch.equal(out["x"], torch.ones(2))
    ckpt.close()
    with pytest.raises(ValueError, match="Unknown barrier type: 'nope'"):
        cloudckpt.create_barrier_from_config(cloudckpt.BarrierConfig(barrier_type="nope"))
    done = cloudckpt.wrap_future(42)
    assert done.result() is None


def _direct_from_16mib() -> cloudckpt.CheckpointerConfig:
    """A config whose local backend writes objects of 16 MiB and more with O_DIRECT (through
    its thread pool; the default cut-over is 64 MiB)."""
    storage = cloudckpt.StorageConfig(options={"direct_io_min": "16MiB"})
    return cloudckpt.CheckpointerConfig(storage=storage)


def _new_threads(before: set[int | None]) -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.ident not in before and t.is_alive())


def test_a_checkpointer_closes_the_backends_it_opened(tmp_path: Path) -> None:
    before = {t.ident for t in threading.enumerate()}
    sd = {"big": torch.ones(8 << 20)}  # 32 MiB: written with O_DIRECT, through the pool
    ckpt = cloudckpt.make_sync_checkpointer(_direct_from_16mib())
    ckpt.save(str(tmp_path / "c"), sd)
    assert torch.equal(ckpt.load(str(tmp_path / "c"))["big"], sd["big"])
    assert any(n.startswith("cloudckpt-dio") for n in _new_threads(before))  # the pool ran
    ckpt.close()
    assert _new_threads(before) == []  # writer, reader and backend pools all gone


def test_a_checkpointer_leaves_the_callers_backends_open(tmp_path: Path) -> None:
    before = {t.ident for t in threading.enumerate()}
    mine = OwnedBackends()
    with cloudckpt.make_sync_checkpointer(_direct_from_16mib(), backends=mine) as ckpt:
        ckpt.save(str(tmp_path / "c"), {"big": torch.ones(8 << 20)})
    (backend,) = mine.open  # still the caller's, still usable
    assert backend.exists(backend.to_path(str(tmp_path / "c" / "manifest.json")))
    assert any(n.startswith("cloudckpt-dio") for n in _new_threads(before))
    mine.close()
    assert mine.open == [] and _new_threads(before) == []


def test_a_manager_closes_its_backends(tmp_path: Path) -> None:
    before = {t.ident for t in threading.enumerate()}
    with cloudckpt.CheckpointManager(str(tmp_path / "run"), keep_last=1) as mgr:
        for step in (1, 2):
            mgr.save(step, {"big": torch.full((8 << 20,), float(step))})
        assert mgr.steps() == [2]
    assert _new_threads(before) == []


def test_not_found_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nothing is stored there"):
        cloudckpt.load(str(tmp_path / "missing"))


# -- corruption -------------------------------------------------------------------------------


def test_many_tensors_round_trip_with_a_header_and_index_naming_each(tmp_path: Path) -> None:
    """More tensors than one slice of index rows (1,024), names that need JSON escapes: the
    index and the safetensors header, both written as text a piece at a time, read back."""
    sd = {f"t{i}": torch.full((i % 3 + 1,), float(i)) for i in range(1100)}
    sd['odd "name"\\é'] = torch.arange(4, dtype=torch.int16)
    uri = str(tmp_path / "many")
    cloudckpt.save(uri, sd)
    same(cloudckpt.load(uri), sd)
    raw = data_file(Path(uri)).read_bytes()
    header = parse_safetensors_header(raw, len(raw), "f")
    assert [e.name for e in header][-2:] == ["t1099", 'odd "name"\\é']
    assert header[-1].dtype == "I16" and header[-1].shape == [4]


def test_load_leaves_the_collector_on_and_nothing_frozen(tmp_path: Path) -> None:
    """A load freezes what it builds while it runs (the index, the tensors) and unfreezes all
    of it at the end; a process that froze objects itself keeps exactly its own freeze."""
    import gc

    uri = str(tmp_path / "c")
    sd = {f"t{i}": torch.ones(2) * i for i in range(3000)}
    cloudckpt.save(uri, sd)
    assert gc.get_freeze_count() == 0
    same(cloudckpt.load(uri), sd)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.freeze()
    try:
        mine = gc.get_freeze_count()
        same(cloudckpt.load(uri), sd)
        after = gc.get_freeze_count()
        # nothing of the load's stays frozen, and the caller's freeze is not undone (a frozen
        # object of the caller's that dies meanwhile leaves the count, so not == mine)
        assert gc.isenabled() and mine // 2 < after <= mine
    finally:
        gc.unfreeze()


def _saved(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    sd = trainer_state()
    cloudckpt.save(str(tmp_path / "c"), sd)
    return tmp_path / "c", sd


def test_flipped_byte_names_object_and_key(tmp_path: Path) -> None:
    root, sd = _saved(tmp_path)
    f = data_file(root)
    raw = bytearray(f.read_bytes())
    index = json.loads(index_file(root).read_bytes())
    _, _, _, _, offset, _, _ = next(t for t in index["tensors"] if t[0] == "model.2.bias")
    raw[offset] ^= 1
    f.write_bytes(bytes(raw))
    with pytest.raises(cloudckpt.CorruptCheckpointError) as info:
        cloudckpt.load(str(root))
    assert "rank-00000-0000.safetensors" in str(info.value)
    assert "CRC32C mismatch for key model.2.bias" in str(info.value)
    # a partial load that does not touch the damaged tensor still works
    out = cloudckpt.load(str(root), {"model": {"0.weight": None}})
    assert torch.equal(out["model"]["0.weight"], sd["model"]["0.weight"])


def test_truncated_data_file(tmp_path: Path) -> None:
    root, _ = _saved(tmp_path)
    f = data_file(root)
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(
        cloudckpt.CorruptCheckpointError, match=r"rank-00000-0000.safetensors is truncated"
    ):
        cloudckpt.load(str(root))


def test_garbage_manifest(tmp_path: Path) -> None:
    root, _ = _saved(tmp_path)
    (root / MANIFEST_NAME).write_bytes(b"{not json")
    with pytest.raises(cloudckpt.CorruptCheckpointError, match=r"manifest.json is not valid JSON"):
        cloudckpt.load(str(root))


def test_damaged_index(tmp_path: Path) -> None:
    root, _ = _saved(tmp_path)
    idx = index_file(root)
    raw = bytearray(idx.read_bytes())
    raw[-5] ^= 0x01
    idx.write_bytes(bytes(raw))
    with pytest.raises(
        cloudckpt.CorruptCheckpointError, match=r"rank-00000.json: size or CRC32C differs"
    ):
        cloudckpt.load(str(root))


def test_missing_data_file(tmp_path: Path) -> None:
    root, _ = _saved(tmp_path)
    (data_file(root)).unlink()
    with pytest.raises(
        cloudckpt.CorruptCheckpointError, match=r"is missing but the index lists it"
    ):
        cloudckpt.load(str(root))


def _header_file(header: dict[str, Any], payload: bytes, claimed_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", claimed_len if claimed_len is not None else len(raw)) + raw + payload


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (_header_file({}, b"", claimed_len=1 << 40), "past the end of the"),
        (
            _header_file(
                {"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, b"x" * 8
            ),
            "claims bytes 0..4000, past the end of the file",
        ),
        (
            _header_file(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"x" * 12,
            ),
            "byte ranges of 'a' and 'b' overlap",
        ),
        (
            _header_file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"x" * 8),
            "size disagrees with its shape",
        ),
    ],
)
def test_lying_safetensors_header_is_refused(blob: bytes, message: str) -> None:
    with pytest.raises(cloudckpt.CorruptCheckpointError, match=message):
        parse_safetensors_header(blob, len(blob), "f.safetensors")


def test_lying_index_is_refused_before_allocation(tmp_path: Path) -> None:
    root, _ = _saved(tmp_path)
    idx_path = index_file(root)
    doc = json.loads(idx_path.read_bytes())
    doc["tensors"][0][2] = [1 << 40]  # a shape that would need 4 TiB
    doc["tensors"][0][5] = (1 << 40) * 4
    raw = json.dumps(doc, separators=(",", ":")).encode()
    idx_path.write_bytes(raw)
    manifest = read_manifest_doc(root)
    from cloudckpt.format.encoding import crc32c

    manifest["ranks"][0]["size"], manifest["ranks"][0]["crc32c"] = len(raw), crc32c(raw)
    write_manifest_doc(root, manifest)
    with pytest.raises(
        cloudckpt.CorruptCheckpointError, match=r"claims bytes .* of data/[^/]+/rank-00000-0000"
    ):
        cloudckpt.load(str(root))


# -- commit and crashes -----------------------------------------------------------------------


def test_overwrite_replaces_and_refuses_without_flag(tmp_path: Path) -> None:
    uri = str(tmp_path / "c")
    cloudckpt.save(uri, {"v": 1, "t": torch.zeros(100)})
    with pytest.raises(
        FileExistsError, match=r"a committed checkpoint is already at .*overwrite=True"
    ):
        cloudckpt.save(uri, {"v": 2})
    assert cloudckpt.load(uri)["v"] == 1
    old = all_objects(tmp_path / "c")
    cloudckpt.save(uri, {"v": 2}, overwrite=True)
    assert cloudckpt.load(uri) == {"v": 2}
    now = all_objects(tmp_path / "c")
    assert not (old - {MANIFEST_NAME}) & now  # the old objects went after the new commit
    assert now == {MANIFEST_NAME, str(index_file(tmp_path / "c").relative_to(tmp_path / "c"))}


_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys, torch, cloudckpt
    from cloudckpt.storage import LocalBackend

    uri = sys.argv[1]
    real = LocalBackend.write_object
    calls = []

    def dying_write(self, path, chunks, size):
        calls.append(path)
        if len(calls) == 3:  # mid-save: after two data files, before the index
            it = iter(chunks)
            os.write(os.open(path + ".partial", os.O_CREAT | os.O_WRONLY), next(it))
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, path, chunks, size)

    LocalBackend.write_object = dying_write
    cfg = cloudckpt.CheckpointerConfig(writer_config=cloudckpt.CheckpointWriterConfig(file_size=1024, concurrency=1))
    cloudckpt.save(uri, {f"t{i}": torch.full((256,), float(i)) for i in range(6)}, config=cfg, overwrite=True)
    """
)


def test_sigkill_mid_save_leaves_nothing_loadable(tmp_path: Path) -> None:
    fresh = str(tmp_path / "fresh")
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, fresh], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert (tmp_path / "fresh" / "data").exists()
    with pytest.raises(cloudckpt.CheckpointNotCommittedError, match="not a committed checkpoint"):
        cloudckpt.load(fresh)


def test_sigkill_mid_overwrite_keeps_previous_or_uncommitted(tmp_path: Path) -> None:
    """Killed while writing the replacement: the previous checkpoint stays committed."""
    prev = tmp_path / "prev"
    cloudckpt.save(str(prev), {"v": 1})
    other = tmp_path / "other"
    cloudckpt.save(str(other), {"v": 7})
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(prev)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert cloudckpt.load(str(prev)) == {"v": 1}
    assert cloudckpt.load(str(other)) == {"v": 7}  # a neighbour is untouched


def test_no_temporary_files_left_after_save(tmp_path: Path) -> None:
    cloudckpt.save(str(tmp_path / "c"), trainer_state())
    names = [n for _, _, files in os.walk(tmp_path / "c") for n in files]
    assert not [n for n in names if ".tmp-" in n]


def test_full_disk_fails_cleanly_and_keeps_committed(tiny_disk: Path) -> None:
    cloudckpt.save(str(tiny_disk / "a"), {"x": torch.ones(1000)})
    with pytest.raises(cloudckpt.BackendError, match=r"the disk is full") as info:
        cloudckpt.save(str(tiny_disk / "b"), {"big": torch.zeros(1 << 19)})  # 2 MiB
    assert str(tiny_disk / "b") in str(info.value)
    assert torch.equal(cloudckpt.load(str(tiny_disk / "a"))["x"], torch.ones(1000))
    with pytest.raises(cloudckpt.CheckpointNotCommittedError):
        cloudckpt.load(str(tiny_disk / "b"))
    leftovers = [n for _, _, files in os.walk(tiny_disk) for n in files if ".tmp-" in n]
    assert leftovers == []
