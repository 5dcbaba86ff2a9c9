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
from dataclasses import dataclass
from typing import Any

import pytest

from stores import StoreTarget, fresh_name

STORE_FIXTURES = ["s3_moto_store", "s3_seaweed_store"]

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@dataclass
class S3Server:
    """A running S3 endpoint and the options that reach it."""

    host: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def options(self, endpoint: str | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "endpoint_url": endpoint or self.endpoint,
            "key": "testing",
            "secret": "testing",
            "retry_stall_timeout": 20,
            **extra,
        }

    def client(self, endpoint: str | None = None) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def new_bucket(self) -> str:
        name = f"b-{fresh_name()}"
        self.client().create_bucket(Bucket=name)
        return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def moto_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield S3Server(host, int(port))
    server.stop()


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


def _target(name: str, server: S3Server) -> StoreTarget:
    bucket = server.new_bucket()
    return StoreTarget(name, f"s3://{bucket}/{fresh_name()}", server.options())


@pytest.fixture
def s3_moto_store(moto_server: S3Server) -> StoreTarget:
    return _target("s3-moto", moto_server)


@pytest.fixture
def s3_seaweed_store(seaweed_server: S3Server) -> StoreTarget:
    return _target("s3-seaweed", seaweed_server)
