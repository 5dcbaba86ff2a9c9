"""Where the store itself is wrong: an endpoint nobody answers at, a missing bucket, refused
credentials. Each fails at once (no retries), as a BackendError naming the URI and what to do."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator

import pytest
import torch
from faults import FaultProxy
from stores.gcs import GCSServer
from stores.s3 import S3Server

import cloudckpt
from cloudckpt.storage import resolve

# Generous: the point is "no minute of retries", not a speed bound.
QUICK = 30.0


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s3_proxy(moto_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server.host, moto_server.port) as p:
        yield p


@pytest.fixture
def gcs_proxy(gcs_server: GCSServer) -> Iterator[FaultProxy]:
    u = urllib.parse.urlsplit(gcs_server.url)
    with FaultProxy(u.hostname or "127.0.0.1", int(u.port or 80)) as p:
        yield p


def _unreachable_calls(uri: str, opts: dict[str, object]) -> list[tuple[str, object]]:
    mgr = cloudckpt.CheckpointManager(uri.rsplit("/", 1)[0], storage_options=opts)
    return [
        ("save", lambda: cloudckpt.save(uri, {"x": torch.ones(2)}, storage_options=opts)),
        ("load", lambda: cloudckpt.load(uri, storage_options=opts)),
        ("latest_step", mgr.latest_step),
    ]


@pytest.mark.s3
def test_s3_unreachable_endpoint_fails_at_once(moto_server: S3Server) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    opts = moto_server.options(endpoint)
    for name, call in _unreachable_calls("s3://bucket/run/step-1", opts):
        started = time.monotonic()
        with pytest.raises(cloudckpt.BackendError) as info:
            call()  # type: ignore[operator]
        took = time.monotonic() - started
        assert f"cannot reach the store at {endpoint}" in str(info.value), name
        assert "Check endpoint_url and the network" in str(info.value)
        assert "throttling" not in str(info.value)
        assert info.value.__cause__ is not None
        assert took < QUICK, (name, took)


@pytest.mark.gcs
def test_gcs_unreachable_endpoint_fails_at_once(gcs_server: GCSServer) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    opts = gcs_server.options(endpoint)
    for name, call in _unreachable_calls("gs://bucket/run/step-1", opts):
        started = time.monotonic()
        with pytest.raises(cloudckpt.BackendError, match=f"cannot reach the store at {endpoint}"):
            call()  # type: ignore[operator]
        assert time.monotonic() - started < QUICK, name


@pytest.mark.s3
def test_s3_missing_bucket_is_an_error_naming_it(moto_server: S3Server) -> None:
    opts = moto_server.options()
    uri = "s3://no-such-bucket-here/run"
    expected = (
        r"s3://no-such-bucket-here/run\S*: the bucket 'no-such-bucket-here' does not exist at "
        rf"{moto_server.endpoint} \(HTTP 404 NoSuchBucket.*\), or these credentials cannot see "
        r"it\. Create it, or fix the bucket name"
    )
    with pytest.raises(cloudckpt.BackendError, match=expected):
        cloudckpt.CheckpointManager(uri, storage_options=opts).latest_step()
    with pytest.raises(cloudckpt.BackendError, match=expected):
        cloudckpt.load(f"{uri}/step-1", storage_options=opts)
    with pytest.raises(cloudckpt.BackendError, match=expected):
        cloudckpt.save(f"{uri}/step-1", {"x": torch.ones(2)}, storage_options=opts)
    backend, path = resolve(uri, storage_options=opts)
    with pytest.raises(cloudckpt.BackendError, match=expected):
        backend.list_dir(path)


@pytest.mark.gcs
def test_gcs_missing_bucket_is_an_error_naming_it(gcs_server: GCSServer) -> None:
    opts = gcs_server.options()
    uri = "gs://no-such-bucket-here/run"
    expected = r"gs://no-such-bucket-here/run\S*: the bucket 'no-such-bucket-here' does not exist"
    with pytest.raises(cloudckpt.BackendError, match=expected):
        cloudckpt.CheckpointManager(uri, storage_options=opts).latest_step()
    with pytest.raises(cloudckpt.BackendError, match=expected):
        cloudckpt.load(f"{uri}/step-1", storage_options=opts)


@pytest.mark.s3
def test_s3_refused_credentials_on_a_read_say_so(
    moto_server: S3Server, s3_proxy: FaultProxy
) -> None:
    bucket = moto_server.new_bucket()
    uri = f"s3://{bucket}/c"
    cloudckpt.save(uri, {"x": torch.ones(2)}, storage_options=moto_server.options())
    body = (
        b"<Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access Key Id you provided "
        b"does not exist in our records.</Message></Error>"
    )
    s3_proxy.inject(status=403, times=None, method="GET", body=body)
    with pytest.raises(cloudckpt.BackendError) as info:
        cloudckpt.load(uri, storage_options=moto_server.options(s3_proxy.url))
    message = str(info.value)
    assert message.startswith(f"{uri}/manifest.json: the store refused the request (HTTP 403 ")
    assert "InvalidAccessKeyId" in message and "Check the credentials" in message
    assert "storing" not in message and "save again" not in message
    assert [s.fault for s in s3_proxy.seen if s.fault] == ["403"]  # no retries


@pytest.mark.gcs
def test_gcs_refused_credentials_on_a_read_say_so(
    gcs_server: GCSServer, gcs_proxy: FaultProxy
) -> None:
    uri = f"gs://{gcs_server.new_bucket()}/c"
    cloudckpt.save(uri, {"x": torch.ones(2)}, storage_options=gcs_server.options())
    body = (
        b'{"error":{"code":401,"message":"Invalid Credentials","errors":[{"reason":"authError"}]}}'
    )
    gcs_proxy.inject(status=401, times=None, method="GET", body=body)
    with pytest.raises(cloudckpt.BackendError) as info:
        cloudckpt.load(uri, storage_options=gcs_server.options(gcs_proxy.url))
    message = str(info.value)
    assert message.startswith(f"{uri}/manifest.json: the store refused the request (HTTP 401 ")
    assert "Invalid Credentials" in message and "Check the credentials" in message
    assert "storing" not in message and "save again" not in message


def test_unexpected_store_errors_are_wrapped() -> None:
    """A client error that is no OSError leaves as BackendError, the original as its cause."""
    from stores.objmem import MemObjectBackend

    backend = MemObjectBackend({})
    with pytest.raises(cloudckpt.BackendError, match=r"^memobj://b/k: KeyError: 'boom'$") as info:
        backend.call_sync(lambda: {}["boom"], "memobj://b/k")
    assert isinstance(info.value.__cause__, KeyError)


def test_options_with_units_and_one_error_type() -> None:
    pytest.importorskip("cloudckpt_s3")
    backend, _ = resolve(
        "s3://b/k", storage_options={"part_size": "16MiB", "endpoint_url": "http://127.0.0.1:1"}
    )
    assert backend.part_size == 16 << 20  # type: ignore[attr-defined]
    bad = [
        ({"part_size": "8 parsecs"}, r"storage option part_size='8 parsecs' for the s3 backend"),
        ({"part_size": "1MiB"}, r"part_size='1MiB' for the s3 backend: must be at least 5242880"),
        ({"max_inflight_parts": "many"}, r"max_inflight_parts='many' for the s3 backend"),
        ({"retry_stall_timeout": "soon"}, r"'retry_stall_timeout' must be a number"),
    ]
    for opts, pattern in bad:
        with pytest.raises(cloudckpt.ConfigError, match=pattern):
            resolve("s3://b/k", storage_options={**opts, "endpoint_url": "http://127.0.0.1:1"})


def test_plugins_load_only_for_the_uris_that_need_them() -> None:
    """A local path imports no plugin (the S3 one alone costs aiohttp's import, ~0.3 s, on
    every first save or load); s3:// imports only the S3 plugin; listing backends, all."""
    probe = (
        "import sys\n"
        "from cloudckpt.storage.registry import available_backends, backend_class_for\n"
        "def plugins(): return sorted(m for m in ('cloudckpt_s3', 'cloudckpt_gcs') if m in sys.modules)\n"
        "print(backend_class_for('/tmp/x').name, backend_class_for('file:///tmp/x').name, plugins())\n"
        "print(backend_class_for('s3://b/k').name, plugins())\n"
        "print(backend_class_for('gs://b/k').name, sorted(available_backends()), plugins())\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "local local []",
        "s3 ['cloudckpt_s3']",
        "gcs ['fsspec', 'gcs', 'local', 's3'] ['cloudckpt_gcs', 'cloudckpt_s3']",
    ]


def test_registries_refuse_silent_replacement() -> None:
    from cloudckpt.barriers import BARRIER_REGISTRY, TCPStoreBarrier, register_barrier
    from cloudckpt.storage import FsspecBackend, available_backends, register_backend

    class Impostor(FsspecBackend):
        name = "s3-impostor"
        protocols = ("s3",)

    available_backends()  # the entry points are loaded
    if "s3" in available_backends():
        with pytest.raises(cloudckpt.ConfigError, match=r"scheme 's3' by S3Backend is already"):
            register_backend(Impostor)
    with pytest.raises(TypeError):
        available_backends()["x"] = Impostor  # type: ignore[index]

    class OtherTCP(TCPStoreBarrier):
        pass

    with pytest.raises(
        cloudckpt.ConfigError,
        match=r"barrier_type 'tcp_store' is already registered by TCPStoreBarrier\. Pass clobber",
    ):
        register_barrier(OtherTCP)
    with pytest.raises(TypeError):
        BARRIER_REGISTRY["x"] = OtherTCP  # type: ignore[index]
    assert register_barrier(TCPStoreBarrier) is TCPStoreBarrier  # the same class again is fine


def test_backend_cache_is_bounded_and_clearable() -> None:
    from cloudckpt.storage import registry

    registry.clear_backend_cache()
    first, _ = resolve("memory://cache-test/a")
    assert resolve("memory://cache-test/b")[0] is first  # shared per options
    for i in range(registry.CACHE_SIZE + 3):
        resolve("memory://cache-test/a", storage_options={"listings_expiry_time": i})
    assert len(registry._cache) == registry.CACHE_SIZE
    registry.clear_backend_cache()
    assert len(registry._cache) == 0
    assert resolve("memory://cache-test/a")[0] is not first
