"""Global leaves in one process: replicated leaves from a config file, partial reads verified
block by block, mismatches and damage reported, export between stores."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from stores import StoreTarget

import cloudckpt
from cloudckpt.committed import open_checkpoint
from cloudckpt.format.chunks import Box
from cloudckpt.global_reader import GlobalRequest, fetch_globals, load_catalog

ROWS = 40000  # 16 float32 columns: 64-byte rows, 16384 rows per checksum block, 3 blocks


def _save_big(uri: str) -> torch.Tensor:
    w = torch.randn(ROWS, 16, generator=torch.Generator().manual_seed(3))
    cloudckpt.save(uri, {"w": w, "step": 4, "lr": 0.1}, replicated=["w", "step"])
    return w


def test_replicated_leaves_from_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[writer]\nreplicated = ["**"]\n')
    sd = {"m": {"w": torch.ones(3)}, "n": 5}
    cloudckpt.save(str(tmp_path / "a"), sd, config=cfg)
    index = open_checkpoint(str(tmp_path / "a")).read_index(0)
    assert [(g.key, g.kind) for g in index.globals] == [("m.w", "replicated")]
    assert index.tree["dict"][1] == ["n", {"replicated": {"int": 5}}]
    out = cloudckpt.load(str(tmp_path / "a"))
    assert out["n"] == 5 and torch.equal(out["m"]["w"], torch.ones(3))
    cfg.write_text('[writer]\nfile_size = "1MiB"\nreplicated = "**"\n')
    with pytest.raises(cloudckpt.ConfigError) as e:
        cloudckpt.load_config(cfg)
    assert str(e.value) == f"{cfg}:3: [writer] replicated: expected list, got str '**'"
    cfg.write_text('[writer]\nreplicated = ["a.*", 3]\n')
    with pytest.raises(cloudckpt.ConfigError) as e:
        cloudckpt.load_config(cfg)
    assert str(e.value) == (
        f"{cfg}:1: [writer] replicated: every pattern must be a non-empty string, got 3"
    )


def test_a_partial_read_reads_and_verifies_only_the_blocks_it_needs(tmp_path: Path) -> None:
    uri = str(tmp_path / "ck")
    w = _save_big(uri)
    ckpt = open_checkpoint(uri)
    index = ckpt.read_index(0)
    (g,) = index.globals
    (chunk,) = g.chunks
    assert (chunk.block_rows, len(chunk.crcs)) == (16384, 3)
    # damage one byte of the last block
    rec = index.tensors[chunk.tensor]
    path = tmp_path / "ck" / index.files[rec.file].path
    raw = bytearray(path.read_bytes())
    raw[rec.offset + 35000 * 64 + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with ThreadPoolExecutor(2) as pool:
        catalog = load_catalog(ckpt, {0: index}, pool)
        dest = torch.empty(100, 16)
        read = fetch_globals(
            ckpt, [GlobalRequest(g, Box((20000, 0), (100, 16)), dest)], catalog, pool
        )
        assert torch.equal(dest, w[20000:20100])
        assert read == 16384 * 64  # one block, not the whole chunk
        with pytest.raises(cloudckpt.CorruptCheckpointError) as e:
            fetch_globals(
                ckpt, [GlobalRequest(g, Box((0, 0), (ROWS, 16)), torch.empty(ROWS, 16))], catalog,
                pool,
            )  # fmt: skip
    assert str(e.value) == (
        f"{path}: CRC32C mismatch in global leaf 'w', chunk at offsets [0, 0], rows "
        "32768..40000; the file is damaged. Load an earlier checkpoint."
    )


def test_a_global_leaf_into_a_target_of_another_shape_raises(tmp_path: Path) -> None:
    uri = str(tmp_path / "ck")
    _save_big(uri)
    with pytest.raises(cloudckpt.StateDictMismatchError) as e:
        cloudckpt.load(uri, {"w": torch.zeros(ROWS, 8)})
    assert str(e.value) == (
        f"w: the target is (40000, 8) torch.float32 but {uri} holds a global tensor of "
        "(40000, 16) torch.float32; reshape or recast the target to match (shape and dtype "
        "mismatches always raise)"
    )
    target = {"w": torch.zeros(ROWS, 16), "step": 0, "lr": 0.0}
    cloudckpt.load(uri, target, strict=True)
    assert target["step"] == 4 and target["lr"] == 0.1


def test_export_from_local_to_s3(tmp_path: Path, s3_moto_store: StoreTarget) -> None:
    from safetensors.torch import load

    from cloudckpt.cli import main
    from cloudckpt.storage import resolve

    uri = str(tmp_path / "ck")
    w = _save_big(uri)
    dst = s3_moto_store.uri("export")
    options = [
        f"--storage-option={k}={json.dumps(v)}" for k, v in s3_moto_store.storage_options.items()
    ]
    assert main(["export", uri, dst, *options]) == 0
    backend, root = resolve(dst, storage_options=s3_moto_store.storage_options)
    index = json.loads(backend.read_bytes(backend.join(root, "model.safetensors.index.json")))
    assert index["weight_map"] == {"w": "model-00001-of-00001.safetensors"}
    out = load(backend.read_bytes(backend.join(root, "model-00001-of-00001.safetensors")))
    assert torch.equal(out["w"], w)


def test_replicated_must_be_a_list_of_patterns(tmp_path: Path) -> None:
    with pytest.raises(cloudckpt.ConfigError) as e:
        cloudckpt.save(str(tmp_path / "a"), {"w": torch.ones(2)}, replicated="**")  # type: ignore[arg-type]
    assert str(e.value) == (
        "replicated= must be a list of glob patterns over key paths (e.g. ['**'] or "
        "['optim.state.*.step']), got '**'"
    )
    assert not (tmp_path / "a").exists()


def test_a_hostile_global_index_is_refused(tmp_path: Path) -> None:
    """Overlapping or misplaced chunks, bad rows: corruption, never a hole or a stray error."""
    from cloudckpt.format.chunks import ChunkRecord, GlobalRecord
    from cloudckpt.global_reader import Catalog, StoredChunk, plan_reads

    g = GlobalRecord("w", "float32", [10, 2], "dtensor")
    chunks = [ChunkRecord(0, [0, 0], [6, 2], 6, [0]), ChunkRecord(1, [4, 0], [6, 2], 6, [0])]
    catalog = Catalog({"w": g}, {"w": [StoredChunk(0, c, "f", 8) for c in chunks]})
    request = GlobalRequest(g, Box((0, 0), (10, 2)), torch.empty(10, 2))
    with pytest.raises(cloudckpt.CorruptCheckpointError, match="two stored chunks overlap"):
        plan_reads([request], catalog, "ck")
    catalog.chunks["w"] = catalog.chunks["w"][:1]
    with pytest.raises(cloudckpt.CorruptCheckpointError, match="do not cover offsets"):
        plan_reads([request], catalog, "ck")
    for row in (["w", "float32", [10, 2], "dtensor"], ["w", "f", ["10"], "dtensor", []], 7):
        with pytest.raises(cloudckpt.CorruptCheckpointError, match="ck: "):
            GlobalRecord.from_row(row, "ck")
    bad = GlobalRecord("w", "float32", [10, 2], "dtensor", [ChunkRecord(0, [8, 0], [6, 2], 6, [0])])
    with pytest.raises(cloudckpt.CorruptCheckpointError, match="does not fit its shape"):
        bad.validate("ck", [])
