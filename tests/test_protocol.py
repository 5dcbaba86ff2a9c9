"""The on-storage protocol, format version 2: attempt-scoped names, the manifest's own CRC32C,
names confined to the checkpoint, version-1 checkpoints, verify/copy, orphans and gc."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from layout_helpers import (
    all_objects,
    data_file,
    index_file,
    read_manifest_doc,
    write_manifest_doc,
)
from state_asserts import same

import cloudckpt
from cloudckpt.format.encoding import crc32c
from cloudckpt.protocol import (
    CommitResult,
    RankOutcome,
    collect_orphans,
    list_orphans,
    open_checkpoint,
)
from cloudckpt.storage import resolve

V1_FIXTURE = Path(__file__).parent / "fixtures" / "v1-checkpoint"


def v1_state() -> dict[str, Any]:
    """What tests/fixtures/v1-checkpoint holds (saved by the version-1 writer)."""
    return {
        "model": {
            "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
            "b": torch.tensor([1, 2, 3], dtype=torch.int64),
            "h": torch.linspace(0, 1, 5, dtype=torch.bfloat16),
        },
        "step": 7,
        "name": "v1",
        "opt": [torch.ones(2, dtype=torch.float16), {"lr": 0.1}],
    }


# -- names and records -------------------------------------------------------------------------


def test_every_object_of_a_save_carries_its_attempt(tmp_path: Path) -> None:
    uri = str(tmp_path / "c")
    cfg = cloudckpt.CheckpointerConfig(
        writer_config=cloudckpt.CheckpointWriterConfig(file_size="1KiB")
    )
    cloudckpt.save(uri, {f"t{i}": torch.full((200,), float(i)) for i in range(4)}, config=cfg)
    m = open_checkpoint(uri).manifest
    assert m.format_version == 2 and m.attempt
    names = [n for r in m.ranks for n in r.names()]
    assert len(names) == 5 and all(n.split("/")[1] == m.attempt for n in names)
    assert all_objects(tmp_path / "c") == {"manifest.json", *names}
    idx = json.loads(index_file(tmp_path / "c").read_bytes())
    assert idx["attempt"] == m.attempt and idx["format_version"] == 2
    first = m.attempt
    cloudckpt.save(uri, {"t": torch.ones(3)}, overwrite=True)
    second = open_checkpoint(uri).manifest.attempt
    assert second != first
    assert {n.split("/")[1] for n in all_objects(tmp_path / "c") if "/" in n} == {second}


def test_outcome_and_commit_result_round_trip() -> None:
    o = RankOutcome(3, index="index/a/rank-00003.json", size=10, crc32c=7, files=["d"], bytes=5)
    assert RankOutcome.from_json(o.to_json()) == o
    assert RankOutcome.from_json(RankOutcome(1, ok=False, error="boom").to_json()).error == "boom"
    assert CommitResult.from_json(CommitResult(False, "x").to_json()) == CommitResult(False, "x")
    assert o.entry().names() == ["index/a/rank-00003.json", "d"]


# -- the manifest's own CRC32C -----------------------------------------------------------------


def test_manifest_checks_its_own_crc(tmp_path: Path) -> None:
    uri = str(tmp_path / "c")
    cloudckpt.save(uri, {"x": torch.ones(3)}, metadata={"note": "aaaa"})
    path = tmp_path / "c" / "manifest.json"
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b'"aaaa"', b'"aaab"'))  # valid JSON, one byte changed
    for call in (cloudckpt.load, cloudckpt.verify):
        with pytest.raises(
            cloudckpt.CorruptCheckpointError,
            match=r"manifest.json: the manifest's own CRC32C does not match its content",
        ):
            call(uri)
    doc = json.loads(raw)
    del doc["crc32c"]
    path.write_text(json.dumps(doc))
    with pytest.raises(cloudckpt.CorruptCheckpointError, match=r"own CRC32C is missing"):
        cloudckpt.load(uri)
    # the CRC covers the content, not the layout: re-indented, it still loads
    path.write_text(json.dumps(json.loads(raw), indent=4))
    assert torch.equal(cloudckpt.load(uri)["x"], torch.ones(3))


# -- names stay inside the checkpoint ------------------------------------------------------------

BAD_NAMES = [
    ("../../payload.bin", r"has a '\.' or '\.\.' component"),
    ("data/../../../payload.bin", r"has a '\.' or '\.\.' component"),
    ("/etc/passwd", r"is an absolute path"),
    ("s3://other-bucket/payload.bin", r"starts with a URI scheme or drive"),
    ("data//x.safetensors", r"has an empty path component"),
    ("data/x\x00.safetensors", r"contains a NUL byte"),
    ("", r"is empty or not a string"),
]


def _forge_file_name(root: Path, bad: str) -> None:
    """Point rank 0's first data file at ``bad`` in the index and the manifest, every
    checksum made to match."""
    idx_path = index_file(root)
    idx = json.loads(idx_path.read_bytes())
    idx["files"][0][0] = bad
    raw = json.dumps(idx, separators=(",", ":")).encode()
    idx_path.write_bytes(raw)
    doc = read_manifest_doc(root)
    doc["ranks"][0].update(size=len(raw), crc32c=crc32c(raw), files=[bad])
    write_manifest_doc(root, doc)


@pytest.mark.parametrize(("bad", "message"), BAD_NAMES)
def test_names_outside_the_checkpoint_are_refused(tmp_path: Path, bad: str, message: str) -> None:
    root = tmp_path / "run" / "c"
    cloudckpt.save(str(root), {"x": torch.arange(4)})
    payload = tmp_path / "payload.bin"
    shutil.copy(data_file(root), payload)  # a real safetensors file where ../../ points
    _forge_file_name(root, bad)
    for call in (cloudckpt.load, cloudckpt.verify):
        with pytest.raises(cloudckpt.CorruptCheckpointError) as info:
            call(str(root))
        assert "object name" in str(info.value) and __import__("re").search(
            message, str(info.value)
        )
        assert "must be a relative path inside the checkpoint" in str(info.value)
    dst = tmp_path / "copied" / "c"
    before = all_objects(tmp_path)
    with pytest.raises(cloudckpt.CorruptCheckpointError, match=message):
        cloudckpt.copy(str(root), str(dst))
    assert all_objects(tmp_path) == before  # nothing written, inside DST or out


def test_index_name_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "c"
    cloudckpt.save(str(root), {"x": torch.arange(4)})
    doc = read_manifest_doc(root)
    doc["ranks"][0]["index"] = "../../etc/index.json"
    write_manifest_doc(root, doc)
    with pytest.raises(
        cloudckpt.CorruptCheckpointError,
        match=r"object name '\.\./\.\./etc/index\.json' has a '\.' or '\.\.' component",
    ):
        cloudckpt.load(str(root))


def test_index_file_name_refused_even_when_the_manifest_is_clean(tmp_path: Path) -> None:
    root = tmp_path / "c"
    cloudckpt.save(str(root), {"x": torch.arange(4)})
    idx_path = index_file(root)
    idx = json.loads(idx_path.read_bytes())
    idx["files"][0][0] = "/etc/passwd"
    raw = json.dumps(idx, separators=(",", ":")).encode()
    idx_path.write_bytes(raw)
    doc = read_manifest_doc(root)
    doc["ranks"][0].update(size=len(raw), crc32c=crc32c(raw))
    write_manifest_doc(root, doc)
    with pytest.raises(
        cloudckpt.CorruptCheckpointError, match=r"rank-00000.json: object name '/etc/passwd'"
    ):
        cloudckpt.load(str(root))


# -- version 1 ---------------------------------------------------------------------------------


def test_version_1_checkpoint_loads_verifies_and_copies(tmp_path: Path) -> None:
    assert read_manifest_doc(V1_FIXTURE)["format_version"] == 1
    assert "index/rank-00000.json" in all_objects(V1_FIXTURE)
    same(cloudckpt.load(str(V1_FIXTURE)), v1_state())
    report = cloudckpt.verify(str(V1_FIXTURE))
    assert report.ok and (report.ranks, report.files, report.tensors) == (1, 1, 4)
    src = tmp_path / "v1"
    shutil.copytree(V1_FIXTURE, src)
    backend, path = resolve(str(src))
    assert list_orphans(backend, path, str(src))[1] == []  # every object is named
    copied = tmp_path / "v2"
    cloudckpt.copy(str(src), str(copied))
    assert open_checkpoint(str(copied)).manifest.format_version == 2
    same(cloudckpt.load(str(copied)), v1_state())
    assert open_checkpoint(str(copied)).manifest.metadata == {"written_by": "format version 1"}
    # overwriting a version-1 checkpoint removes its objects after the new commit
    cloudckpt.save(str(src), {"x": torch.ones(2)}, overwrite=True)
    assert not {"index/rank-00000.json", "data/rank-00000-0000.safetensors"} & all_objects(src)
    assert torch.equal(cloudckpt.load(str(src))["x"], torch.ones(2))


# -- verify and copy as functions --------------------------------------------------------------


def test_verify_reports_damage_without_raising(tmp_path: Path) -> None:
    root = tmp_path / "c"
    cloudckpt.save(str(root), {"x": torch.arange(100)})
    assert cloudckpt.verify(str(root)).ok
    f = data_file(root)
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))
    report = cloudckpt.verify(str(root))
    assert not report.ok and len(report.problems) == 1
    assert "tensor 'x': CRC32C" in report.problems[0] and str(f) in report.problems[0]


def test_copy_refuses_a_committed_destination_and_overwrites_atomically(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cloudckpt.save(a, {"v": 1, "t": torch.ones(4)})
    cloudckpt.save(b, {"v": 2})
    with pytest.raises(cloudckpt.CheckpointExistsError, match=r"already holds a committed"):
        cloudckpt.copy(a, b)
    assert cloudckpt.load(b) == {"v": 2}
    old = all_objects(tmp_path / "b") - {"manifest.json"}
    report = cloudckpt.copy(a, b, overwrite=True)
    assert report.files == 1 and report.dst == b
    assert cloudckpt.load(b)["v"] == 1
    assert not old & all_objects(tmp_path / "b")  # the replaced objects went after the commit
    cloudckpt.copy(a, b, overwrite=True)  # copying again never writes over named objects
    assert cloudckpt.verify(b).ok


# -- orphans -----------------------------------------------------------------------------------


def _age(root: Path, seconds: float) -> None:
    past = time.time() - seconds
    for p in root.rglob("*"):
        os.utime(p, (past, past))


def test_orphans_are_removed_only_when_aged_and_never_named(tmp_path: Path) -> None:
    root = tmp_path / "c"
    cloudckpt.save(str(root), {"x": torch.arange(10)})
    named = all_objects(root)
    # a killed attempt's objects, and one stray object of no attempt
    (root / "data" / "20260101T000000Z-deadbeef0000").mkdir()
    (root / "data" / "20260101T000000Z-deadbeef0000" / "rank-00000-0000.safetensors").write_bytes(
        b"x" * 10
    )
    (root / "index" / "20260101T000000Z-deadbeef0000").mkdir()
    (root / "index" / "20260101T000000Z-deadbeef0000" / "rank-00000.json").write_bytes(b"{}")
    backend, path = resolve(str(root))
    manifest, groups = list_orphans(backend, path, str(root))
    assert manifest is not None and [g.name for g in groups] == ["20260101T000000Z-deadbeef0000"]
    assert len(groups[0].objects) == 2
    report = collect_orphans(backend, path, str(root), 3600)
    assert report.removed == [] and len(report.kept) == 1  # young: kept
    _age(root, 7200)
    report = collect_orphans(backend, path, str(root), 3600, dry_run=True)
    assert len(report.removed) == 1 and len(all_objects(root)) == len(named) + 2
    report = collect_orphans(backend, path, str(root), 3600)
    assert len(report.removed) == 1 and all_objects(root) == named
    assert not (root / "data" / "20260101T000000Z-deadbeef0000").exists()
    assert torch.equal(cloudckpt.load(str(root))["x"], torch.arange(10))
    # a damaged manifest: nothing can be told an orphan, nothing is removed
    (root / "manifest.json").write_bytes(b"{oops")
    with pytest.raises(cloudckpt.CorruptCheckpointError):
        collect_orphans(backend, path, str(root), 0)
    assert all_objects(root) == named


# -- index rows: one pass of plain checks, the field-by-field check when one fails -------------


def _index_doc(rows: list[list[Any]], tree: dict[str, Any], file_size: int = 1000) -> bytes:
    doc = {
        "format": "cloudckpt-index",
        "format_version": 2,
        "attempt": "a",
        "rank": 0,
        "world_size": 1,
        "files": [["data/a/rank-00000-0000.safetensors", file_size]],
        "tensors": rows,
        "tree": tree,
    }
    return json.dumps(doc).encode()


def _two_tensor_tree() -> dict[str, Any]:
    return {"dict": [["x", {"tensor": 0}], ["y", {"tensor": 1}]]}


def test_index_rows_out_of_file_order_still_load() -> None:
    from cloudckpt.protocol.records import RankIndex

    rows = [["x", "float32", [4], 0, 100, 16, 1], ["y", "float16", [2, 3], 0, 50, 12, 2]]
    idx = RankIndex.from_json(_index_doc(rows, _two_tensor_tree()), "idx")
    assert [(t.key, t.dtype, t.shape, t.offset, t.length) for t in idx.tensors] == [
        ("x", "float32", [4], 100, 16),
        ("y", "float16", [2, 3], 50, 12),
    ]


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (
            ["y", "float32", [4], 0, 108, 16, 2],
            r"idx \(data/a/[^)]+\): byte ranges of 'x' and 'y' overlap",
        ),
        (["y", "float32", [True], 0, 200, 4, 2], r"idx: tensor 'y' shape must be an integer"),
        (["y", "float32", [4], 0, 200, 12, 2], r"idx: tensor 'y' length disagrees with its shape"),
        (
            ["y", "float32", [4], 0, 990, 16, 2],
            r"idx: tensor 'y' claims bytes 990..1006 of data/a/",
        ),
        (["y", "float32", [4], 1, 200, 16, 2], r"idx: tensor 'y' names no file"),
        (["y", "float32", [4], 0, 200, 16], r"idx: a tensors row has 6 fields, expected 7"),
    ],
)
def test_index_row_errors_name_the_tensor(second: list[Any], message: str) -> None:
    from cloudckpt.protocol.records import RankIndex

    rows = [["x", "float32", [4], 0, 100, 16, 1], second]
    with pytest.raises(cloudckpt.CorruptCheckpointError, match=message):
        RankIndex.from_json(_index_doc(rows, _two_tensor_tree()), "idx")


def test_tree_error_is_reported_before_a_row_that_lies_about_its_bytes() -> None:
    """The tree is checked before the tensors' places, whichever check finds a problem first."""
    from cloudckpt.protocol.records import RankIndex

    rows = [["x", "float32", [4], 0, 100, 16, 1], ["y", "float32", [4], 0, 990, 16, 2]]
    tree = {"dict": [["x", {"tensor": 0}], ["y", {"tensor": 5}]]}
    with pytest.raises(cloudckpt.CorruptCheckpointError, match=r"idx: bad tensor value at y$"):
        RankIndex.from_json(_index_doc(rows, tree), "idx")
