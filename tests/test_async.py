"""The async checkpointer with both background writers: a thread and a persistent process.

The trainer blocks only for staging; errors surface from ``write_future`` and once more from the
next ``save``; staging buffers are reused; a killed writer process fails the save in flight with
a clear error and the next save starts a new one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import OrderedDict, defaultdict
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from async_helpers import WaitBeforeCommit, failing_init, mark_init
from conftest import IN_PROCESS_FIXTURES, STORE_FIXTURES
from faults import FaultProxy
from state_asserts import same
from stores import StoreTarget
from stores.s3 import S3Server

import cloudckpt

pytestmark = pytest.mark.filterwarnings("ignore:no accelerator:RuntimeWarning")

WRITERS = ["thread", "process"]


def _config(writer: str, storage_options: dict[str, Any] | None = None, **staging: Any):  # type: ignore[no-untyped-def]
    cfg = cloudckpt.CheckpointerConfig(
        storage=cloudckpt.StorageConfig(options=dict(storage_options or {})),
        staging_config=cloudckpt.CheckpointStagerConfig(**staging),
    )
    cfg.process_config.writer = writer
    return cfg


def _trainer_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(64, 32, generator=g)
    return {
        "model": {"w": base, "wt": base.t(), "b": torch.zeros(32, dtype=torch.bfloat16)},
        "optim": [torch.arange(100, dtype=torch.int64)[::3], torch.ones(3, dtype=torch.bool)],
        "step": 5,
        "name": "run-1",
        "empty": torch.empty(0, 4),
    }


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


@pytest.mark.parametrize("writer", WRITERS)
def test_mutation_after_staging_does_not_reach_the_checkpoint(writer: str, tmp_path: Path) -> None:
    sd = _trainer_state()
    expected = _clone(sd)
    with cloudckpt.make_async_checkpointer(_config(writer)) as ckpt:
        stage_f, write_f = ckpt.save(str(tmp_path / "c"), sd)
        stage_f.result()
        sd["model"]["w"].add_(5)  # the trainer goes on, in place and by rebinding
        sd["optim"][1].zero_()
        sd["step"] = 6
        write_f.result()
        same(ckpt.load(str(tmp_path / "c")), expected)


# memory:// is per process: the process writer refuses it (test_process_writer_refuses_memory)
STORE_WRITERS = [
    (fixture, writer)
    for fixture in STORE_FIXTURES
    for writer in WRITERS
    if not (fixture in IN_PROCESS_FIXTURES and writer == "process")
]


@pytest.mark.parametrize(("store_fixture", "writer"), STORE_WRITERS)
def test_round_trip_on_each_store(
    store_fixture: str, writer: str, request: pytest.FixtureRequest
) -> None:
    store: StoreTarget = request.getfixturevalue(store_fixture)
    cfg = _config(writer, store.storage_options)
    sd = _trainer_state()
    with cloudckpt.make_async_checkpointer(cfg) as ckpt:
        for step in (1, 2):
            sd["step"] = step
            stage_f, write_f = ckpt.save(store.uri(f"step-{step}"), sd)
            stage_f.result()  # before the trainer may change sd again
        write_f.result()
        same(ckpt.load(store.uri("step-1")), {**sd, "step": 1})
        same(ckpt.load(store.uri("step-2")), sd)


def test_process_writer_refuses_memory() -> None:
    with (
        pytest.raises(
            cloudckpt.ConfigError,
            match=r"^memory://async/c: the fsspec store lives inside this process, so the writer "
            r'process would save into its own memory; use \[process\] writer = "thread" for it$',
        ),
        cloudckpt.make_async_checkpointer(_config("process")) as ckpt,
    ):
        _, write_f = ckpt.save("memory://async/c", {"w": torch.ones(2)})
        write_f.result()


def test_process_writer_refuses_a_relative_name_under_a_memory_root() -> None:
    cfg = _config("process")
    cfg.storage.root = "memory://async-root"
    with (
        pytest.raises(
            cloudckpt.ConfigError,
            match=r"^step-1 \(under the root, memory://async-root/step-1\): the fsspec store "
            "lives inside this process",
        ),
        cloudckpt.make_async_checkpointer(cfg) as ckpt,
    ):
        _, write_f = ckpt.save("step-1", {"w": torch.ones(2)})
        write_f.result()
    from cloudckpt.storage import resolve

    backend, path = resolve("memory://async-root/step-1")
    assert not backend.exists(path)  # refused before anything was written


@pytest.mark.parametrize("writer", WRITERS)
def test_writer_error_surfaces_from_future_then_once_from_next_save(
    writer: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with cloudckpt.make_async_checkpointer(_config(writer)) as ckpt:
        _, write_f = ckpt.save(str(blocker / "c"), {"w": torch.ones(2)})
        with pytest.raises(cloudckpt.BackendError, match=rf"storing {blocker}/c/.* failed"):
            write_f.result()
        with pytest.raises(cloudckpt.BackendError, match=rf"storing {blocker}/c/"):
            ckpt.save(str(tmp_path / "ok"), {"w": torch.ones(2)})
        _, write_f = ckpt.save(str(tmp_path / "ok"), {"w": torch.ones(2)})  # reported once
        write_f.result()
    assert (tmp_path / "ok" / "manifest.json").exists()


@pytest.mark.parametrize("writer", WRITERS)
def test_unsaveable_value_is_refused_by_key_path(writer: str, tmp_path: Path) -> None:
    ckpt = cloudckpt.make_async_checkpointer(_config(writer))
    _, write_f = ckpt.save(str(tmp_path / "c"), {"opt": {"fn": print}, "w": torch.ones(1)})
    with pytest.raises(cloudckpt.UnsupportedValueError, match=r"opt\.fn: cannot save a function"):
        write_f.result()
    with pytest.raises(cloudckpt.UnsupportedValueError, match=r"opt\.fn: cannot save a function"):
        ckpt.close()  # not reported by a later save: close reports it


@pytest.mark.parametrize("writer", WRITERS)
def test_staging_walks_the_containers_save_walks(writer: str, tmp_path: Path) -> None:
    """The stager and the writer follow one set of tree rules: the containers that save keeps
    (OrderedDict, tuple, nesting) come back as they were; a look-alike is refused by the
    stager, before the save returns, with the message a synchronous save gives."""
    sd = {
        "model": OrderedDict([("b", torch.ones(2)), ("a", torch.zeros(3))]),
        "pairs": [(torch.arange(3), {"k": (1, [torch.ones(1, 2)])})],
        "t": (),
    }
    with cloudckpt.make_async_checkpointer(_config(writer)) as ckpt:
        ckpt.save(str(tmp_path / "c"), sd)[1].result()
        same(ckpt.load(str(tmp_path / "c")), sd)
        with pytest.raises(cloudckpt.UnsupportedValueError) as info:
            ckpt.save(str(tmp_path / "d"), {"opt": defaultdict(list, w=[torch.ones(1)])})
    assert str(info.value).startswith(
        "opt: collections.defaultdict is not a container cloudckpt walks"
    )
    with pytest.raises(cloudckpt.UnsupportedValueError) as sync_info:
        cloudckpt.save(str(tmp_path / "d"), {"opt": defaultdict(list, w=[torch.ones(1)])})
    assert str(sync_info.value) == str(info.value)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("writer", WRITERS)
def test_second_save_reuses_the_staging_slab(
    writer: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sd = {"w": torch.randn(1000), "b": [torch.ones(10, dtype=torch.float16)]}
    with (
        caplog.at_level(logging.INFO, "cloudckpt"),
        cloudckpt.make_async_checkpointer(_config(writer)) as ckpt,
    ):
        stager = ckpt._stager
        slabs = []
        for i in range(3):
            stage_f, write_f = ckpt.save(str(tmp_path / f"c{i}"), sd)
            stage_f.result()
            staged = ckpt._staged  # type: ignore[attr-defined]
            staged = staged.result() if isinstance(staged, Future) else staged
            slabs.append(staged["w"].untyped_storage().data_ptr())
            write_f.result()
        assert slabs[0] == slabs[1] == slabs[2]  # no allocation after the first save
        assert stager.shared_memory is (writer == "process")  # type: ignore[attr-defined]
        assert stager.staged_bytes == 4096  # type: ignore[attr-defined]  # 4000 + 20, 64-aligned
        sd["w"] = torch.randn(2000)  # new shapes: a new slab
        stage_f, write_f = ckpt.save(str(tmp_path / "c3"), sd)
        write_f.result()
        assert stager.staged_bytes == 8064  # type: ignore[attr-defined]
    footprints = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("staging buffers")
    ]
    kind = "shared" if writer == "process" else "plain"
    assert footprints == [
        f"staging buffers: 4.0 KiB of {kind} host memory for 2 tensors, reused by the next save of the same shapes",
        f"staging buffers: 7.9 KiB of {kind} host memory for 2 tensors, reused by the next save of the same shapes",
    ]
    out = cloudckpt.load(str(tmp_path / "c3"))
    assert torch.equal(out["w"], sd["w"])


def test_max_staging_bytes_fails_fast_and_writes_nothing(tmp_path: Path) -> None:
    cfg = _config("thread", max_staging_bytes=1 << 20)
    with cloudckpt.make_async_checkpointer(cfg) as ckpt:
        with pytest.raises(cloudckpt.StagingError) as info:
            ckpt.save(str(tmp_path / "c"), {"a": torch.zeros(200_000), "b": torch.zeros(100_000)})
        assert str(info.value) == (
            "staging this state dict needs 1.1 MiB of host memory (2 tensors), more than "
            "max_staging_bytes = 1.0 MiB ([staging] max_staging_bytes): raise the limit, save a "
            "smaller state dict per rank, or save synchronously"
        )
        _, write_f = ckpt.save(str(tmp_path / "d"), {"a": torch.zeros(200_000)})
        write_f.result()
    assert not (tmp_path / "c").exists() and (tmp_path / "d" / "manifest.json").exists()


def test_max_staging_bytes_from_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[staging]\nmax_staging_bytes = "64MiB"\n[process]\nwriter = "process"\n')
    cfg = cloudckpt.load_config(path)
    assert (
        cfg.staging_config.max_staging_bytes == 64 << 20 and cfg.process_config.writer == "process"
    )
    path.write_text('[process]\nwriter = "fork"\n')
    with pytest.raises(cloudckpt.ConfigError) as info:
        cloudckpt.load_config(path)
    assert str(info.value) == (
        f"{path}:2: [process] writer = 'fork' is not accepted; use one of thread, process"
    )


@pytest.mark.parametrize("writer", WRITERS)
def test_close_with_a_save_in_flight_waits_for_the_commit(writer: str, tmp_path: Path) -> None:
    sd = {f"t{i}": torch.randn(1 << 20) for i in range(16)}  # 64 MiB
    ckpt = cloudckpt.make_async_checkpointer(_config(writer))
    _, write_f = ckpt.save(str(tmp_path / "c"), sd)
    ckpt.close()
    assert write_f.done() and write_f.exception() is None
    out = cloudckpt.load(str(tmp_path / "c"))
    assert all(torch.equal(out[k], sd[k]) for k in sd)


@pytest.mark.timeout(120)  # a hang guard, not a speed bound: close() returns in about 1 s
@pytest.mark.parametrize("writer", WRITERS)
def test_close_closes_everything_then_reraises_the_pending_write_error_once(
    writer: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the checkpoint's directory would go: mkdir fails
    threads = {t.ident for t in threading.enumerate()}
    ckpt = cloudckpt.make_async_checkpointer(_config(writer))
    _, write_f = ckpt.save(str(blocker / "c"), {"w": torch.ones(2)})
    with pytest.raises(cloudckpt.BackendError, match=rf"storing {blocker}/c/.* failed") as info:
        ckpt.close()
    assert info.value is write_f.exception()
    ckpt.close()  # reported once
    assert not multiprocessing.active_children()
    assert not [t for t in threading.enumerate() if t.ident not in threads and t.is_alive()]


@pytest.mark.parametrize("writer", WRITERS)
def test_close_leaves_no_thread_or_backend_pool_behind(writer: str, tmp_path: Path) -> None:
    before = {t.ident for t in threading.enumerate()}
    with cloudckpt.make_async_checkpointer(_config(writer)) as ckpt:
        ckpt.save(str(tmp_path / "c"), {"big": torch.ones(8 << 20)})[1].result()
        ckpt.save(str(tmp_path / "d"), {"big": torch.ones(8 << 20)})[1].result()
    new = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    # multiprocessing's resource sharer, which hands the slab's file descriptor to the writer
    # process, serves for the life of the process (torch's sharing, not a cloudckpt thread)
    assert [n for n in new if not n.endswith("(_serve)")] == []
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("writer", WRITERS)
def test_close_does_not_repeat_an_error_the_next_save_reported(writer: str, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ckpt = cloudckpt.make_async_checkpointer(_config(writer))
    ckpt.save(str(blocker / "c"), {"w": torch.ones(2)})
    with pytest.raises(cloudckpt.BackendError, match=rf"storing {blocker}/c/"):
        ckpt.save(str(tmp_path / "ok"), {"w": torch.ones(2)})
    ckpt.close()  # the failed write was reported by save; nothing is pending
    assert not (tmp_path / "ok").exists()


def test_a_with_block_that_raises_keeps_its_exception_and_logs_the_write_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("x")
    ckpt = cloudckpt.make_async_checkpointer(_config("thread"))
    with pytest.raises(KeyError, match="training stopped"), ckpt:
        ckpt.save(str(tmp_path / "file" / "c"), {"w": torch.ones(2)})
        raise KeyError("training stopped")
    assert f"the last checkpoint write failed as well: {tmp_path}/file/c: storing" in caplog.text


def _wait_for(path: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


@pytest.mark.slow  # a long fault run (kills the writer process / fails its start)
def test_a_killed_writer_process_fails_the_save_and_the_next_save_starts_a_new_one(
    tmp_path: Path,
) -> None:
    flag = tmp_path / "in-commit"
    ckpt = cloudckpt.make_async_checkpointer(
        _config("process"), commit_hook=WaitBeforeCommit(str(flag), 30)
    )
    sd = {"w": torch.randn(1000)}
    _, write_f = ckpt.save(str(tmp_path / "c"), sd)
    pid = int(_wait_for(flag))
    assert pid == ckpt._process.pid  # type: ignore[attr-defined]
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(cloudckpt.WriterProcessError) as info:
        write_f.result(timeout=20)
    assert str(info.value) == (
        f"the checkpoint writer process (pid {pid}) was killed by SIGKILL (often the kernel's "
        f"out-of-memory killer) while saving {tmp_path / 'c'}; the save did not finish (a "
        "checkpoint is committed only if its manifest was written: `cloudckpt info "
        f"{tmp_path / 'c'}` tells)"
    )
    assert not (tmp_path / "c" / "manifest.json").exists()
    with pytest.raises(cloudckpt.CheckpointNotCommittedError):
        cloudckpt.load(str(tmp_path / "c"))

    flag.unlink()
    ckpt._process.checkpoint_writer_init_args["commit_hook"] = None  # type: ignore[attr-defined]
    with pytest.raises(cloudckpt.WriterProcessError, match="was killed by SIGKILL"):
        ckpt.save(str(tmp_path / "d"), sd)  # the previous save's error, once
    _, write_f = ckpt.save(str(tmp_path / "d"), sd)
    write_f.result(timeout=60)
    assert ckpt._process.pid != pid  # type: ignore[attr-defined]
    assert torch.equal(cloudckpt.load(str(tmp_path / "d"))["w"], sd["w"])
    ckpt.close()


@pytest.mark.slow  # a long fault run (kills the writer process / fails its start)
def test_writer_process_init_runs_there_and_its_failure_is_reported(tmp_path: Path) -> None:
    marker = tmp_path / "init-pid"
    with cloudckpt.make_async_checkpointer(
        _config("process"), subprocess_init_fn=mark_init, subprocess_init_args=(str(marker),)
    ) as ckpt:
        _, write_f = ckpt.save(str(tmp_path / "c"), {"w": torch.ones(2)})
        write_f.result()
        assert int(marker.read_text()) == ckpt._process.pid != os.getpid()  # type: ignore[attr-defined]

    failing = cloudckpt.make_async_checkpointer(
        _config("process"), subprocess_init_fn=failing_init, subprocess_init_args=("no GPU here",)
    )
    _, write_f = failing.save(str(tmp_path / "d"), {"w": torch.ones(2)})
    message = r"^the checkpoint writer process failed to start: no GPU here$"
    with pytest.raises(cloudckpt.WriterProcessError, match=message):
        write_f.result()
    # no later save reported it, so close() raises it once (after closing everything) ...
    with pytest.raises(cloudckpt.WriterProcessError, match=message):
        failing.close()
    failing.close()  # ... and a second close is quiet


def test_process_writer_config_errors() -> None:
    cfg = _config("process", use_shared_memory=False)
    with pytest.raises(
        cloudckpt.ConfigError,
        match=r"use_shared_memory = false cannot work with \[process\] writer = \"process\"",
    ):
        cloudckpt.make_async_checkpointer(cfg)
    with pytest.raises(cloudckpt.ConfigError, match=r"do not pickle .*define them at module level"):
        cloudckpt.make_async_checkpointer(_config("process"), subprocess_init_fn=lambda: None)
    bogus = _config("thread")
    bogus.process_config.writer = "fork"
    with pytest.raises(
        cloudckpt.ConfigError,
        match=r"^config built in Python: \[process\] writer = 'fork' is not accepted; use one "
        r"of thread, process$",
    ):
        cloudckpt.make_async_checkpointer(bogus)


@pytest.mark.s3
@pytest.mark.parametrize("writer", WRITERS)
def test_s3_fault_that_exhausts_retries_surfaces_from_write_future(
    writer: str, moto_server: S3Server
) -> None:
    bucket = moto_server.new_bucket()
    uri = f"s3://{bucket}/run/step-1"
    sd = {"big": torch.randn(3 << 20), "step": 1}  # 12 MiB: a 3-part upload in 5 MiB parts
    with FaultProxy(moto_server.host, moto_server.port) as proxy:
        options = moto_server.options(
            proxy.url, part_size=5 << 20, multipart_threshold=5 << 20, retry_stall_timeout=3
        )
        proxy.inject(status=503, times=None, method="PUT", path_re="partNumber=2")
        with cloudckpt.make_async_checkpointer(_config(writer, options)) as ckpt:
            stage_f, write_f = ckpt.save(uri, sd)
            stage_f.result()
            with pytest.raises(cloudckpt.BackendError) as info:
                write_f.result(timeout=60)
            assert re.search(
                re.escape(uri) + r"/data/[^/]+/rank-00000-0000.safetensors part 2: gave up after",
                str(info.value),
            )
            with pytest.raises(cloudckpt.BackendError, match="part 2: gave up after"):
                ckpt.save(f"s3://{bucket}/run/step-2", sd)
            proxy.clear()
            _, write_f = ckpt.save(f"s3://{bucket}/run/step-2", sd)
            write_f.result(timeout=60)
    client = moto_server.client()
    assert "Uploads" not in client.list_multipart_uploads(Bucket=bucket)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert "run/step-2/manifest.json" in keys and "run/step-1/manifest.json" not in keys


def test_too_little_shared_memory_fails_fast_with_advice(
    tiny_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cloudckpt.staging, "SHM_DIR", str(tiny_disk))  # a real 1 MiB tmpfs
    with cloudckpt.make_async_checkpointer(_config("process")) as ckpt:
        with pytest.raises(cloudckpt.StagingError) as info:
            ckpt.save(str(tmp_path / "c"), {"big": torch.zeros(1 << 19)})  # 2 MiB
        message = str(info.value)
        assert message.startswith(
            f"staging for the writer process needs 2.0 MiB of shared memory but {tiny_disk} has "
        )
        assert message.endswith(
            "free; give the container more (docker run --shm-size, a Kubernetes emptyDir with "
            'medium: Memory) or use [process] writer = "thread"'
        )
        _, write_f = ckpt.save(str(tmp_path / "d"), {"small": torch.zeros(1000)})
        write_f.result()


@pytest.mark.parametrize("writer", WRITERS)
def test_manager_async_save_with_either_writer(writer: str, tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    with cloudckpt.AsyncCheckpointManager(root, config=_config(writer), keep_last=2) as mgr:
        for step in (1, 2, 3):
            started = mgr.save(step, {"w": torch.full((10,), float(step))})
            started.staged.result()
        assert started.result(timeout=60) == f"{root}/step-0000000003"
        assert mgr.steps() == [2, 3] and mgr.latest_step() == 3
        assert torch.equal(mgr.load_latest()["w"], torch.full((10,), 3.0))


@pytest.mark.parametrize("writer", WRITERS)
def test_a_script_that_exits_without_close_still_commits(writer: str, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, torch, cloudckpt\n"
        "def main():\n"
        "    cfg = cloudckpt.CheckpointerConfig()\n"
        f"    cfg.process_config.writer = {writer!r}\n"
        "    ckpt = cloudckpt.make_async_checkpointer(cfg)\n"
        "    sd = {f't{i}': torch.randn(1 << 20) for i in range(8)}\n"
        "    stage_f, _ = ckpt.save(sys.argv[1], sd)\n"
        "    stage_f.result()\n"
        "    torch.save(sd, sys.argv[1] + '.expected.pt')\n"
        "if __name__ == '__main__':\n"
        "    main()  # no close(), no write_future.result()\n"
    )
    uri = str(tmp_path / "ck")
    done = subprocess.run(
        [sys.executable, str(script), uri], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    expected = torch.load(uri + ".expected.pt")
    same(cloudckpt.load(uri), expected)


def test_default_staging_does_not_warn_without_an_accelerator(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        ckpt = cloudckpt.make_async_checkpointer(_config("thread"))
        try:
            ckpt.save(str(tmp_path / "c"), {"w": torch.ones(2)})[1].result(timeout=120)
        finally:
            ckpt.close()
    assert torch.equal(cloudckpt.load(str(tmp_path / "c"))["w"], torch.ones(2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is for machines without one")
def test_pinned_memory_asked_for_explicitly_warns_without_an_accelerator() -> None:
    from cloudckpt.staging import DefaultStager

    with pytest.warns(RuntimeWarning) as record:
        DefaultStager(cloudckpt.CheckpointStagerConfig(use_pinned_memory=True)).close()
    assert [str(w.message) for w in record] == [
        "no accelerator: staging falls back to plain CPU memory and blocking copies "
        "(use_pinned_memory = true has no effect here)"
    ]


def test_collector_stays_on_in_the_callers_thread_during_an_async_save(tmp_path: Path) -> None:
    import gc

    sd = {f"p{i}": torch.full((16,), float(i)) for i in range(20_000)}
    seen: list[bool] = []
    with cloudckpt.make_async_checkpointer(_config("thread")) as ckpt:
        _, write_f = ckpt.save(str(tmp_path / "c"), sd)
        while not write_f.done():
            seen.append(gc.isenabled())
            time.sleep(0.001)
        write_f.result()
    assert len(seen) > 10 and all(seen)
    assert gc.isenabled() and gc.get_freeze_count() == 0  # nothing left frozen either
    assert torch.equal(cloudckpt.load(str(tmp_path / "c"))["p19999"], sd["p19999"])
