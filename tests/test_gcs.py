"""GCS specifics against fake-gcs-server, with faults injected on the HTTP path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.parse
from collections.abc import Iterator

import pytest
import torch
from faults import FaultProxy
from stores.gcs import GCSServer

import cloudckpt
from cloudckpt.storage import resolve

pytestmark = pytest.mark.gcs


@pytest.fixture
def proxy(gcs_server: GCSServer) -> Iterator[FaultProxy]:
    u = urllib.parse.urlsplit(gcs_server.url)
    with FaultProxy(u.hostname or "127.0.0.1", int(u.port or 80)) as p:
        yield p


def _state() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    return {"big": torch.randn(3 << 20, generator=g), "step": 5}  # 12 MiB


def _opts(server: GCSServer, proxy: FaultProxy, **extra: object) -> dict[str, object]:
    # 4 MiB resumable pieces and 4 MiB ranged reads: several requests per object
    return server.options(proxy.url, part_size=4 << 20, read_part_size=4 << 20, **extra)


def test_create_only_commit(gcs_store) -> None:  # type: ignore[no-untyped-def]
    uri = gcs_store.uri("c")
    cloudckpt.save(uri, {"v": 1}, **gcs_store.config_kwargs())
    with pytest.raises(cloudckpt.CheckpointExistsError, match="already at"):
        cloudckpt.save(uri, {"v": 2}, **gcs_store.config_kwargs())
    backend, path = resolve(f"{uri}/manifest.json", storage_options=gcs_store.storage_options)
    with pytest.raises(FileExistsError):
        backend.put_create_only(path, b"{}")
    assert cloudckpt.load(uri, **gcs_store.config_kwargs()) == {"v": 1}


def test_save_and_load_survive_429_and_503(gcs_server: GCSServer, proxy: FaultProxy) -> None:
    uri = f"gs://{gcs_server.new_bucket()}/run/step-1"
    proxy.inject(status=429, times=2, method="PUT", body=b'{"error":{"message":"rate"}}')
    proxy.inject(status=503, times=2, method="POST", body=b'{"error":{"message":"busy"}}')
    cloudckpt.save(uri, _state(), storage_options=_opts(gcs_server, proxy))
    proxy.inject(status=503, times=2, method="GET", body=b'{"error":{"message":"busy"}}')
    out = cloudckpt.load(uri, storage_options=_opts(gcs_server, proxy))
    assert torch.equal(out["big"], _state()["big"]) and out["step"] == 5
    faults = [s.fault for s in proxy.seen if s.fault]
    assert faults.count("429") == 2 and faults.count("503") == 4


def test_persistent_503_fails_in_time_without_commit(
    gcs_server: GCSServer, proxy: FaultProxy
) -> None:
    uri = f"gs://{gcs_server.new_bucket()}/run/step-1"
    proxy.inject(status=503, times=None, method="PUT", body=b'{"error":{"message":"busy"}}')
    started = time.monotonic()
    with pytest.raises(cloudckpt.BackendError, match=r"gave up after .*stall timeout 2 s"):
        cloudckpt.save(
            uri, _state(), storage_options=_opts(gcs_server, proxy, retry_stall_timeout=2)
        )
    assert time.monotonic() - started < 120  # hang guard: retrying forever never gets here
    with pytest.raises(cloudckpt.CheckpointNotFoundError):
        cloudckpt.load(uri, storage_options=gcs_server.options())


_SAVE = textwrap.dedent(
    """
    import os, sys, torch
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    import cloudckpt
    opts = {"endpoint_url": sys.argv[2], "token": "anon", "project": "test", "part_size": 1 << 20}
    cloudckpt.save(sys.argv[1], {"big": torch.randn(4 << 20)}, storage_options=opts)
    """
)


def test_save_killed_mid_upload_leaves_nothing_committed(
    gcs_server: GCSServer, proxy: FaultProxy
) -> None:
    uri = f"gs://{gcs_server.new_bucket()}/run/step-1"
    proxy.inject(delay=30, times=None, method="PUT", path_re="upload_id")  # stall the pieces
    proc = subprocess.Popen([sys.executable, "-c", _SAVE, uri, proxy.url])
    deadline = time.monotonic() + 60
    while not any(s.method == "PUT" for s in proxy.seen):
        assert time.monotonic() < deadline and proc.poll() is None, "upload never started"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(FileNotFoundError):  # nothing committed, nothing even visible
        cloudckpt.load(uri, storage_options=gcs_server.options())
    backend, path = resolve(uri, storage_options=gcs_server.options())
    assert backend.list_dir(backend.join(path, "data")) == []


def test_emulator_serves_a_long_session(gcs_server: GCSServer) -> None:
    # Over 64 KiB of request log: the fixture must drain the emulator's stderr or it blocks.
    opts = gcs_server.options(retry_stall_timeout=5)
    backend, root = resolve(f"gs://{gcs_server.new_bucket()}/many", storage_options=opts)
    for i in range(300):
        path = backend.join(root, f"o{i}")
        backend.put_create_only(path, b"%d" % i)
        assert backend.exists(path)
    assert [o.name for o in backend.list_dir(root)][:3] == ["o0", "o1", "o10"]
    assert backend.read_bytes(backend.join(root, "o299")) == b"299"


def test_save_and_load_survive_dropped_connections(
    gcs_server: GCSServer, proxy: FaultProxy
) -> None:
    uri = f"gs://{gcs_server.new_bucket()}/run/step-1"
    proxy.inject(drop=True, times=1, method="PUT", path_re="upload_id")  # a piece loses its socket
    cloudckpt.save(uri, _state(), storage_options=_opts(gcs_server, proxy))
    proxy.inject(drop=True, times=1, method="GET", path_re="rank-00000-0000")
    out = cloudckpt.load(uri, storage_options=_opts(gcs_server, proxy))
    assert torch.equal(out["big"], _state()["big"]) and out["step"] == 5
    assert [s.fault for s in proxy.seen if s.fault] == ["drop", "drop"]


def test_upload_finalized_short_by_the_store_is_an_error(
    gcs_server: GCSServer, proxy: FaultProxy
) -> None:
    # A dropped piece, then a refused resend: the backend asks the session for its offset, and
    # fake-gcs-server answers by finishing the object with what it holds (0 bytes). That must
    # fail the save, never pass for the data.
    uri = f"gs://{gcs_server.new_bucket()}/run/step-1"
    proxy.inject(drop=True, times=1, method="PUT", path_re="upload_id")
    proxy.inject(status=400, times=1, method="PUT", path_re="upload_id", body=b"{}")
    with pytest.raises(cloudckpt.BackendError, match=r"finished the resumable upload at 0 of"):
        cloudckpt.save(uri, _state(), storage_options=_opts(gcs_server, proxy))
    with pytest.raises(cloudckpt.CheckpointNotCommittedError, match=r"holds no manifest\.json"):
        cloudckpt.load(uri, storage_options=gcs_server.options())


# -- reads over plain connections (cloudckpt.storage.plainhttp) -------------------------------


def _object(server: GCSServer, proxy: FaultProxy, size: int, **extra: object):  # type: ignore[no-untyped-def]
    """A backend reaching ``server`` through ``proxy`` (256 KiB ranged GETs, 3 in flight), the
    path of a fresh ``size``-byte object, and its bytes."""
    opts = server.options(
        proxy.url, read_part_size=256 << 10, max_inflight_parts=3, retry_stall_timeout=5, **extra
    )
    backend, root = resolve(f"gs://{server.new_bucket()}/r", storage_options=opts)
    data = torch.randint(
        0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    path = backend.join(root, "obj")
    backend.write_object(path, [memoryview(data.numpy())], size)
    return backend, path, bytes(data.numpy())


def _read(backend, path: str, offset: int, sizes: list[int]) -> bytes:  # type: ignore[no-untyped-def]
    views = [memoryview(bytearray(n)) for n in sizes]
    backend.read_into(path, offset, views)
    return b"".join(bytes(v) for v in views)


def test_plain_reads_resume_cut_answers_and_retry_503(
    gcs_server: GCSServer, proxy: FaultProxy
) -> None:
    backend, path, data = _object(gcs_server, proxy, 3 << 20)
    assert backend.range_request(*backend.split(path)) is not None  # the plain path is taken
    proxy.inject(cut_body=1000, times=2, method="GET", path_re="obj")
    proxy.inject(status=503, times=1, method="GET", body=b'{"error":{"message":"busy"}}')
    sizes = [7, 1 << 20, 333_333, (3 << 20) - 100 - 7 - (1 << 20) - 333_333]
    assert _read(backend, path, 100, sizes) == data[100:]
    faults = [s.fault for s in proxy.seen if s.fault]
    assert sorted(faults) == ["503", "cut_body", "cut_body"]
    gets = [s for s in proxy.seen if s.method == "GET"]
    assert len(gets) == 12 + 3  # 12 pieces of 256 KiB, each failed one sent once more
    backend.close()


def test_plain_read_of_a_server_that_ignores_range(
    gcs_server: GCSServer, proxy: FaultProxy
) -> None:
    backend, path, data = _object(gcs_server, proxy, 1 << 20)
    proxy.inject(ignore_range=True, times=2, method="GET", path_re="obj")
    assert _read(backend, path, 300_000, [500_000]) == data[300_000:800_000]
    assert [s.fault for s in proxy.seen if s.fault] == ["ignore_range", "ignore_range"]
    backend.close()


def test_plain_read_errors_name_the_object(gcs_server: GCSServer, proxy: FaultProxy) -> None:
    backend, path, _ = _object(gcs_server, proxy, 1000)
    uri = backend.to_uri(path)
    with pytest.raises(EOFError, match=f"{uri}: the object ends before byte 1100"):
        _read(backend, path, 100, [1000])
    with pytest.raises(FileNotFoundError, match="no such object") as info:
        _read(backend, path + "-missing", 0, [10])
    assert info.value.filename == uri + "-missing"
    proxy.inject(status=503, times=None, method="GET", body=b'{"error":{"message":"busy"}}')
    started = time.monotonic()
    with pytest.raises(cloudckpt.BackendError, match=rf"{uri}: gave up after .*stall timeout 5 s"):
        _read(backend, path, 0, [1000])
    assert time.monotonic() - started < 120  # hang guard
    backend.close()


def test_reads_go_through_gcsfs_session_where_it_differs(
    gcs_server: GCSServer, proxy: FaultProxy
) -> None:
    # session_kwargs shape gcsfs's aiohttp session (a proxy, a connector): reads use it
    backend, path, data = _object(gcs_server, proxy, 1 << 20, session_kwargs={"trust_env": False})
    assert backend.range_request(*backend.split(path)) is None
    proxy.inject(drop=True, times=1, method="GET", path_re="obj")
    assert _read(backend, path, 10, [1000, (1 << 20) - 1010]) == data[10:]
    backend.close()


def test_range_request_repr_hides_headers() -> None:
    from cloudckpt.storage.plainhttp import RangeRequest

    req = RangeRequest("https://storage.googleapis.com/x", {"Authorization": "Bearer s3cret"})
    assert "s3cret" not in repr(req) and "Authorization" not in repr(req)
