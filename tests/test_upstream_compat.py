"""Behaviours of ``torch.distributed.checkpoint._experimental``, with its own call shapes.

Code written for the upstream module keeps working with cloudckpt in its place: the writer
process's typed wire records, its process handle, who closes what, keyword calls of a user's
writer, the start-up timeout, every ``map_location`` form, staged results that stay valid and
directories written by upstream itself. docs/migration.md lists what differs on purpose.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import pytest
import torch
from async_helpers import slow_init, swapped_order_writer
from multirank_harness import rank_state, run_ranks
from torch.distributed.checkpoint._experimental import checkpoint_writer as up_writer
from torch.distributed.checkpoint._experimental import types as up_types

import cloudckpt
from cloudckpt.checkpoint_process import (
    CheckpointProcess,
    CheckpointProcessConfig,
    RequestType,
    WorkerRequest,
    WorkerResponse,
)
from cloudckpt.checkpoint_reader import CheckpointReader
from cloudckpt.checkpoint_writer import CheckpointWriter, CheckpointWriterConfig
from cloudckpt.checkpointer import SyncCheckpointer
from cloudckpt.staging import CheckpointStagerConfig, DefaultStager
from cloudckpt.types import RankInfo

pytestmark = pytest.mark.filterwarnings("ignore:no accelerator:RuntimeWarning")

RANK0 = RankInfo(global_rank=0, global_world_size=1)


def _writer_init(**kwargs: Any) -> CheckpointWriter:
    return CheckpointWriter(config=kwargs["config"], rank_info=kwargs["rank_info"])


# -- 1: the writer process's typed records and its process handle ---------------------------------


def test_request_and_response_records_have_upstreams_shape() -> None:
    assert RequestType.PING.value == "ping"
    assert RequestType.WRITE_CHECKPOINT.value == "write_checkpoint"
    assert RequestType.TERMINATE_PROCESS.value == "exit"
    request = WorkerRequest(request_type=RequestType.PING, payload={"test": "data"})
    assert request.request_type is RequestType.PING and request.payload == {"test": "data"}
    response = WorkerResponse(
        request_type=RequestType.PING, success=True, error_msg=None, payload={"result": "ok"}
    )
    assert response.success and response.error_msg is None and response.payload == {"result": "ok"}


def _process(tmp_path: Path, **overrides: Any) -> CheckpointProcess:
    return CheckpointProcess(
        rank_info=RANK0,
        config=CheckpointProcessConfig(subprocess_init_timeout_secs=overrides.pop("timeout", 120)),
        subprocess_init_fn=overrides.pop("init_fn", None),
        subprocess_init_args=overrides.pop("init_args", ()),
        checkpoint_writer_init_fn=overrides.pop("writer_fn", _writer_init),
        checkpoint_writer_init_args=overrides.pop(
            "writer_args", {"config": CheckpointWriterConfig(), "rank_info": RANK0}
        ),
    )


def test_process_handle_is_alive_until_close_and_writes_land(tmp_path: Path) -> None:
    cp = _process(tmp_path)
    cp.process_creation_future.result()
    assert cp.process is not None
    writer = cp.process.processes[0]
    assert writer.is_alive() and writer.pid != os.getpid()
    future = cp.write({"w": torch.arange(5.0), "epoch": 5}, str(tmp_path / "c"))
    assert future.result() is None
    cp.close()
    assert not writer.is_alive()
    assert cp.process.processes[0] is writer  # kept after close, as upstream
    out = cloudckpt.load(str(tmp_path / "c"))
    assert torch.equal(out["w"], torch.arange(5.0)) and out["epoch"] == 5


def test_close_kills_a_writer_process_whose_join_times_out(tmp_path: Path) -> None:
    cp = _process(tmp_path)
    cp.process_creation_future.result()
    assert cp.process is not None
    cp.process.join = lambda timeout=None: False  # type: ignore[method-assign]
    cp.close()
    cp.process.processes[0].join(10)
    assert not cp.process.processes[0].is_alive()
    assert cp.process.processes[0].exitcode == -9  # killed, not stopped


# -- 4: the user's writer is called with keywords -----------------------------------------------


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_users_writer_receives_path_and_state_dict_by_keyword(writer: str, tmp_path: Path) -> None:
    out = tmp_path / "received.txt"
    cfg = cloudckpt.CheckpointerConfig()
    cfg.process_config.writer = writer
    ckpt = cloudckpt.make_async_checkpointer(
        cfg,
        rank_info=RANK0,
        checkpoint_writer_init_fn=swapped_order_writer,
        checkpoint_writer_init_args={"out": str(out)},
    )
    with ckpt:
        _, write_f = ckpt.save(str(tmp_path / "c"), {"w": torch.ones(2), "step": 1}, tag="x")
        write_f.result()
    assert out.read_text() == f"{tmp_path / 'c'}|['step', 'w']|['overwrite', 'tag']"


# -- 5: the start-up timeout is a TimeoutError ----------------------------------------------------


def test_start_up_timeout_is_a_timeout_error(tmp_path: Path) -> None:
    cp = _process(tmp_path, init_fn=slow_init, init_args=("test-checkpointer",), timeout=1)
    with pytest.raises(TimeoutError) as info:
        cp.process_creation_future.result()
    assert isinstance(info.value, cloudckpt.WriterProcessError)
    assert isinstance(info.value, cloudckpt.WriterProcessTimeoutError)
    assert str(info.value).startswith(
        "Timed out after 1 s waiting for the checkpoint writer process to start "
        "([process] subprocess_init_timeout_secs)"
    )
    cp.close()


# -- 3: closing a checkpointer never closes a reader or writer it was given -----------------------


def test_checkpointers_sharing_a_reader_and_writer_close_independently(tmp_path: Path) -> None:
    writer = CheckpointWriter(config=CheckpointWriterConfig(), rank_info=RANK0)
    reader = CheckpointReader(rank_info=RANK0)
    a = SyncCheckpointer(writer, reader)
    b = SyncCheckpointer(writer, reader)
    path = str(tmp_path / "c")
    a.save(path, {"step": 1, "w": torch.ones(3)})
    a.close()
    assert b.load(path)["step"] == 1
    b.save(str(tmp_path / "d"), {"step": 2})
    assert b.load(str(tmp_path / "d"))["step"] == 2
    b.close()
    reader.close()
    writer.close()


def test_factory_checkpointers_close_what_they_built(tmp_path: Path) -> None:
    ckpt = cloudckpt.make_sync_checkpointer(rank_info=RANK0)
    ckpt.save(str(tmp_path / "c"), {"step": 1})
    ckpt.close()
    assert ckpt._reader._pool._shutdown and ckpt._writer._pool._shutdown  # type: ignore[attr-defined]


# -- 7: default_map_location takes every form torch.load's map_location does -----------------------


def _saved(tmp_path: Path) -> str:
    path = str(tmp_path / "c")
    cloudckpt.save(path, {"w": torch.arange(4.0), "n": {"b": torch.ones(2)}, "step": 3})
    return path


@pytest.mark.parametrize(
    "location", ["cpu", torch.device("cpu"), {"cuda:0": "cpu"}, {"cpu": "cpu"}, None]
)
def test_map_location_forms_that_keep_tensors_on_the_host(location: Any, tmp_path: Path) -> None:
    with cloudckpt.make_sync_checkpointer(rank_info=RANK0) as ckpt:
        out = ckpt.load(_saved(tmp_path), default_map_location=location)
    assert out["w"].device.type == "cpu" and torch.equal(out["w"], torch.arange(4.0))


def test_map_location_dict_and_callable_are_applied(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    out = cloudckpt.load(path, default_map_location={"cpu": "meta"})
    assert out["w"].device.type == "meta" and out["n"]["b"].device.type == "meta"
    seen: list[str] = []

    def to_meta(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        seen.append(location)
        return torch.UntypedStorage(storage.nbytes(), device="meta")

    out = cloudckpt.load(path, default_map_location=to_meta)
    assert out["w"].device.type == "meta" and seen == ["cpu", "cpu"]
    out = cloudckpt.load(path, default_map_location=lambda storage, location: None)
    assert torch.equal(out["w"], torch.arange(4.0))  # None: the default location
    out = cloudckpt.load(path, default_map_location=lambda storage, location: storage)
    assert torch.equal(out["n"]["b"], torch.ones(2))


def test_map_location_of_no_known_form_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(cloudckpt.ConfigError) as info:
        cloudckpt.load(_saved(tmp_path), default_map_location="gpu7")
    assert str(info.value).startswith(
        "default_map_location='gpu7' is not a device, a dict of locations or a callable"
    )


# -- 8: staged results stay valid while held --------------------------------------------------------


def test_each_staged_result_is_its_own() -> None:
    stager = DefaultStager(CheckpointStagerConfig(use_async_staging=False))
    a = stager.stage({"w": torch.zeros(8)})
    b = stager.stage({"w": torch.ones(8)})
    assert isinstance(a, dict) and isinstance(b, dict)
    assert torch.equal(a["w"], torch.zeros(8)) and torch.equal(b["w"], torch.ones(8))
    assert a["w"].untyped_storage().data_ptr() != b["w"].untyped_storage().data_ptr()
    stager.close()


def test_async_staging_results_are_their_own_too() -> None:
    with DefaultStager(CheckpointStagerConfig(use_async_staging=True)) as stager:
        fa = stager.stage({"w": torch.zeros(8), "k": [torch.ones(2)]})
        fb = stager.stage({"w": torch.full((8,), 7.0), "k": [torch.zeros(2)]})
        a, b = fa.result(), fb.result()  # type: ignore[union-attr]
    assert torch.equal(a["w"], torch.zeros(8)) and torch.equal(a["k"][0], torch.ones(2))
    assert torch.equal(b["w"], torch.full((8,), 7.0))


def test_a_recycled_slab_is_reused_by_the_next_stage_of_the_same_shapes() -> None:
    stager = DefaultStager(CheckpointStagerConfig(use_async_staging=False))
    a = stager.stage({"w": torch.zeros(8), "b": torch.ones(3, dtype=torch.int8)})
    assert isinstance(a, dict)
    ptr = a["w"].untyped_storage().data_ptr()
    stager.recycle(a)
    b = stager.stage({"w": torch.ones(8), "b": torch.zeros(3, dtype=torch.int8)})
    assert isinstance(b, dict)
    assert b["w"].untyped_storage().data_ptr() == ptr  # reused, no allocation
    stager.recycle(b)
    c = stager.stage({"w": torch.ones(9)})  # other shapes: a slab of its own
    assert isinstance(c, dict)
    assert torch.equal(b["w"], torch.ones(8)) and torch.equal(c["w"], torch.ones(9))
    stager.recycle({"w": torch.ones(2)})  # not this stager's: ignored, nothing to overwrite
    stager.close()


# -- 9: directories written by upstream --------------------------------------------------------


def _upstream_save(path: str, state_dict: dict[str, Any], rank: int = 0, world: int = 1) -> None:
    writer = up_writer.CheckpointWriter(
        config=up_writer.CheckpointWriterConfig(),
        rank_info=up_types.RankInfo(global_world_size=world, global_rank=rank),
    )
    writer.write(path, state_dict)


def test_an_upstream_directory_loads_unverified_with_one_warning(tmp_path: Path) -> None:
    path = str(tmp_path / "old")
    sd = {"model": {"w": torch.randn(3, 2)}, "optimizer": {"param_groups": [{"lr": 0.01}]},
          "epoch": 5}  # fmt: skip
    _upstream_save(path, sd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = cloudckpt.load(path)
    assert torch.equal(out["model"]["w"], sd["model"]["w"]) and out["epoch"] == 5
    assert out["optimizer"] == {"param_groups": [{"lr": 0.01}]}
    unverified = [
        w for w in caught if issubclass(w.category, cloudckpt.UnverifiedCheckpointWarning)
    ]
    assert len(unverified) == 1
    assert str(unverified[0].message).startswith(
        f"{path}/checkpoint_0.pt is in the upstream torch.distributed.checkpoint._experimental "
        "layout (no manifest, no checksums): loaded unverified with "
        "torch.load(weights_only=True)"
    )
    target = {"model": {"w": torch.zeros(3, 2)}, "epoch": None, "absent": 1}
    with (
        pytest.warns(cloudckpt.UnverifiedCheckpointWarning),
        cloudckpt.make_sync_checkpointer(rank_info=RANK0) as ckpt,
    ):
        got = ckpt.load(path, target, default_map_location="cpu")
    assert got is target and torch.equal(target["model"]["w"], sd["model"]["w"])
    assert target["epoch"] == 5 and "optimizer" not in target


class _Opaque:
    pass


def test_an_upstream_file_holding_objects_is_never_unpickled(tmp_path: Path) -> None:
    path = str(tmp_path / "old")
    _upstream_save(path, {"obj": _Opaque()})
    with (
        pytest.warns(cloudckpt.UnverifiedCheckpointWarning),
        pytest.raises(cloudckpt.CheckpointError) as info,
    ):
        cloudckpt.load(path)
    assert str(info.value).startswith(
        f"{path}/checkpoint_0.pt holds objects that torch.load(weights_only=True) refuses"
    )


def test_cp_converts_an_upstream_directory_into_a_committed_checkpoint(tmp_path: Path) -> None:
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    for rank in range(2):
        _upstream_save(old, {"w": torch.full((4,), float(rank)), "rank": rank}, rank, 2)
    run = subprocess.run(
        [sys.executable, "-m", "cloudckpt", "cp", old, new],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == (
        f"converted {old} -> {new} (2 rank file(s) in the upstream layout, now committed)\n"
    )
    verify = subprocess.run(
        [sys.executable, "-m", "cloudckpt", "verify", new], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    for rank in range(2):
        out = cloudckpt.load(new, rank=rank)
        assert torch.equal(out["w"], torch.full((4,), float(rank))) and out["rank"] == rank


# -- 2: the barrier is called on every save; a wait-only barrier works at any world size ----------


def test_a_barrier_is_called_once_with_one_rank(tmp_path: Path) -> None:
    barrier = MagicMock()
    writer = CheckpointWriter(CheckpointWriterConfig(), rank_info=RankInfo(0, 1), barrier=barrier)
    writer.write(str(tmp_path / "c"), {"w": torch.ones(2)})
    barrier.execute_barrier.assert_called_once()
    assert torch.equal(cloudckpt.load(str(tmp_path / "c"))["w"], torch.ones(2))


def test_a_wait_only_barrier_at_world_size_three_commits_after_the_rendezvous(
    tmp_path: Path,
) -> None:
    """Two saves to one URI in a row: the ranks other than 0 leave the first save only after
    rank 0 has read their outcomes, however long rank 0 takes (it pauses here); otherwise
    their next outcome would replace the one rank 0 is about to commit."""
    root = str(tmp_path / "run")
    ranks = run_ranks("wait_only_barrier", 3, {"root": root, "rank0_pause": 0.5}, timeout=240)
    for rank, r in ranks.items():
        assert r["code"] == 0 and r["result"]["ok"], (rank, r)
        # two rendezvous per save (written, then rank 0 done), overwrite too
        assert r["result"]["calls"] == [2, 2, 2]
    for step, state_step in ((0, 0), (1, 5)):
        pending = tmp_path / "run" / f"step-{step}" / "index" / "pending"
        assert not pending.exists() or not any(pending.iterdir())  # rank 0 removed them
        assert cloudckpt.verify(f"{root}/step-{step}").ok
        for rank in range(3):
            out = cloudckpt.load(f"{root}/step-{step}", rank=rank)
            assert torch.equal(out["shard"][0], rank_state(rank, state_step)["shard"][0])


# -- 6: the upstream-named checkpointers overwrite; cloudckpt.save refuses ------------------------


def test_upstream_named_checkpointers_overwrite_by_default(tmp_path: Path) -> None:
    writer = CheckpointWriter(config=CheckpointWriterConfig(), rank_info=RANK0)
    reader = CheckpointReader(rank_info=RANK0)
    direct = SyncCheckpointer(writer, reader)
    built = cloudckpt.make_sync_checkpointer(rank_info=RANK0)
    for n, ck in enumerate((direct, built)):
        p = str(tmp_path / f"sync{n}")
        ck.save(p, {"step": 1, "w": torch.zeros(2)})
        ck.save(p, {"step": 2, "w": torch.ones(2)})
        out = ck.load(p)
        assert out["step"] == 2 and torch.equal(out["w"], torch.ones(2))
        with pytest.raises(cloudckpt.CheckpointExistsError) as info:
            ck.save(p, {"step": 3}, overwrite=False)
        assert str(info.value).startswith(f"a committed checkpoint is already at {p}")
    built.close()
    writer.close()
    reader.close()


def test_async_checkpointer_overwrites_by_default(tmp_path: Path) -> None:
    p = str(tmp_path / "c")
    with cloudckpt.make_async_checkpointer(rank_info=RANK0) as ck:
        for step in (1, 2):
            _, write_f = ck.save(p, {"step": step})
            write_f.result()
    assert cloudckpt.load(p)["step"] == 2


def test_cloudckpt_save_still_refuses_without_overwrite(tmp_path: Path) -> None:
    p = str(tmp_path / "c")
    cloudckpt.save(p, {"step": 1})
    with pytest.raises(cloudckpt.CheckpointExistsError) as info:
        cloudckpt.save(p, {"step": 2})
    assert str(info.value) == (
        f"a committed checkpoint is already at {p}; pass overwrite=True to replace it, or save "
        "under a new name"
    )
    cloudckpt.save(p, {"step": 2}, overwrite=True)
    assert cloudckpt.load(p)["step"] == 2
