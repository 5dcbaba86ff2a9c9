"""CheckpointManager on every storage target: naming, latest, retention, uncommitted leftovers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from config_files import write_store_config
from stores import StoreTarget

import cloudckpt
from cloudckpt.manager import (
    AsyncCheckpointManager,
    AsyncSave,
    CheckpointManager,
    retained,
    step_name,
)
from cloudckpt.storage import resolve


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


def _async_mgr(store: StoreTarget, **kw: object) -> AsyncCheckpointManager:
    return AsyncCheckpointManager(store.root, storage_options=store.storage_options, **kw)  # type: ignore[arg-type]


def test_sync_save_returns_the_uri(store: StoreTarget) -> None:
    with _mgr(store) as mgr:
        uri = mgr.save(1, {"v": 1})
        assert uri == mgr.uri(1) and isinstance(uri, str)


def test_async_save_runs_retention_after_the_commit(store: StoreTarget) -> None:
    with _async_mgr(store, keep_last=2) as mgr:
        saves = []
        for step in range(1, 6):
            sd = {"w": torch.full((8,), float(step)), "step": step}
            started = mgr.save(step, sd)
            assert isinstance(started, AsyncSave) and started.step == step
            started.staged.result()
            sd["w"].add_(100)  # the trainer goes on; the staged copy is saved
            saves.append(started)
        assert [s.result(timeout=60) for s in saves] == [mgr.uri(s) for s in range(1, 6)]
        assert [s.uri for s in saves] == [mgr.uri(s) for s in range(1, 6)]
        assert mgr.steps() == [4, 5] and mgr.latest_step() == 5
        out = mgr.load_latest()
        assert out["step"] == 5 and torch.equal(out["w"], torch.full((8,), 5.0))


def test_async_save_error_surfaces_on_the_commit_future_and_once_from_close(
    store: StoreTarget,
) -> None:
    mgr = _async_mgr(store)
    mgr.save(1, {"v": 1}).result(timeout=60)
    started = mgr.save(1, {"v": 2})
    with pytest.raises(cloudckpt.CheckpointExistsError, match="step-0000000001"):
        started.committed.result(timeout=60)
    with pytest.raises(cloudckpt.CheckpointExistsError, match="step-0000000001"):
        mgr.wait_until_finished()
    assert mgr.load(1)["v"] == 1
    with pytest.raises(cloudckpt.CheckpointExistsError, match="step-0000000001"):
        mgr.close()  # the last save's error, not reported by a later save
    mgr.close()  # once


def test_the_deprecated_async_save_flag_still_returns_the_pair(store: StoreTarget) -> None:
    with pytest.warns(
        DeprecationWarning,
        match=r"CheckpointManager\(async_save=True\) is deprecated: use cloudckpt.AsyncCheckpointManager",
    ):
        mgr = _mgr(store, async_save=True)
    with mgr:
        stage_f, commit_f = mgr.save(1, {"v": 1})  # type: ignore[misc]
        stage_f.result()
        assert commit_f.result(timeout=60) == mgr.uri(1)


def test_root_from_config_any_width_and_nothing_outside_the_root(
    store: StoreTarget, tmp_path: Path
) -> None:
    # a committed checkpoint beside the root whose name shares its prefix must survive
    sibling = store.root.rstrip("/") + "-sibling/" + step_name(1)
    cloudckpt.save(sibling, {"x": 1}, storage_options=store.storage_options)
    cloudckpt.save(store.uri("step-7"), {"x": 7}, storage_options=store.storage_options)
    cfg = write_store_config(tmp_path / "c.toml", store)
    with CheckpointManager(config=str(cfg), keep_last=1) as mgr:
        assert mgr.root == store.root.rstrip("/")
        assert mgr.steps() == [7] and mgr.load(7)["x"] == 7  # an unpadded name is parsed
        mgr.save(8, {"x": 8})
        assert mgr.steps() == [8]
    assert cloudckpt.load(sibling, storage_options=store.storage_options)["x"] == 1


def test_retained_policy() -> None:
    steps = [1, 2, 3, 4, 5, 10, 11]
    assert retained(steps, None, None) == set(steps)
    assert retained(steps, 2, None) == {10, 11}
    assert retained(steps, None, 5) == {5, 10, 11}  # the newest always stays
    assert retained(steps, 1, 2) == {2, 4, 10, 11}
    assert retained([], 1, None) == set()
