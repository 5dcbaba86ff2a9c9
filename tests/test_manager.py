"""CheckpointManager on every storage target: naming, latest, retention, uncommitted leftovers."""

from __future__ import annotations

import pytest
import torch
from stores import StoreTarget

import cloudckpt
from cloudckpt.backends import resolve
from cloudckpt.manager import CheckpointManager, step_name


def _mgr(store: StoreTarget, **kw: object) -> CheckpointManager:
    return CheckpointManager(store.root, storage_options=store.storage_options, **kw)  # type: ignore[arg-type]


def test_save_latest_retention_and_leftovers(store: StoreTarget) -> None:
    backend, root = resolve(store.root, storage_options=store.storage_options)
    # an uncommitted leftover (a save that died) with the highest step number
    leftover = backend.join(root, step_name(99), "data", "rank-00000-0000.safetensors")
    backend.write_object(leftover, [b"x" * 16], 16)
    with _mgr(store, keep_last=2, keep_every=4) as mgr:
        for step in range(1, 7):
            mgr.save(step, {"w": torch.full((4,), float(step)), "step": step})
        assert mgr.steps() == [4, 5, 6]  # keep_last 2 plus every 4th
        assert mgr.latest_step() == 6
        out = mgr.load_latest({"w": torch.zeros(4), "step": None})
        assert out["step"] == 6 and torch.equal(out["w"], torch.full((4,), 6.0))
        assert mgr.load(4)["step"] == 4
    # retention never touched the uncommitted leftover
    assert backend.exists(leftover)
    names = sorted(i.name for i in backend.list_dir(root))
    assert step_name(99) in names and step_name(1) not in names


def test_latest_hint_is_checked_against_the_manifest(store: StoreTarget) -> None:
    backend, root = resolve(store.root, storage_options=store.storage_options)
    with _mgr(store) as mgr:
        mgr.save(3, {"v": 3})
        backend.delete(backend.join(root, "latest"))
        backend.write_object(backend.join(root, "latest"), [b"7"], 1)  # a lying hint
        assert mgr.latest_step() == 3


def test_empty_root_and_bad_arguments(store: StoreTarget) -> None:
    with _mgr(store) as mgr:
        assert mgr.steps() == [] and mgr.latest_step() is None
        with pytest.raises(
            cloudckpt.CheckpointNotFoundError, match="no committed checkpoint under"
        ):
            mgr.load_latest()
    with pytest.raises(ValueError, match="keep_last must be an int >= 1"):
        _mgr(store, keep_last=0)
    with pytest.raises(cloudckpt.ConfigError, match="CheckpointManager needs a root"):
        CheckpointManager()
