"""Two independent S3 servers on 127.0.0.1: moto (ThreadedMotoServer) and SeaweedFS (weed mini)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from cloudckpt.testing import FAKE_AWS_ENV, CloudStore, S3Server, fresh_name
from stores import StoreTarget

STORE_FIXTURES = ["s3_moto_store", "s3_seaweed_store"]

# This test process only (the plugin sets them per test): subprocesses and the SeaweedFS store
# read the fake credentials from the environment.
for _k, _v in FAKE_AWS_ENV.items():
    os.environ.setdefault(_k, _v)

__all__ = ["S3Server"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def moto_server(cloudckpt_moto_server: S3Server) -> S3Server:
    """The plugin's moto server (cloudckpt.testing), under the name these tests use."""
    return cloudckpt_moto_server


@pytest.fixture(scope="session")
def seaweed_server() -> Iterator[S3Server]:
    weed = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    workdir = tempfile.mkdtemp(prefix="cloudckpt-weed-")
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
             "webdav.port"]  # fmt: skip
    ports = {n: _free_port() for n in names}
    log = open(os.path.join(workdir, "weed.log"), "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [weed, "mini", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        + [f"-{n}={p}" for n, p in ports.items()],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = S3Server("127.0.0.1", ports["s3.port"])
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(server.endpoint, timeout=1)
            break
        except urllib.error.HTTPError:
            break  # it answers: up
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"weed mini did not start; see {workdir}/weed.log") from None
            time.sleep(0.2)
    yield server
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def s3_moto_store(cloudckpt_s3: CloudStore) -> StoreTarget:
    return StoreTarget("s3-moto", cloudckpt_s3.uri, cloudckpt_s3.storage_options)


@pytest.fixture
def s3_seaweed_store(seaweed_server: S3Server) -> StoreTarget:
    bucket = seaweed_server.new_bucket()
    return StoreTarget("s3-seaweed", f"s3://{bucket}/{fresh_name()}", seaweed_server.options())
