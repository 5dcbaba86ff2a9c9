"""Seeded fuzzing of the stored objects: mutated manifests, indexes and safetensors headers.

Each mutation replaces one value somewhere in one document with a hostile one (non-finite or huge
numbers, wrong types, NUL bytes, escaping paths, deep nesting) or drops a key, keeps the
checksums that cover the document consistent where it can (so the parser, not the checksum, must
refuse it), then loads, verifies and lists the checkpoint. Only documented exceptions (the
``CheckpointError`` hierarchy) may leave the library, and no mutation may make it allocate more
than a small bound (Python allocations, measured with tracemalloc).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import cloudckpt
from cloudckpt.format.encoding import crc32c
from cloudckpt.manager import CheckpointRoot
from cloudckpt.protocol.records import manifest_crc

SEED = 1313
MUTATIONS_PER_KIND = 110  # manifest, index, header: 330 in all
DEFAULT_MUTATIONS = (
    40  # the first 40 of each kind's seeded sequence in the default run; the rest: slow
)
PEAK_BYTES = 64 << 20

RAW = "__RAW_JSON__"
HOSTILE: list[Any] = [
    ("raw", "Infinity"),
    ("raw", "-Infinity"),
    ("raw", "NaN"),
    ("raw", "1e999"),
    ("raw", "[" * 50_000 + "]" * 50_000),
    ("raw", "{" + '"a":{' * 5_000 + "}" * 5_001),
    2**63,
    -(2**63),
    10**12,
    100_000_000,
    -1,
    0,
    0.5,
    True,
    None,
    "",
    "\x00",
    "a\x00b",
    "../../payload.bin",
    "/etc/hostname",
    "s3://bucket/x",
    "x" * 100_000,
    [],
    {},
    [1, 2, 3],
    {"pickle": "gASV"},
    {"dict": [["k", {"object": 1}]]},
]


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position in ``doc`` (dict keys and list indexes), depth first."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(doc: Any, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of the JSON document ``doc``: its new bytes and a description."""
    doc = json.loads(json.dumps(doc))
    paths = _paths(doc)
    path = rng.choice(paths)
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    leaf = path[-1]
    if isinstance(parent, dict) and rng.random() < 0.1:
        del parent[leaf]
        return json.dumps(doc).encode(), f"drop {path}"
    value = rng.choice(HOSTILE)
    if isinstance(value, tuple):
        parent[leaf] = RAW
        text = json.dumps(doc).replace(f'"{RAW}"', value[1], 1)
        return text.encode(), f"{path} = {value[1][:20]}"
    parent[leaf] = value
    return json.dumps(doc).encode(), f"{path} = {str(value)[:20]!r}"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "run"
    g = torch.Generator().manual_seed(0)
    sd = {
        "model": {"w": torch.randn(64, 8, generator=g), "b": torch.randn(8, generator=g)},
        "opt": {"lr": 0.1, "betas": (0.9, 0.99), "steps": [1, 2, 3], "name": "adam"},
        "blob": b"\x00\x01",
        "half": torch.ones(16, dtype=torch.float16),
    }
    cfg = cloudckpt.CheckpointerConfig(
        writer_config=cloudckpt.CheckpointWriterConfig(file_size=1024, concurrency=1)
    )
    with cloudckpt.CheckpointManager(str(root), config=cfg) as mgr:
        mgr.save(1, sd)
        mgr.save(2, sd)
    return root


def _exercise(root: Path) -> None:
    """Everything that reads stored objects: listing, load, verify."""
    listing = CheckpointRoot(str(root))
    listing.steps()
    listing.latest()
    uri = str(root / "step-0000000002")
    failure: cloudckpt.CheckpointError | None = None
    try:
        cloudckpt.load(uri)
    except cloudckpt.CheckpointError as e:
        failure = e
    problems = cloudckpt.verify(uri).problems
    if failure is not None and not problems:
        raise AssertionError(f"load refused ({failure}) but verify found nothing")
    if failure is not None:
        raise failure


def _index_mutation(ck: Path, rng: random.Random) -> str:
    manifest = json.loads((ck / "manifest.json").read_text())
    entry = manifest["ranks"][0]
    index_path = ck / entry["index"]
    raw, what = _mutate(json.loads(index_path.read_bytes()), rng)
    index_path.write_bytes(raw)
    entry["size"], entry["crc32c"] = len(raw), crc32c(raw)  # checksums made to match
    (ck / "manifest.json").write_bytes(_with_manifest_crc(json.dumps(manifest).encode()))
    return f"index {what}"


def _with_manifest_crc(raw: bytes) -> bytes:
    """``raw`` with the manifest's own CRC32C made to match, where the document allows it (so
    the field checks, not the checksum, must refuse the mutation)."""
    try:
        doc = json.loads(raw)
        doc.pop("crc32c", None)
        doc["crc32c"] = manifest_crc(doc)
    except Exception:  # NaN, deep nesting, a non-object: only the parser can refuse it
        return raw
    return json.dumps(doc, indent=1).encode()


def _manifest_mutation(ck: Path, rng: random.Random) -> str:
    raw, what = _mutate(json.loads((ck / "manifest.json").read_text()), rng)
    (ck / "manifest.json").write_bytes(_with_manifest_crc(raw))
    return f"manifest {what}"


def _header_mutation(ck: Path, rng: random.Random) -> str:
    data = sorted((ck / "data").rglob("*.safetensors"))
    target = rng.choice(data)
    blob = target.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    raw, what = _mutate(json.loads(blob[8 : 8 + n]), rng)
    target.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])
    return f"header of {target.name} {what}"


MUTATORS: dict[str, Callable[[Path, random.Random], str]] = {
    "manifest": _manifest_mutation,
    "index": _index_mutation,
    "header": _header_mutation,
}


@pytest.mark.parametrize("kind", sorted(MUTATORS))
@pytest.mark.parametrize("part", ["first", pytest.param("rest", marks=pytest.mark.slow)])
def test_fuzzed_objects_raise_only_documented_errors(
    pristine: Path, tmp_path: Path, kind: str, part: str
) -> None:
    """``first``: mutations [0, DEFAULT_MUTATIONS) of the kind's seeded sequence; ``rest``
    (slow): the others up to MUTATIONS_PER_KIND, after replaying the first ones unexercised so
    the sequence is the same one."""
    start, stop = (
        (0, DEFAULT_MUTATIONS) if part == "first" else (DEFAULT_MUTATIONS, MUTATIONS_PER_KIND)
    )
    rng = random.Random(f"{SEED}-{kind}")
    escaped: list[str] = []
    refused = 0
    for n in range(stop):
        root = tmp_path / f"m{n}"
        shutil.copytree(pristine, root)
        what = MUTATORS[kind](root / "step-0000000002", rng)
        if n < start:  # replayed for the rng's sake only
            shutil.rmtree(root)
            continue
        tracemalloc.start()
        try:
            _exercise(root)
        except cloudckpt.CheckpointError:
            refused += 1
        except BaseException as e:  # anything else escaped the library
            escaped.append(f"{what}: {type(e).__name__}: {str(e)[:120]}")
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak < PEAK_BYTES, f"{what}: peak {peak} bytes"
        shutil.rmtree(root)
    assert escaped == []
    assert refused > (stop - start) // 4, refused  # the mutations do reach the parsers


def _rewrite_index(ck: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((ck / "manifest.json").read_text())
    entry = manifest["ranks"][0]
    index = json.loads((ck / entry["index"]).read_text())
    change(index)
    raw = json.dumps(index).encode()
    (ck / entry["index"]).write_bytes(raw)
    entry["size"], entry["crc32c"] = len(raw), crc32c(raw)  # checksums made to match
    (ck / "manifest.json").write_bytes(_with_manifest_crc(json.dumps(manifest).encode()))


def test_a_nul_byte_in_a_name_is_corruption_for_load_and_verify(tmp_path: Path) -> None:
    uri = str(tmp_path / "ck")
    cloudckpt.save(uri, {"x": torch.ones(4)})

    def nul(index: dict[str, Any]) -> None:
        index["files"][0][0] = "data/a\x00b"

    _rewrite_index(tmp_path / "ck", nul)
    expected = "object name 'data/a\\x00b' contains a NUL byte; every name in a manifest or index"
    with pytest.raises(cloudckpt.CorruptCheckpointError, match=re.escape(expected)):
        cloudckpt.load(uri)
    problems = cloudckpt.verify(uri).problems
    assert any(expected in p for p in problems), problems


def test_a_tensor_claiming_more_than_memory_is_corruption(tmp_path: Path) -> None:
    uri = str(tmp_path / "ck")
    cloudckpt.save(uri, {"x": torch.ones(4)})
    huge = 1 << 59  # float32 elements: 2 EiB, more than any machine

    def grow(index: dict[str, Any]) -> None:
        index["files"][0][1] = 8 + huge * 4 + 4096
        rec = index["tensors"][0]
        rec[2], rec[5] = [huge], huge * 4

    _rewrite_index(tmp_path / "ck", grow)
    tracemalloc.start()
    try:
        with pytest.raises(
            cloudckpt.CorruptCheckpointError,
            match=r"tensor 'x' claims shape \[576460752303423488\] .*cannot be allocated",
        ):
            cloudckpt.load(uri)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < PEAK_BYTES
