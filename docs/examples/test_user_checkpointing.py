"""A training job's checkpointing, tested in CI against S3 and GCS servers that run on the CI
machine (no cloud account, no network).

    pip install "cloudckpt[testing]" cloudckpt-s3 cloudckpt-gcs   # from a clone of cloudckpt:
    #   pip install -e ".[testing]" -e backends/s3 -e backends/gcs
    pytest test_user_checkpointing.py

The fixtures come from the cloudckpt pytest plugin, which pytest loads by itself:
``cloudckpt_s3`` and ``cloudckpt_gcs`` give a fresh bucket and prefix per test (``uri``,
``storage_options``, ``config_file``, ``client``); ``cloudckpt_faults`` puts a proxy that
answers 503 or drops connections in front of either.
"""

from __future__ import annotations

import pytest
import torch

import cloudckpt

STEPS = 6


def make_job() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and optimizer a fresh training process starts with."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of ``step``: the same on every run, so a resumed run can be compared."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    x, y = batch(step)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def state(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, object]:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}


def train(store_uri: str, config: object, stop_after: int | None = None) -> torch.nn.Module:
    """Train to STEPS, checkpointing every step; resume from the latest checkpoint if any.
    ``stop_after``: the job dies (returns) after that step, as a preempted job would."""
    model, opt = make_job()
    with cloudckpt.CheckpointManager(store_uri, config=config, keep_last=2) as mgr:
        start = 0
        if mgr.latest_step() is not None:
            saved = mgr.load_latest()
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optim"])
            start = saved["step"]
        for step in range(start + 1, STEPS + 1):
            train_step(model, opt, step)
            mgr.save(step, state(model, opt, step))
            if step == stop_after:
                return model
    return model


@pytest.fixture(params=["cloudckpt_s3", "cloudckpt_gcs"])
def store(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Each test below runs once on S3 (moto) and once on GCS (fake-gcs-server)."""
    return request.getfixturevalue(request.param)


def test_resumed_training_equals_uninterrupted_training(store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reference = train(f"{tmp_path}/uninterrupted", config=None)  # local disk, no interruption

    train(store.uri, config=store.config_file, stop_after=3)  # preempted after step 3
    resumed = train(store.uri, config=store.config_file)  # a new process picks up at step 4

    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    mgr = cloudckpt.CheckpointManager(store.uri, config=store.config_file)
    assert mgr.steps() == [STEPS - 1, STEPS]  # keep_last=2
    assert cloudckpt.load(mgr.uri(STEPS), config=store.config_file)["step"] == STEPS


def test_checkpointing_survives_injected_faults(store, cloudckpt_faults) -> None:  # type: ignore[no-untyped-def]
    flaky = cloudckpt_faults.front(store)  # same bucket and prefix, through the fault proxy
    upload = "PUT" if store.backend == "s3" else "POST"  # how each store's API uploads
    cloudckpt_faults.inject(status=503, times=3, method=upload)  # the next 3 uploads: 503
    cloudckpt_faults.inject(drop=True, times=1, method="GET")  # one read loses its connection

    model = train(flaky.uri, config=flaky.config_file)

    assert sorted(cloudckpt_faults.faults()) == ["503", "503", "503", "drop"]
    saved = cloudckpt.load(f"{store.uri}/step-{STEPS:010d}", storage_options=store.storage_options)
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved["model"][name], tensor), name
