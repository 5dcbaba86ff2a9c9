"""Code written for torch.distributed.checkpoint._experimental runs with cloudckpt in its place."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint._experimental as seed

import cloudckpt


def test_every_seed_name_is_exported() -> None:
    missing = [name for name in seed.__all__ if not hasattr(cloudckpt, name)]
    assert missing == []
    assert set(seed.__all__) <= set(cloudckpt.__all__)


SIGNATURES = [
    "make_sync_checkpointer",
    "make_async_checkpointer",
    "CheckpointWriter.__init__",
    "CheckpointWriter.write",
    "CheckpointReader.__init__",
    "CheckpointReader.read",
    "SyncCheckpointer.__init__",
    "SyncCheckpointer.save",
    "SyncCheckpointer.load",
    "AsyncCheckpointer.save",
    "AsyncCheckpointer.load",
    "TCPStoreBarrier.__init__",
    "WriterHook.pre_commit",
    "WriterHook.post_commit",
    "create_barrier_from_config",
    "wrap_future",
]


def _resolve(module: ModuleType, dotted: str) -> Any:
    obj: Any = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", SIGNATURES)
def test_seed_calls_bind_to_our_signatures(name: str) -> None:
    """Every parameter the seed accepts, ours accepts under the same name and position."""
    ours = inspect.signature(_resolve(cloudckpt, name)).parameters
    theirs = inspect.signature(_resolve(seed, name)).parameters
    for i, (pname, p) in enumerate(theirs.items()):
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        assert pname in ours, f"{name}: seed parameter {pname!r} missing"
        if p.kind == p.POSITIONAL_OR_KEYWORD:
            assert list(ours)[i] == pname, f"{name}: {pname!r} is not at position {i}"


def test_dataclass_fields_are_a_superset() -> None:
    for cls in ("CheckpointWriterConfig", "CheckpointerConfig", "BarrierConfig",
                "CheckpointStagerConfig", "RankInfo"):  # fmt: skip
        theirs = set(getattr(seed, cls).__dataclass_fields__)
        ours = set(getattr(cloudckpt, cls).__dataclass_fields__)
        assert theirs <= ours, (cls, theirs - ours)


def seed_style_program(m: Any, root: str) -> dict[str, Any]:
    """Written for the seed module; run with ``m`` = cloudckpt."""
    rank_info = m.RankInfo(global_rank=0, global_world_size=1)
    writer = m.CheckpointWriter(config=m.CheckpointWriterConfig(), rank_info=rank_info)
    reader = m.CheckpointReader(rank_info=rank_info)
    ckpt = m.SyncCheckpointer(writer=writer, reader=reader)
    sd: m.STATE_DICT = {"w": torch.arange(4.0), "step": 3}
    ckpt.save(root, sd)
    target = {"w": torch.zeros(4)}
    loaded = ckpt.load(root, target, default_map_location="cpu", strict=True)
    full, missing = reader.read(root)
    ckpt.close()
    assert missing == []
    return {"partial": loaded, "full": full}


def test_seed_style_program_runs_unchanged(tmp_path: Path) -> None:
    out = seed_style_program(cloudckpt, str(tmp_path / "c"))
    assert torch.equal(out["partial"]["w"], torch.arange(4.0))
    assert out["full"]["step"] == 3
