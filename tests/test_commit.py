"""The commit against real processes, a real moto server and the fault proxy: racing saves,
lost answers, SIGKILL during an overwrite, atomic replace per backend, multipart hygiene."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import FaultProxy
from layout_helpers import all_objects
from multirank_harness import race_state, run_ranks
from stores import StoreTarget
from stores.s3 import S3Server

import cloudckpt
from cloudckpt.protocol import list_orphans, open_checkpoint
from cloudckpt.storage import resolve


def _state(n: int) -> dict[str, Any]:
    return race_state(n)


def _race(uri: str, sync: Path, opts: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """Two one-rank jobs (forked processes) save states 1 and 2 to ``uri`` at the same moment."""
    sync.mkdir()
    ranks = run_ranks(
        "race_first_save", 2, {"uri": uri, "sync": str(sync), "storage_options": opts}, timeout=300
    )
    results = []
    for rank in (0, 1):
        assert ranks[rank]["code"] == 0, ranks[rank]
        results.append(ranks[rank]["result"])
    winners = [n for n, r in zip((1, 2), results) if r["ok"]]
    assert len(winners) == 1, results
    return winners[0], results


def _check_race(store: StoreTarget, uri: str, trials: int, tmp_path: Path) -> None:
    opts = store.storage_options
    raced = 0
    for trial in range(trials):
        u = f"{uri}-{trial}"
        winner, results = _race(u, tmp_path / f"sync-{trial}", opts)
        loser = next(r for r in results if not r["ok"])
        assert re.search(
            r"another save committed .* first, while this save ran; this save's objects were "
            r"removed|a committed checkpoint is already at",
            loser["error"],
        ), loser
        raced += "another save committed" in loser["error"]
        out = cloudckpt.load(u, storage_options=opts)
        want = _state(winner)
        assert out["n"] == winner and torch.equal(out["t"], want["t"])
        assert torch.equal(out["u"], want["u"])
        assert cloudckpt.verify(u, storage_options=opts).ok
        backend, path = resolve(u, storage_options=opts)
        assert list_orphans(backend, path, u)[1] == []  # the loser removed its own objects
    logging.getLogger(__name__).info("%d of %d trials raced to the commit", raced, trials)


def test_two_concurrent_first_saves_local(tmp_path: Path) -> None:
    _check_race(StoreTarget("local", str(tmp_path)), str(tmp_path / "c"), 2, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_concurrent_first_saves_local_stress(tmp_path: Path) -> None:
    _check_race(StoreTarget("local", str(tmp_path)), str(tmp_path / "c"), 10, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.s3
def test_two_concurrent_first_saves_s3_stress(s3_moto_store: StoreTarget, tmp_path: Path) -> None:
    _check_race(s3_moto_store, s3_moto_store.uri("c"), 10, tmp_path)


# -- lost answers --------------------------------------------------------------------------------


@pytest.fixture
def proxy(moto_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server.host, moto_server.port) as p:
        yield p


@pytest.mark.s3
@pytest.mark.parametrize("overwrite", [False, True])
def test_lost_answer_on_the_manifest_put_is_read_back(
    moto_server: S3Server, proxy: FaultProxy, caplog: pytest.LogCaptureFixture, overwrite: bool
) -> None:
    bucket = moto_server.new_bucket()
    uri = f"s3://{bucket}/c"
    opts = moto_server.options(proxy.url)
    if overwrite:
        cloudckpt.save(uri, _state(1), storage_options=opts)
    seen_before = len(proxy.seen)
    proxy.inject(drop_answer=True, times=1, method="PUT", path_re=r"/c/manifest\.json")
    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        cloudckpt.save(uri, _state(2), storage_options=opts, overwrite=overwrite)
    manifest_puts = [
        s for s in proxy.seen[seen_before:] if s.method == "PUT" and "manifest.json" in s.path
    ]
    assert [s.fault for s in manifest_puts] == ["drop_answer", None]  # stored, unanswered, retried
    assert "the manifest read back names this save" in caplog.text or "confirmed by reading" in (
        caplog.text
    )
    out = cloudckpt.load(uri, storage_options=opts)
    assert out["n"] == 2 and torch.equal(out["t"], _state(2)["t"])
    assert cloudckpt.verify(uri, storage_options=opts).ok
    backend, path = resolve(uri, storage_options=opts)
    assert list_orphans(backend, path, uri)[1] == []  # the replaced objects are gone too


@pytest.mark.s3
def test_lost_create_multipart_answer_leaves_no_upload(
    moto_server: S3Server, proxy: FaultProxy
) -> None:
    bucket = moto_server.new_bucket()
    uri = f"s3://{bucket}/c"
    opts = moto_server.options(proxy.url, part_size=5 << 20, multipart_threshold=5 << 20)
    state = {"big": torch.arange(3 << 20, dtype=torch.float32)}  # 12 MiB: 3 parts
    proxy.inject(drop_answer=True, times=1, method="POST", path_re=r"\?uploads")
    cloudckpt.save(uri, state, storage_options=opts)
    creates = [s for s in proxy.seen if s.method == "POST" and "uploads" in s.path]
    assert [s.fault for s in creates][:2] == ["drop_answer", None]
    assert "Uploads" not in moto_server.client().list_multipart_uploads(Bucket=bucket)
    assert torch.equal(cloudckpt.load(uri, storage_options=opts)["big"], state["big"])


@pytest.mark.s3
def test_botocore_retries_are_off_even_when_configured(moto_server: S3Server) -> None:
    opts = moto_server.options(config_kwargs={"retries": {"max_attempts": 10}})
    backend, _ = resolve(f"s3://{moto_server.new_bucket()}/x", storage_options=opts)
    client_config = backend.fs.config_kwargs  # type: ignore[attr-defined]
    assert client_config["retries"] == {"total_max_attempts": 1, "mode": "standard"}


# -- atomic replace per backend ------------------------------------------------------------------


def _replace_checks(store: StoreTarget) -> None:
    backend, path = resolve(store.uri("obj"), storage_options=store.storage_options)
    assert backend.read_version(path) is None
    backend.put_create_only(path, b"one")
    v1 = backend.read_version(path)
    assert v1 is not None and v1.data == b"one"
    backend.put_replace(path, b"two", v1.version)
    v2 = backend.read_version(path)
    assert v2 is not None and v2.data == b"two" and v2.version != v1.version
    if backend.conditional_replace:
        with pytest.raises(FileExistsError):
            backend.put_replace(path, b"three", v1.version)  # someone replaced it meanwhile
        assert backend.read_bytes(path) == b"two"


def test_replace_is_conditional_on_local(tmp_path: Path) -> None:
    store = StoreTarget("local", str(tmp_path))
    backend, path = resolve(store.uri("obj"))
    backend.put_create_only(path, b"one")
    v1 = backend.read_version(path)
    assert v1 is not None
    time.sleep(0.01)
    backend.put_replace(path, b"two", v1.version)
    with pytest.raises(FileExistsError):
        backend.put_replace(path, b"three", v1.version)
    assert Path(path).read_bytes() == b"two"
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


@pytest.mark.s3
def test_replace_is_conditional_on_moto(s3_moto_store: StoreTarget) -> None:
    _replace_checks(s3_moto_store)


@pytest.mark.gcs
def test_replace_is_conditional_on_gcs(gcs_store: StoreTarget) -> None:
    _replace_checks(gcs_store)


@pytest.mark.s3
def test_replace_on_seaweedfs(s3_seaweed_store: StoreTarget) -> None:
    """SeaweedFS: see docs/backends/s3.md for whether it honours If-Match on PUT."""
    _replace_checks(s3_seaweed_store)


# -- SIGKILL at random points of an overwrite ------------------------------------------------------


def _big_state(n: int) -> dict[str, Any]:
    return {"n": n, "t": torch.full((400_000,), float(n)), "u": torch.arange(n, n + 1000)}


def _kill_overwrites(store: StoreTarget, trials: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    opts = store.storage_options
    found = []
    # one unkilled run measures how long the overwrite takes after "ready"
    durations: list[float] = []
    scratch = tempfile.TemporaryDirectory(prefix="cloudckpt-kill-")
    sync = Path(scratch.name)
    for trial in range(trials + 1):
        uri = store.uri(f"k{trial}")
        cloudckpt.save(uri, _big_state(1), storage_options=opts)
        # a forked process overwrites with state 2; from trial 1 on, a second one SIGKILLs it
        args = {"uri": uri, "storage_options": opts, "ready": str(sync / f"ready-{trial}")}
        if trial == 0:
            (r,) = run_ranks("overwrite_killed", 1, args).values()
            assert r["code"] == 0 and r["result"]["ok"], r
            durations.append(r["result"]["secs"])
        else:
            args["delay"] = rng.uniform(0, durations[0] * 1.2)
            ranks = run_ranks("overwrite_killed", 2, args)
            assert ranks[1]["code"] == 0, ranks[1]
            assert ranks[0]["code"] == -9, ranks[0]  # killed mid-save or, done, waiting
        out = cloudckpt.load(uri, storage_options=opts)  # never "not committed"
        n = out["n"]
        assert n in (1, 2)
        want = _big_state(n)
        assert torch.equal(out["t"], want["t"]) and torch.equal(out["u"], want["u"])
        assert cloudckpt.verify(uri, storage_options=opts).ok
        found.append(n)
        m = open_checkpoint(uri, None, opts).manifest
        assert m.metadata == {}
    scratch.cleanup()
    return found


def test_sigkill_during_overwrite_leaves_old_or_new_local(tmp_path: Path) -> None:
    found = _kill_overwrites(StoreTarget("local", str(tmp_path)), 3, seed=1)
    assert found[0] == 2


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_during_overwrite_leaves_old_or_new_local_stress(tmp_path: Path) -> None:
    found = _kill_overwrites(StoreTarget("local", str(tmp_path)), 12, seed=2)
    assert found[0] == 2


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.s3
def test_sigkill_during_overwrite_leaves_old_or_new_s3(s3_moto_store: StoreTarget) -> None:
    found = _kill_overwrites(s3_moto_store, 10, seed=3)
    assert found[0] == 2


# -- gc ------------------------------------------------------------------------------------------


def _age(root: Path, seconds: float) -> None:
    past = time.time() - seconds
    for p in root.rglob("*"):
        os.utime(p, (past, past))


def _orphan(ckpt: Path, attempt: str = "20260101T000000Z-0123456789ab") -> None:
    d = ckpt / "data" / attempt
    d.mkdir(parents=True)
    (d / "rank-00000-0000.safetensors").write_bytes(b"x" * 100)


def test_cli_gc_removes_aged_orphans_of_a_committed_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "run"
    ck = root / "step-0000000001"
    cloudckpt.save(str(ck), {"x": torch.arange(5)})
    named = all_objects(ck)
    _orphan(ck)

    def gc(*extra: str) -> dict[str, Any]:
        r = subprocess.run(
            [sys.executable, "-m", "cloudckpt", "gc", str(root), "--json", *extra],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    doc = gc("--older-than", "1h")
    assert doc["removed"] == [] and "younger than --older-than" in doc["skipped"][0]["reason"]
    assert "orphan of a committed checkpoint" in doc["skipped"][0]["reason"]
    _age(ck / "data" / "20260101T000000Z-0123456789ab", 7200)
    doc = gc("--older-than", "1h", "--dry-run")
    assert len(doc["removed"]) == 1 and len(all_objects(ck)) == len(named) + 1
    doc = gc("--older-than", "1h")
    [removed] = doc["removed"]
    assert removed["step"] == 1 and "attempt 20260101T000000Z-0123456789ab" in removed["reason"]
    assert removed["objects"] == [
        str(ck / "data" / "20260101T000000Z-0123456789ab" / "rank-00000-0000.safetensors")
    ]
    assert all_objects(ck) == named
    assert torch.equal(cloudckpt.load(str(ck))["x"], torch.arange(5))


def test_manager_retention_collects_aged_orphans(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with cloudckpt.CheckpointManager(str(root), keep_last=2, gc_older_than=3600) as mgr:
        mgr.save(1, {"x": torch.ones(2)})
        ck = root / "step-0000000001"
        _orphan(ck)
        mgr.save(2, {"x": torch.ones(2)})
        assert (ck / "data" / "20260101T000000Z-0123456789ab").exists()  # young: kept
        _age(ck / "data" / "20260101T000000Z-0123456789ab", 7200)
        dead = root / "step-0000000009"  # an uncommitted save that died long ago
        _orphan(dead)
        _age(dead, 7200)
        mgr.save(3, {"x": torch.ones(2)})
        assert not (root / "step-0000000001").exists()  # retention
        assert not dead.exists()  # gc: every object was an aged orphan
        assert mgr.steps() == [2, 3]
    with pytest.raises(ValueError, match=r"gc_older_than must be seconds >= 0"):
        cloudckpt.CheckpointManager(str(root), gc_older_than=-1)


@pytest.mark.s3
def test_store_without_if_match_falls_back_to_a_plain_put(
    moto_server: S3Server, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = moto_server.new_bucket()
    uri = f"s3://{bucket}/c"
    opts = moto_server.options(proxy.url)
    cloudckpt.save(uri, _state(1), storage_options=opts)
    body = b"<Error><Code>NotImplemented</Code><Message>If-Match is not supported</Message></Error>"
    proxy.inject(status=501, times=1, method="PUT", path_re=r"/c/manifest\.json", body=body)
    with caplog.at_level(logging.WARNING, logger="cloudckpt_s3"):
        cloudckpt.save(uri, _state(2), storage_options=opts, overwrite=True)
    assert "does not implement If-Match on PUT" in caplog.text
    assert cloudckpt.load(uri, storage_options=opts)["n"] == 2
    assert cloudckpt.verify(uri, storage_options=opts).ok
