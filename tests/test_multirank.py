"""Many ranks, one commit: real forked processes, gloo, TCPStores on 127.0.0.1."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from multirank_harness import rank_state, run_ranks

import cloudckpt

pytestmark = pytest.mark.multirank


def _all_ok(results: dict[int, Any]) -> None:
    for rank, r in results.items():
        assert r["code"] == 0 and r["result"] == {"ok": True}, (rank, r)


@pytest.mark.parametrize("barrier", ["tcp_store", "dist_barrier", "auto"])
def test_every_rank_saves_and_loads_its_shard_locally(tmp_path: Path, barrier: str) -> None:
    root = str(tmp_path / "run")
    _all_ok(run_ranks("save_load", 3, {"root": root, "barrier": barrier}))
    manifest = cloudckpt.checkpoint_reader.open_checkpoint(f"{root}/step-1").manifest
    assert manifest.world_size == 3
    assert [r.index.split("/")[::2] for r in manifest.ranks] == [
        ["index", f"rank-{r:05d}.json"] for r in range(3)
    ]
    assert all(
        r.files and re.fullmatch(rf"data/[^/]+/rank-{r.rank:05d}-\d{{4}}\.safetensors", r.files[0])
        for r in manifest.ranks
    )


@pytest.mark.parametrize("barrier", ["tcp_store", "auto"])
def test_every_rank_saves_through_a_writer_process(tmp_path: Path, barrier: str) -> None:
    """The barrier and the commit run in each rank's writer process; ``auto`` reaches the other
    ranks through the process group's TCPStore address, since the writer has no group."""
    root = str(tmp_path / "run")
    _all_ok(run_ranks("async_process", 2, {"root": root, "barrier": barrier}))
    manifest = cloudckpt.checkpoint_reader.open_checkpoint(f"{root}/step-1").manifest
    assert manifest.world_size == 2


def test_save_per_call_under_a_process_group(tmp_path: Path) -> None:
    """Each call builds a new barrier on the group's store: it must not meet an earlier one's keys."""
    root = str(tmp_path / "run")
    _all_ok(run_ranks("save_per_call", 3, {"root": root, "barrier": "auto"}))
    assert cloudckpt.checkpoint_reader.open_checkpoint(f"{root}/step-2").manifest.world_size == 3


def test_world_size_mismatch_needs_an_explicit_rank(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    _all_ok(run_ranks("save_load", 2, {"root": root, "saves": 1}))
    with pytest.raises(
        cloudckpt.CheckpointError, match=r"saved by 2 rank\(s\) but this job has 1: pass rank=N"
    ):
        cloudckpt.load(f"{root}/step-0")
    out = cloudckpt.load(f"{root}/step-0", rank=1)
    assert out["rank"] == 1 and torch.equal(out["shard"][0], rank_state(1)["shard"][0])
    with pytest.raises(cloudckpt.CheckpointError, match=r"rank 5 is not among them"):
        cloudckpt.load(f"{root}/step-0", rank=5)


def test_a_failing_rank_fails_every_rank_at_once(tmp_path: Path) -> None:
    results = run_ranks(
        "one_rank_raises", 4, {"root": str(tmp_path), "bad_rank": 2, "timeout": 600}, timeout=300
    )
    bad = results[2]["result"]
    assert (
        bad["type"] == "UnsupportedValueError"
        and bad["error"] == "extra.fn: cannot save a function"
    )
    for rank in (0, 1, 3):
        r = results[rank]["result"]
        assert r["type"] == "BarrierError"
        assert r["error"].startswith(
            "checkpoint save failed on rank(s) [2]: rank 2: UnsupportedValueError"
        )
        assert r["secs"] < 200  # learned at the barrier, not after the 600 s timeout
    assert not (tmp_path / "bad" / "manifest.json").exists()


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_fails_the_others_after_the_timeout(tmp_path: Path, victim: int) -> None:
    results = run_ranks(
        "one_rank_killed", 3, {"root": str(tmp_path), "victim": victim, "timeout": 3}
    )
    assert results[victim]["code"] == -9
    for rank in {0, 1, 2} - {victim}:
        r = results[rank]["result"]
        assert r["type"] == "BarrierError", r
        if victim == 1:
            assert f"ranks [{victim}] did not reach the checkpoint barrier within 3 s" in r["error"]
            assert r["secs"] >= 3
        else:  # rank 0 hosts the store: the others see it vanish
            assert "rank 0, probably died" in r["error"] or "ranks [0] did not reach" in r["error"]
    assert not (tmp_path / "killed" / "manifest.json").exists()


@pytest.mark.s3
def test_multi_rank_save_on_s3(request: pytest.FixtureRequest) -> None:
    store = request.getfixturevalue("s3_moto_store")
    args = {
        "root": store.uri("run"),
        "storage_options": store.storage_options,
        "barrier": "tcp_store",
    }
    _all_ok(run_ranks("save_load", 3, args))
    ckpt = cloudckpt.checkpoint_reader.open_checkpoint(
        store.uri("run", "step-1"), store.backend, store.storage_options
    )
    assert ckpt.manifest.world_size == 3


def test_no_barrier_with_several_ranks_is_a_config_error(tmp_path: Path) -> None:
    ckpt = cloudckpt.make_sync_checkpointer(rank_info=cloudckpt.RankInfo(1, 2))
    with pytest.raises(cloudckpt.ConfigError, match=r"rank 1 of 2 has no barrier"):
        ckpt.save(str(tmp_path / "c"), {"x": torch.ones(1)})
    assert not (tmp_path / "c").exists()
    ckpt.close()
