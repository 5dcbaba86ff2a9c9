"""Latest lookup under a root with many checkpoints on a real S3 server (moto): the manager and
the command open the newest manifests only, however many checkpoints there are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from faults import FaultProxy
from stores.s3 import S3Server

import cloudckpt
from cloudckpt import CheckpointManager

COUNT = 40


@pytest.fixture
def proxy(moto_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server.host, moto_server.port) as p:
        yield p


def _populate(server: S3Server, bucket: str) -> str:
    """``COUNT`` committed checkpoints (copies of one save) and a newer uncommitted one."""
    root = f"s3://{bucket}/run"
    cloudckpt.save(
        f"{root}/step-0000000000", {"w": torch.ones(4)}, storage_options=server.options()
    )
    s3 = server.client()
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=bucket, Prefix="run/step-0000000000/")["Contents"]
    ]
    assert any(k.endswith("/manifest.json") for k in keys)

    def copy(step: int) -> None:
        for key in keys:
            if step == COUNT and key.endswith("/manifest.json"):
                continue  # the newest: data and index, no manifest (a save that died)
            dst = key.replace("step-0000000000", f"step-{step:010d}", 1)
            s3.copy_object(Bucket=bucket, Key=dst, CopySource={"Bucket": bucket, "Key": key})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(copy, range(1, COUNT + 1)))
    return root


def _manifest_reads(proxy: FaultProxy) -> list[str]:
    return [
        s.path.split("?")[0] for s in proxy.seen if s.path.split("?")[0].endswith("manifest.json")
    ]


def test_latest_reads_only_the_newest_manifests(moto_server: S3Server, proxy: FaultProxy) -> None:
    bucket = moto_server.new_bucket()
    root = _populate(moto_server, bucket)
    opts = moto_server.options(proxy.url)
    with CheckpointManager(root, storage_options=opts) as manager:
        proxy.clear()
        assert manager.latest_step() == COUNT - 1
        assert _manifest_reads(proxy) == [
            f"/{bucket}/run/step-{COUNT:010d}/manifest.json",  # uncommitted: skipped
            f"/{bucket}/run/step-{COUNT - 1:010d}/manifest.json",
        ]
        proxy.clear()
        assert manager.steps() == list(range(COUNT))  # the contrast: every manifest
        assert len(set(_manifest_reads(proxy))) == COUNT + 1


def test_latest_command_reads_only_the_newest_manifests(
    moto_server: S3Server, proxy: FaultProxy
) -> None:
    bucket = moto_server.new_bucket()
    root = _populate(moto_server, bucket)
    proxy.clear()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    out = subprocess.run(
        [sys.executable, "-m", "cloudckpt", "latest", root,
         "--storage-option", f"endpoint_url={proxy.url}"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{root}/step-{COUNT - 1:010d}"
    assert len(_manifest_reads(proxy)) == 2


def test_latest_command_imports_no_async_client_and_no_torch(moto_server: S3Server) -> None:
    """The command's process loads neither torch nor s3fs and its async stack: listings and
    manifests go through the S3 backend's plain client (cloudckpt_s3.lite)."""
    bucket = moto_server.new_bucket()
    root = f"s3://{bucket}/run"
    cloudckpt.save(
        f"{root}/step-0000000007", {"w": torch.ones(2)}, storage_options=moto_server.options()
    )
    code = (
        "import json, sys\n"
        "from cloudckpt.cli import main\n"
        f"rc = main(['latest', {root!r}, '--storage-option', 'endpoint_url={moto_server.endpoint}'])\n"
        "heavy = ('torch', 's3fs', 'aiobotocore', 'aiohttp', 'fsspec', 'numpy')\n"
        "print(json.dumps([rc, sorted(m for m in sys.modules if m.split('.')[0] in heavy)]))\n"
    )
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    printed, report = out.stdout.strip().splitlines()
    assert printed == f"{root}/step-0000000007"
    assert json.loads(report) == [0, []]
