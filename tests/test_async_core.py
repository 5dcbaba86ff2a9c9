"""The async checkpointer's contract as it stands: staging copies, errors surface, close drains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cloudckpt


def test_mutation_after_staging_does_not_reach_the_checkpoint(tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning, match="no accelerator"):
        ckpt = cloudckpt.make_async_checkpointer()
    sd = {"w": torch.zeros(1000), "step": 1}
    stage_f, write_f = ckpt.save(str(tmp_path / "c"), sd)
    stage_f.result()
    sd["w"].add_(5)  # the trainer goes on
    sd["step"] = 2
    write_f.result()
    out = ckpt.load(str(tmp_path / "c"))
    assert torch.equal(out["w"], torch.zeros(1000)) and out["step"] == 1
    ckpt.close()


def test_writer_error_surfaces_from_future_and_next_save(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.warns(RuntimeWarning):
        ckpt = cloudckpt.make_async_checkpointer()
    _, write_f = ckpt.save(str(blocker / "c"), {"w": torch.ones(2)})
    with pytest.raises(cloudckpt.BackendError, match=r"storing .* failed"):
        write_f.result()
    with pytest.raises(cloudckpt.BackendError):
        ckpt.save(str(tmp_path / "ok"), {"w": torch.ones(2)})
    ckpt.close()  # drains and shuts down after a failed write


def test_second_save_reuses_staging_buffers(tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning):
        ckpt = cloudckpt.make_async_checkpointer()
    sd = {"w": torch.randn(64)}
    stager = ckpt._stager
    first = stager.stage(sd).result()["w"].data_ptr()  # type: ignore[union-attr]
    second = stager.stage(sd).result()["w"].data_ptr()  # type: ignore[union-attr]
    assert first == second
    ckpt.close()
