"""Global leaves across real ranks: DTensors saved on 4 ranks load on 2, 3, 1 and a 2x2 mesh."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from global_harness import GLOBAL_SHAPES, global_tensor, plain_state, run_ranks, tp_model

import cloudckpt
from cloudckpt.committed import open_checkpoint
from cloudckpt.storage import resolve

pytestmark = pytest.mark.multirank


def _all_ok(results: dict[int, Any]) -> list[dict[str, Any]]:
    for rank, r in results.items():
        assert r["code"] == 0 and r["result"]["ok"], (rank, r)
    return [r["result"] for r in results.values()]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("globals"))
    for r in _all_ok(run_ranks("save_globals", 4, {"root": root})):
        assert r["partial_error"] == (
            "p: cannot save a DTensor with placement Partial(sum) (Partial); only Shard and "
            "Replicate are stored as global chunks; reduce it first: "
            "dt.redistribute(placements=[Replicate() or Shard(d), ...])"
        )
    return root


def test_stored_bytes_are_the_unique_bytes(saved: str) -> None:
    ckpt = open_checkpoint(f"{saved}/globals")
    unique = sum(global_tensor(n).numel() * 4 for n in GLOBAL_SHAPES)
    unique += 6 * 4 + 4  # sched.buf, opt_step: replicated plain tensors, once
    stored = 0
    for r in range(4):
        index = ckpt.read_index(r)
        stored += sum(t.length for t in index.tensors)
    assert stored == unique
    headers = ckpt.manifest.total_bytes - stored
    assert 0 < headers < 4 * 4096  # the data files' safetensors headers only
    from cloudckpt.cli import main

    assert main(["verify", f"{saved}/globals"]) == 0  # chunks are ordinary tensor records


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_loads_on_fewer_ranks_in_place(saved: str, world: int) -> None:
    results = _all_ok(run_ranks("load_globals", world, {"root": saved, "layout": "other1d"}))
    for r in results:
        assert "saved by 4 rank(s) but this job has" in r["per_rank_error"]
        assert "per-rank leaves (rank)" in r["per_rank_error"]


def test_loads_on_a_2x2_mesh_with_other_placements(saved: str) -> None:
    _all_ok(run_ranks("load_globals", 4, {"root": saved, "layout": "grid_load"}))


def test_loads_whole_in_one_process_without_a_group(saved: str) -> None:
    out = cloudckpt.load(f"{saved}/globals")
    for name in GLOBAL_SHAPES:
        assert torch.equal(out["model"][name], global_tensor(name)), name
    assert out["step"] == 7 and torch.equal(out["sched"]["buf"], plain_state()["sched"]["buf"])
    target = {"model": {"row": torch.zeros(37, 5)}}
    cloudckpt.load(f"{saved}/globals", target)
    assert torch.equal(target["model"]["row"], global_tensor("row"))


def test_per_rank_leaves_at_another_world_size_need_rank(saved: str) -> None:
    with pytest.raises(cloudckpt.CheckpointError) as e:
        cloudckpt.load(f"{saved}/with-rank")
    assert str(e.value) == (
        f"{saved}/with-rank was saved by 4 rank(s) but this job has 1: pass rank=N to load a "
        "chosen rank's per-rank leaves (rank) (rank=0 for replicated state such as a DDP "
        "model), or save such leaves with replicated=[...] patterns; DTensors and replicated "
        "leaves load at any world size"
    )
    out = cloudckpt.load(f"{saved}/with-rank", rank=2)
    assert out["rank"] == 2 and torch.equal(out["model"]["col"], global_tensor("col"))


@pytest.mark.parametrize("writer", ["thread", pytest.param("process", marks=pytest.mark.slow)])
def test_async_writers_carry_global_leaves(tmp_path: Path, writer: str) -> None:
    root = str(tmp_path)
    for r in _all_ok(run_ranks("save_globals_async", 2, {"root": root, "writer": writer})):
        first, second = r["slabs"]
        assert len({*first, *second}) == 1  # one slab, reused: the second save allocates nothing
    for step in range(2):
        out = cloudckpt.load(f"{root}/async-{step}")
        for name in ("row", "col", "rep", "big", "scalar"):
            assert torch.equal(out["model"][name], global_tensor(name)), (step, name)
        assert out["step"] == 7 and torch.equal(out["opt_step"], plain_state()["opt_step"])
        ckpt = open_checkpoint(f"{root}/async-{step}")
        stored = sum(t.length for r in range(2) for t in ckpt.read_index(r).tensors)
        unique = sum(global_tensor(n).numel() * 4 for n in ("row", "col", "rep", "big", "scalar"))
        assert stored == unique + 6 * 4 + 4


@pytest.mark.slow
def test_fsdp2_resumes_on_fewer_ranks_with_the_same_losses(tmp_path: Path) -> None:
    """A transformer under FSDP2 on 4 ranks, saved with its Adam state through
    get_state_dict; resumed on 2 ranks, the next losses match the uninterrupted run."""
    root = str(tmp_path)
    args = {"root": root, "steps": 6, "save_after": 3}
    full = _all_ok(run_ranks("fsdp_train", 4, args, timeout=300))
    resumed = _all_ok(run_ranks("fsdp_train", 2, {**args, "resume": f"{root}/fsdp"}, timeout=300))
    expected = full[0]["losses"]
    got = resumed[0]["losses"]
    assert sorted(got) == ["3", "4", "5"]
    for step in got:
        assert abs(got[step] - expected[step]) < 1e-5, (step, got[step], expected[step])
    ckpt = open_checkpoint(f"{root}/fsdp")
    kinds = {g.kind for r in range(4) for g in ckpt.read_index(r).globals}
    assert kinds == {"dtensor", "replicated"}


def test_export_writes_safetensors_that_hugging_face_reads(
    saved: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors import safe_open
    from safetensors.torch import load

    import cloudckpt.export
    from cloudckpt.cli import main

    monkeypatch.setattr(cloudckpt.export, "SLAB_BYTES", 64 << 10)  # many slabs per tensor

    dst = str(tmp_path / "hf")
    assert (
        main(["export", f"{saved}/globals", dst, "--prefix", "model.", "--max-file-size", "1MiB"])
        == 0
    )
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(GLOBAL_SHAPES)
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{n}-of-00003.safetensors" for n in (1, 2, 3)]
    total = 0
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / "hf" / file), framework="pt") as f:
            got = f.get_tensor(name)
        assert torch.equal(got, global_tensor(name)), name
        total += got.numel() * 4
    assert index["metadata"]["total_size"] == total
    # any store to any store: into memory://, read back with the safetensors library
    mem = f"memory://export-{uuid.uuid4().hex}/out"
    assert main(["export", f"{saved}/globals", mem]) == 0
    backend, root = resolve(mem)
    weights = json.loads(backend.read_bytes(backend.join(root, "model.safetensors.index.json")))
    (file,) = set(weights["weight_map"].values())
    out = load(backend.read_bytes(backend.join(root, file)))
    assert torch.equal(out["model.big"], global_tensor("big"))
    assert torch.equal(out["sched.buf"], plain_state()["sched"]["buf"])


def test_export_errors_name_the_problem(saved: str, tmp_path: Path, capsys: Any) -> None:
    from cloudckpt.cli import main

    dst = str(tmp_path / "hf")
    assert main(["export", f"{saved}/globals", dst, "--prefix", "nothing."]) == 1
    assert capsys.readouterr().err == (
        f"cloudckpt: error: {saved}/globals holds no tensor whose key path starts with 'nothing.'\n"
    )
    assert main(["export", f"{saved}/globals", dst, "--prefix", "model.r"]) == 0
    assert main(["export", f"{saved}/globals", dst]) == 1
    assert capsys.readouterr().err.endswith(
        "already holds an export (model.safetensors.index.json); pass --overwrite or choose "
        "another destination\n"
    )
    assert main(["export", f"{saved}/globals", dst, "--overwrite"]) == 0


@pytest.mark.slow
def test_fsdp2_over_tensor_parallel_strided_shards(tmp_path: Path) -> None:
    """torch builds ``_StridedShard`` for FSDP2 over TP on CPU: saved, loaded back in place,
    and whole in one process."""
    results = _all_ok(run_ranks("fsdp_tp", 4, {"root": str(tmp_path)}))
    assert results[0]["placements"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    out = cloudckpt.load(f"{tmp_path}/fsdp-tp")
    for k, v in tp_model().state_dict().items():
        assert torch.equal(out["model"][k], v), k


@pytest.mark.slow
def test_ddp_state_through_the_helpers_is_stored_once_and_resumes_on_2_ranks(
    tmp_path: Path,
) -> None:
    saved = _all_ok(run_ranks("ddp", 4, {"root": str(tmp_path)}))
    resumed = _all_ok(run_ranks("ddp", 2, {"root": str(tmp_path), "resume": True}))
    assert resumed[0]["digest"] == resumed[1]["digest"] == saved[0]["digest"]
    ckpt = open_checkpoint(f"{tmp_path}/ddp")
    stored = sum(t.length for r in range(4) for t in ckpt.read_index(r).tensors)
    params = (6 * 4 + 4) * 4
    assert stored == 3 * params + 2 * 4  # weights, exp_avg, exp_avg_sq once; two step tensors
