"""The S3 backend's plain client (cloudckpt_s3.lite): when it is used, and that it answers
exactly as the s3fs path does (names, sizes, bytes, errors and their messages)."""

from __future__ import annotations

import socket
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from faults import FaultProxy
from stores.s3 import S3Server

import cloudckpt
from cloudckpt.storage import open_backend
from cloudckpt.storage.registry import known_options

pytestmark = pytest.mark.s3

lite = pytest.importorskip("cloudckpt_s3.lite")

NAMES = ["a", "b c", "x+y", "per%cent", "ünï", "tilde~", "q?=&", "deep/er/obj"]


@pytest.fixture
def proxy(moto_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server.host, moto_server.port) as p:
        yield p


def _backends(options: dict[str, Any], uri: str) -> tuple[Any, Any, str]:
    """A backend on the plain client and one on s3fs (made to use it first), same options."""
    plain, path = open_backend(uri, storage_options=options)
    full, _ = open_backend(uri, storage_options=options)
    assert full.fs is not None  # s3fs from the start: the plain client is never made
    return plain, full, path


def _put_empty_objects(bucket: str, keys: list[str]) -> None:
    """Empty objects straight into moto's store: the plugin's moto server runs in this process,
    and 1005 PUTs through HTTP took ~15 s of setup; what is read back goes through HTTP."""
    from moto.backends import get_backend
    from moto.core import DEFAULT_ACCOUNT_ID

    store = get_backend("s3")[DEFAULT_ACCOUNT_ID]["global"]
    for key in keys:
        store.put_object(bucket, key, b"")


def test_metadata_requests_answer_as_the_s3fs_path(moto_server: S3Server) -> None:
    bucket = moto_server.new_bucket()
    s3 = moto_server.client()
    for name in NAMES:
        s3.put_object(Bucket=bucket, Key=f"root/{name}", Body=name.encode() * 3)
    s3.put_object(Bucket=bucket, Key="root/dir/", Body=b"")  # a directory marker
    plain, full, path = _backends(moto_server.options(), f"s3://{bucket}/root")
    try:
        assert plain.list_dir(path) == full.list_dir(path)
        assert plain._plain is not None and plain._fs is None  # no s3fs made
        for name in NAMES:
            p = plain.join(path, name)
            assert plain.read_bytes(p) == full.read_bytes(p) == name.encode() * 3
            assert plain.exists(p) and full.exists(p)
        for p in (plain.join(path, "deep"), plain.join(path, "nothing"), path):
            assert plain.exists(p) == full.exists(p)
        plain.check_location(path)
        many = [f"root/many/{i:04d}" for i in range(1005)]  # two pages
        _put_empty_objects(bucket, many)
        listed = plain.list_dir(plain.join(path, "many"))
        assert [i.name for i in listed] == [k.rsplit("/", 1)[1] for k in many]
        assert listed == full.list_dir(full.join(path, "many"))
        assert plain._fs is None
    finally:
        plain.close()
        full.close()


def test_a_multipart_upload_moves_every_request_to_s3fs(moto_server: S3Server) -> None:
    bucket = moto_server.new_bucket()
    options = moto_server.options(part_size=5 << 20, multipart_threshold=5 << 20)
    backend, path = open_backend(f"s3://{bucket}/r", storage_options=options)
    try:
        assert backend.list_dir(path) == []
        plain = backend._plain
        assert plain is not None
        backend.write_object(backend.join(path, "small"), [b"data"], 4)
        assert backend._plain is plain and backend._fs is None  # one PUT: still plain
        big = bytes(range(256)) * (24 << 12)  # 6 MiB: two parts
        backend.write_object(backend.join(path, "big"), [big[:100], big[100:]], len(big))
        assert backend._plain is None and plain._connections.closed  # closed, s3fs from now on
        assert backend.read_bytes(backend.join(path, "small")) == b"data"
        assert moto_server.client().get_object(Bucket=bucket, Key="r/big")["Body"].read() == big
    finally:
        backend.close()


@pytest.fixture(params=["moto_server", "seaweed_server"])
def any_s3(request: pytest.FixtureRequest) -> S3Server:
    """moto, then SeaweedFS: the plain client's writes must hold on both."""
    server: S3Server = request.getfixturevalue(request.param)
    return server


def test_writes_and_deletes_go_through_the_plain_client(any_s3: S3Server) -> None:
    bucket = any_s3.new_bucket()
    s3 = any_s3.client()
    tensor = torch.arange(1000, dtype=torch.float32)
    views = [memoryview(b"head"), memoryview(tensor.numpy()).cast("B"), memoryview(b"tail")]
    want = b"head" + tensor.numpy().tobytes() + b"tail"
    backend, path = open_backend(f"s3://{bucket}/r", storage_options=any_s3.options())
    try:
        obj = backend.join(path, "d/obj")
        backend.write_object(obj, views, len(want))  # views of tensor memory, sent as they are
        assert s3.get_object(Bucket=bucket, Key="r/d/obj")["Body"].read() == want
        man = backend.join(path, "manifest.json")
        backend.put_create_only(man, b"one")
        with pytest.raises(FileExistsError):
            backend.put_create_only(man, b"two")
        got = backend.read_version(man)
        assert got is not None and got.data == b"one"
        assert got.version == s3.head_object(Bucket=bucket, Key="r/manifest.json")["ETag"]
        backend.put_replace(man, b"three", got.version)
        with pytest.raises(FileExistsError):
            backend.put_replace(man, b"four", got.version)  # stale: replaced meanwhile
        assert backend.read_bytes(man) == b"three"
        assert backend.read_version(backend.join(path, "absent")) is None
        backend.delete(backend.join(path, "d"), recursive=True)
        assert not backend.exists(obj) and [i.name for i in backend.list_dir(path)] == [
            "manifest.json"
        ]
        assert backend._fs is None  # s3fs was never made
    finally:
        backend.close()


def test_a_put_carries_its_crc32c_and_no_payload_hash(
    seaweed_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The body is unsigned; its CRC32C header is what the store checks (SeaweedFS does, as
    S3 does; moto 5.2 ignores it): a wrong one is refused, never stored."""
    bucket = seaweed_server.new_bucket()
    backend, path = open_backend(f"s3://{bucket}/r", storage_options=seaweed_server.options())
    try:
        backend.write_object(backend.join(path, "ok"), [b"hello ", b"world"], 11)
        head = seaweed_server.client().head_object(
            Bucket=bucket, Key="r/ok", ChecksumMode="ENABLED"
        )
        assert head["ChecksumCRC32C"] == lite.crc32c_header([b"hello world"]) == "yZRlqg=="
        monkeypatch.setattr(lite, "crc32c_header", lambda body: "AAAAAA==")
        with pytest.raises(cloudckpt.BackendError) as e:
            backend.write_object(backend.join(path, "bad"), [b"hello world"], 11)
        assert "HTTP 400 BadDigest" in str(e.value) and str(e.value).startswith(
            f"s3://{bucket}/r/bad: the store answered"
        )
        assert not backend.exists(backend.join(path, "bad"))
    finally:
        backend.close()


def test_plain_writes_are_retried_through_faults(moto_server: S3Server, proxy: FaultProxy) -> None:
    bucket = moto_server.new_bucket()
    proxy.inject(status=503, times=2, method="PUT")
    proxy.inject(drop=True, times=1, method="PUT")
    proxy.inject(drop_answer=True, times=1, method="PUT", path_re="manifest")
    proxy.inject(status=500, times=1, method="POST", path_re="delete")
    options = moto_server.options(proxy.url)
    backend, path = open_backend(f"s3://{bucket}/r", storage_options=options)
    try:
        data = bytes(range(256)) * 4096
        backend.write_object(backend.join(path, "obj"), [data[:7], data[7:]], len(data))
        man = backend.join(path, "manifest.json")
        backend.put_replace(man, b"m", "")  # no old version: a plain PUT, answer lost once
        backend.delete(backend.join(path, "obj"))
        assert backend.retry_total() == 5 and backend._fs is None
        assert backend.read_bytes(man) == b"m" and not backend.exists(backend.join(path, "obj"))
    finally:
        backend.close()
    uri = f"s3://{bucket}/run/step-1"
    state = {f"t{i}": torch.randn(3000) for i in range(50)}
    proxy.inject(status=503, times=3, method="PUT")
    cloudckpt.save(uri, state, storage_options=options)
    out = cloudckpt.load(uri, storage_options=options)
    assert all(torch.equal(out[k], v) for k, v in state.items())


@pytest.mark.parametrize("case", ["missing bucket", "refused"])
def test_plain_write_errors_are_the_s3fs_paths_errors(
    moto_server: S3Server, proxy: FaultProxy, case: str
) -> None:
    bucket = moto_server.new_bucket()
    uri = f"s3://{bucket}/r/x"
    if case == "missing bucket":
        uri = f"s3://nobucket-{bucket}/r/x"
    else:
        body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
        proxy.inject(status=403, times=None, body=body, method="PUT")
    plain, full, path = _backends(moto_server.options(proxy.url), uri)
    try:
        errors = []
        for backend in (plain, full):
            with pytest.raises(cloudckpt.BackendError) as e:
                backend.write_object(path, [b"data"], 4)
            errors.append(str(e.value))
            with pytest.raises(cloudckpt.BackendError) as e:
                backend.put_create_only(path, b"data")
            errors.append(str(e.value))
        assert plain._fs is None
        assert errors[:2] == errors[2:]
        assert ("does not exist" if case == "missing bucket" else "HTTP 403") in errors[0]
    finally:
        plain.close()
        full.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _said(e: BaseException) -> tuple[str, str]:
    """An error's message without the transport's own words in it (the client's exception
    name and text differ: ``EndpointConnectionError`` vs ``ConnectionRefusedError``)."""
    text = str(e)
    if "cannot reach the store" not in text:
        return text, ""
    return text.split(" (", 1)[0], text.rsplit("). ", 1)[1]


def _error(backend: Any, call: str, path: str) -> BaseException:
    with pytest.raises(Exception) as info:
        getattr(backend, call)(path)
    return info.value


@pytest.mark.parametrize("call", ["list_dir", "read_bytes", "check_location", "exists"])
def test_errors_are_the_s3fs_paths_errors(
    moto_server: S3Server, proxy: FaultProxy, call: str
) -> None:
    bucket = moto_server.new_bucket()
    cases = {
        "missing bucket": (moto_server.options(), f"s3://nobucket-{bucket}/r/x"),
        "unreachable": (moto_server.options(f"http://127.0.0.1:{_closed_port()}"), "s3://b/r/x"),
    }
    for case, (opts, uri) in cases.items():
        plain, full, path = _backends(opts, uri)
        try:
            if call == "check_location" and case == "unreachable":
                continue
            got, want = _error(plain, call, path), _error(full, call, path)
            assert plain._fs is None, case
            assert type(got) is type(want), (case, got, want)
            assert _said(got) == _said(want), case
        finally:
            plain.close()
            full.close()
    body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
    proxy.inject(status=403, times=None, body=body, method="GET")
    plain, full, path = _backends(moto_server.options(proxy.url), f"s3://{bucket}/r/x")
    try:
        if call in ("list_dir", "read_bytes"):  # GETs (the proxy's fault has a body)
            got, want = _error(plain, call, path), _error(full, call, path)
            assert isinstance(got, cloudckpt.BackendError)
            assert type(got) is type(want) and str(got) == str(want)
            assert "the store refused the request (HTTP 403 AccessDenied" in str(got)
    finally:
        plain.close()
        full.close()


def test_retries_apply_to_the_plain_client(moto_server: S3Server, proxy: FaultProxy) -> None:
    bucket = moto_server.new_bucket()
    moto_server.client().put_object(Bucket=bucket, Key="r/obj", Body=b"x")
    proxy.inject(status=503, times=2, method="GET")
    backend, path = open_backend(f"s3://{bucket}/r", storage_options=moto_server.options(proxy.url))
    try:
        assert backend.read_bytes(backend.join(path, "obj")) == b"x"
        assert backend.retry_total() == 2 and backend._fs is None
    finally:
        backend.close()


BASE = {"endpoint_url": "http://127.0.0.1:9000", "key": "k", "secret": "s"}


@pytest.mark.parametrize(
    "options",
    [
        {**BASE, "anon": True},
        {k: v for k, v in BASE.items() if k != "endpoint_url"},  # AWS's own endpoints
        {**BASE, "config_kwargs": {"s3": {"addressing_style": "virtual"}}},
        {**BASE, "config_kwargs": {"proxies": {"http": "http://proxy:1"}}},
        {**BASE, "requester_pays": True},
        {**BASE, "s3_additional_kwargs": {"SSECustomerKey": "x"}},
        {**BASE, "client_kwargs": {"endpoint_url": "http://elsewhere:9000"}},
        {"endpoint_url": "http://127.0.0.1:9000", "key": "k"},  # no secret: botocore's error
        {**BASE, "endpoint_url": "127.0.0.1:9000"},  # no scheme: botocore's error
    ],
)
def test_options_the_plain_client_leaves_to_s3fs(options: dict[str, Any]) -> None:
    assert lite.plan(options) is None


def test_a_proxy_in_the_environment_leaves_it_to_s3fs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert lite.plan(BASE) is not None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert lite.plan(BASE) is None


def test_plan_reads_what_botocore_would() -> None:
    plan = lite.plan(
        {
            "client_kwargs": {"endpoint_url": "https://s3.example:8443/base", "region_name": "eu"},
            "config_kwargs": {"connect_timeout": 3, "read_timeout": 7},
        }
    )
    assert plan is not None
    assert (plan.endpoint.hostname, plan.endpoint.port, plan.endpoint.path) == (
        "s3.example",
        8443,
        "/base",
    )
    assert (plan.region, plan.connect_timeout, plan.read_timeout, plan.keys) == ("eu", 3, 7, None)


def test_declared_client_options_are_s3fs_options() -> None:
    import inspect

    import s3fs
    from cloudckpt_s3 import S3Backend

    params = set(inspect.signature(s3fs.S3FileSystem.__init__).parameters) - {"self", "kwargs"}
    # profile: s3fs hands options it does not name to aiobotocore's session (its docs' example)
    assert set(S3Backend.client_options) == params | {"profile"}  # s3fs changed: update them
    known = known_options(S3Backend, "s3")
    assert known is not None and set(S3Backend.client_options) <= known


class _Captured(Exception):
    pass


def _botocore_request(options: dict[str, Any], op: str, **params: Any) -> Any:
    """The request botocore's own client signs for ``op`` (captured before it is sent)."""
    import botocore.session
    from botocore.config import Config

    client_kwargs = dict(options.get("client_kwargs") or {})
    client = botocore.session.Session().create_client(
        "s3",
        endpoint_url=options["endpoint_url"],
        aws_access_key_id=options["key"],
        aws_secret_access_key=options["secret"],
        config=Config(**(options.get("config_kwargs") or {})),
        **client_kwargs,
    )
    seen: list[Any] = []

    def capture(request: Any, **_: Any) -> None:
        seen.append(request)
        raise _Captured

    client.meta.events.register("before-send.s3", capture)
    with pytest.raises(_Captured):
        getattr(client, op)(**params)
    return seen[0]


def _parts(url: str, headers: Mapping[str, Any]) -> tuple[Any, ...]:
    split = urllib.parse.urlsplit(url)
    auth = str(headers["Authorization"])
    scope = auth.split("Credential=", 1)[1].split(",", 1)[0].split("/", 2)[2]  # region/s3/...
    signed = auth.split("SignedHeaders=", 1)[1].split(",", 1)[0]
    return split.path, sorted(urllib.parse.parse_qsl(split.query)), scope, signed


@pytest.mark.parametrize(
    "extra",
    [{}, {"client_kwargs": {"region_name": "eu-central-1"}}],
)
@pytest.mark.parametrize("key", ["run/step-1/manifest.json", "odd key+ü~%/x=y&z"])
def test_requests_are_the_ones_botocore_signs(
    monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any], key: str
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    checksums = {  # as the backend sets them for s3fs
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
    options = {
        **BASE, "endpoint_url": "http://127.0.0.1:9000/base", "config_kwargs": checksums, **extra
    }  # fmt: skip
    settings = lite.plan(options)
    assert settings is not None
    client = lite.PlainClient(settings)
    origin = "http://127.0.0.1:9000"
    path, headers = client.signed("GET", "bkt", key)
    want = _botocore_request(options, "get_object", Bucket="bkt", Key=key)
    assert _parts(origin + path, headers) == _parts(want.url, want.headers)
    query = {"list-type": "2", "prefix": key, "delimiter": "/", "encoding-type": "url"}
    path, headers = client.signed("GET", "bkt", "", query)
    want = _botocore_request(options, "list_objects_v2", Bucket="bkt", Prefix=key, Delimiter="/")
    assert _parts(origin + path, headers) == _parts(want.url, want.headers)
    path, headers = client.signed("HEAD", "bkt")
    want = _botocore_request(options, "head_bucket", Bucket="bkt")
    assert _parts(origin + path, headers) == _parts(want.url, want.headers)


def test_a_named_profile_signs_both_paths(
    moto_server: S3Server, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``profile`` (documented in docs/backends/s3.md) was refused by the option check; now a
    save and a load take it, and the plain client signs with the profile's keys."""
    creds = tmp_path / "credentials"
    creds.write_text("[ckpt]\naws_access_key_id = PROFILEKEY\naws_secret_access_key = s\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent"))
    options = {"endpoint_url": moto_server.options()["endpoint_url"], "profile": "ckpt"}
    bucket = moto_server.new_bucket()
    uri = f"s3://{bucket}/run/step-1"
    cloudckpt.save(uri, {"w": torch.arange(4)}, storage_options=options)
    assert lite.plan(options) is not None and "PROFILEKEY" not in repr(lite.plan(options))
    backend, path = open_backend(uri, storage_options=options)
    try:
        assert backend.exists(backend.join(path, "manifest.json"))
        assert backend._plain is not None and backend._fs is None
        assert backend._plain._credentials.access_key == "PROFILEKEY"
    finally:
        backend.close()
    assert torch.equal(cloudckpt.load(uri, storage_options=options)["w"], torch.arange(4))


def test_an_unknown_profile_is_a_backend_error_naming_it(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent"))
    options = {"endpoint_url": "http://127.0.0.1:9", "profile": "nope"}
    with pytest.raises(cloudckpt.BackendError) as e:
        cloudckpt.load("s3://b/run/step-1", storage_options=options)
    assert str(e.value) == (
        "s3://b/run/step-1/manifest.json: ProfileNotFound: "
        "The config profile (nope) could not be found"
    )
