"""S3 specifics against a real moto server, with faults injected on the HTTP path."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator

import pytest
import torch
from faults import FaultProxy
from stores.s3 import S3Server

import cloudckpt
from cloudckpt.storage import resolve

pytestmark = pytest.mark.s3


@pytest.fixture
def proxy(moto_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server.host, moto_server.port) as p:
        yield p


def _state() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    return {"big": torch.randn(3 << 20, generator=g), "small": torch.arange(10), "step": 3}


def _opts(server: S3Server, proxy: FaultProxy, **extra: object) -> dict[str, object]:
    # 5 MiB parts: the 12 MiB tensor goes as a 3-part multipart upload
    return server.options(proxy.url, part_size=5 << 20, multipart_threshold=5 << 20, **extra)


def _no_uploads_left(server: S3Server, bucket: str) -> bool:
    return "Uploads" not in server.client().list_multipart_uploads(Bucket=bucket)


def test_multipart_upload_is_used_and_round_trips(moto_server: S3Server, proxy: FaultProxy) -> None:
    bucket = moto_server.new_bucket()
    uri = f"s3://{bucket}/run/step-1"
    cloudckpt.save(uri, _state(), storage_options=_opts(moto_server, proxy))
    parts = [s for s in proxy.seen if s.method == "PUT" and "partNumber=" in s.path]
    assert len(parts) == 3
    out = cloudckpt.load(uri, storage_options=_opts(moto_server, proxy))
    assert torch.equal(out["big"], _state()["big"]) and out["step"] == 3


def test_save_and_load_survive_a_burst_of_faults(
    moto_server: S3Server, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = moto_server.new_bucket()
    uri = f"s3://{bucket}/run/step-1"
    proxy.inject(status=503, times=2, method="PUT", path_re="partNumber=2")
    proxy.inject(drop=True, times=1, method="PUT", path_re="partNumber=3")
    proxy.inject(status=500, times=1, method="PUT", path_re="manifest.json")
    proxy.inject(status=503, times=2, method="POST")  # create / complete multipart
    with caplog.at_level(logging.INFO):
        cloudckpt.save(uri, _state(), storage_options=_opts(moto_server, proxy))
    saved = [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved s3://")]
    assert saved and saved[0].endswith("retries") and not saved[0].endswith(" 0 retries")
    proxy.inject(status=503, times=2, method="GET")
    proxy.inject(drop=True, times=1, method="GET", path_re="rank-00000-0000")
    out = cloudckpt.load(uri, storage_options=_opts(moto_server, proxy))
    assert torch.equal(out["big"], _state()["big"])
    faults = [s.fault for s in proxy.seen if s.fault]
    assert faults.count("503") == 6 and faults.count("drop") == 2 and faults.count("500") == 1
    assert _no_uploads_left(moto_server, bucket)


def test_a_save_that_cannot_succeed_fails_in_time_and_leaves_nothing(
    moto_server: S3Server, proxy: FaultProxy
) -> None:
    bucket = moto_server.new_bucket()
    uri = f"s3://{bucket}/run/step-1"
    proxy.inject(status=503, times=None, method="PUT", path_re="partNumber=2")
    started = time.monotonic()
    with pytest.raises(cloudckpt.BackendError) as info:
        cloudckpt.save(
            uri, _state(), storage_options=_opts(moto_server, proxy, retry_stall_timeout=3)
        )
    took = time.monotonic() - started
    message = str(info.value)
    assert re.search(
        re.escape(uri) + r"/data/[^/]+/rank-00000-0000.safetensors part 2: gave up after", message
    )
    assert "stall timeout 3 s without progress" in message
    assert "Please reduce your request rate" in message
    assert took < 120  # hang guard: retrying forever would never get here
    objects = moto_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert not [o["Key"] for o in objects if o["Key"].endswith("manifest.json")]
    assert _no_uploads_left(moto_server, bucket)
    with pytest.raises(cloudckpt.CheckpointNotFoundError):
        cloudckpt.load(uri, storage_options=moto_server.options())


def test_access_denied_fails_at_once(moto_server: S3Server, proxy: FaultProxy) -> None:
    bucket = moto_server.new_bucket()
    body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
    proxy.inject(status=403, times=None, method="PUT", body=body)
    with pytest.raises(
        cloudckpt.BackendError,
        match=rf"s3://{bucket}/c/data/\S+: the store refused the request \(HTTP 403 AccessDenied",
    ):
        cloudckpt.save(
            f"s3://{bucket}/c", {"x": torch.ones(2)}, storage_options=_opts(moto_server, proxy)
        )
    assert [s.fault for s in proxy.seen if s.fault] == ["403"]  # no retries


def test_second_writer_gets_exists_error(s3_moto_store, s3_seaweed_store) -> None:  # type: ignore[no-untyped-def]
    for store in (s3_moto_store, s3_seaweed_store):
        uri = store.uri("c")
        cloudckpt.save(uri, {"v": 1}, **store.config_kwargs())
        backend, path = resolve(f"{uri}/manifest.json", storage_options=store.storage_options)
        with pytest.raises(FileExistsError):
            backend.put_create_only(path, b"{}")
        assert cloudckpt.load(uri, **store.config_kwargs()) == {"v": 1}


def test_part_size_grows_to_stay_under_10000_parts(moto_server: S3Server) -> None:
    backend, _ = resolve("s3://x/y", storage_options=moto_server.options())
    assert backend._part_size_for(100 << 20) == 8 << 20  # type: ignore[attr-defined]
    huge = 400 << 30
    part = backend._part_size_for(huge)  # type: ignore[attr-defined]
    assert -(-huge // part) <= 10_000 and part % (1 << 20) == 0


def test_generic_fsspec_backend_warns_that_commit_is_not_create_only(
    moto_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = moto_server.new_bucket()
    cfg = cloudckpt.CheckpointerConfig(
        storage=cloudckpt.StorageConfig(
            backend="fsspec",
            options={"endpoint_url": moto_server.endpoint, "key": "testing", "secret": "testing"},
        )
    )
    with caplog.at_level(logging.WARNING):
        cloudckpt.save(f"s3://{bucket}/c", {"x": torch.ones(2)}, config=cfg)
    assert torch.equal(cloudckpt.load(f"s3://{bucket}/c", config=cfg)["x"], torch.ones(2))
    assert any("the manifest commit is not create-only" in r.getMessage() for r in caplog.records)


def test_a_failed_data_file_stops_its_siblings_before_the_save_returns(
    moto_server: S3Server, proxy: FaultProxy
) -> None:
    bucket = moto_server.new_bucket()
    uri = f"s3://{bucket}/run/step-1"
    g = torch.Generator().manual_seed(1)
    # 12 tensors of 1.5 MiB in 4 MiB files: six data files, four written at once
    sd = {f"t{i}": torch.randn(384 << 10, generator=g) for i in range(12)}
    cfg = cloudckpt.CheckpointerConfig(
        writer_config=cloudckpt.CheckpointWriterConfig(file_size="4MiB", concurrency=4),
        storage=cloudckpt.StorageConfig(options=_opts(moto_server, proxy)),
    )
    body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
    proxy.inject(status=403, times=None, method="PUT", path_re="rank-00000-0000", body=body)
    proxy.inject(delay=0.5, times=None, method="PUT", path_re="/data/")  # siblings are slow
    with pytest.raises(
        cloudckpt.BackendError, match=r"rank-00000-0000\.safetensors: the store refused"
    ):
        cloudckpt.save(uri, sd, config=cfg)
    seen = len(proxy.seen)
    time.sleep(2.0)
    assert len(proxy.seen) == seen  # nothing of this save still talks to the store
    started = {s.path.split("?")[0].rsplit("/", 1)[-1] for s in proxy.seen if s.method == "PUT"}
    assert "rank-00000-0005.safetensors" not in started  # queued siblings never started
    assert _no_uploads_left(moto_server, bucket)
