"""S3 requests without s3fs: listings, GETs, HEADs, single PUTs and deletes over ``http.client``.

A new process that only looks (``cloudckpt latest``, ``ls``, ``info``) spent most of its time
importing s3fs, aiobotocore and aiohttp and loading botocore's S3 service model before its
first request. This client takes what must match the full client from botocore itself, which
is cheap to import without a client: the credentials (botocore's session and its whole chain:
explicit keys, environment, profiles, SSO, roles, instance metadata), the region, the CA
bundle and the SigV4 signer. What it does itself is small: build a few kinds of requests
(``ListObjectsV2``, ``GetObject``, ``HeadObject``, ``HeadBucket``, ``PutObject``,
``DeleteObject``, ``DeleteObjects``), send them, parse the XML.

A save spent more time making s3fs's client (an aiohttp session with a TLS context even for an
``http://`` endpoint, botocore's S3 service model) than sending a small checkpoint's objects, so
a single-object ``PutObject`` goes through here too. Its body is the writer's views of tensor
memory, handed to the socket as they are. The payload is sent unsigned (``UNSIGNED-PAYLOAD``)
with its CRC32C in ``x-amz-checksum-crc32c``, which S3 checks before it stores the object (a
mismatch is 400 ``BadDigest``): the integrity check botocore itself relies on over TLS, at a
fraction of the cost of the SHA-256 it computes otherwise.

It is used only where the options leave nothing for the full client to decide differently:
an explicit ``endpoint_url`` (path-style addressing, as botocore uses for one), no proxy, no
anonymous access, no option it does not know. :func:`plan` returns ``None`` otherwise, and the
backend uses s3fs for everything, as before.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cloudckpt.storage.plainhttp import ConnectionPool

#: Storage options the plain client understands (the rest make it stand aside).
_OPTIONS = frozenset(
    {"endpoint_url", "key", "secret", "token", "username", "password", "profile", "client_kwargs",
     "config_kwargs", "use_ssl", "skip_instance_cache", "use_listings_cache", "anon",
     "default_block_size", "default_fill_cache", "default_cache_type", "fixed_upload_size",
     "local_expiry_check", "listings_expiry_time", "max_paths"}
)  # fmt: skip
_CLIENT_KWARGS = frozenset(
    {"endpoint_url", "region_name", "aws_access_key_id", "aws_secret_access_key",
     "aws_session_token", "use_ssl", "verify"}
)  # fmt: skip
#: botocore Config keys that change nothing for these requests (the backend sets most of them).
_CONFIG_KWARGS = frozenset(
    {"connect_timeout", "read_timeout", "retries", "request_checksum_calculation",
     "response_checksum_validation", "parameter_validation", "region_name",
     "signature_version", "s3", "max_pool_connections", "tcp_keepalive"}
)  # fmt: skip
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy")


class PlainHTTPError(Exception):
    """A store's error answer, shaped like botocore's ``ClientError.response`` so that the
    backend's ``answer_of`` reads it the same way."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}".strip())
        self.response = {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        }


@dataclass(frozen=True)
class Plan:
    """What the plain client needs, from the storage options: endpoint, region, timeouts,
    TLS verification, and the explicit keys or profile handed to botocore's session."""

    endpoint: urllib.parse.SplitResult
    region: str | None
    connect_timeout: float
    read_timeout: float
    verify: bool | str | None
    keys: tuple[str, str, str | None] | None = field(repr=False)  # never in a repr or a log
    profile: str | None = None


def plan(options: Mapping[str, Any]) -> Plan | None:
    """The plain client's settings for these storage options (s3fs's names, as the backend
    hands them to s3fs), or ``None`` where only the full client resolves them the same way."""
    if set(options) - _OPTIONS or options.get("anon"):
        return None
    client = dict(options.get("client_kwargs") or {})
    config = dict(options.get("config_kwargs") or {})
    if set(client) - _CLIENT_KWARGS or set(config) - _CONFIG_KWARGS:
        return None
    if config.get("signature_version") not in (None, "s3v4"):
        return None
    s3_config = config.get("s3") or {}
    if not isinstance(s3_config, dict) or set(s3_config) - {"addressing_style"}:
        return None
    if s3_config.get("addressing_style") == "virtual":
        return None
    endpoint = options.get("endpoint_url") or client.get("endpoint_url")
    if not isinstance(endpoint, str) or client.get("endpoint_url") not in (None, endpoint):
        return None
    split = urllib.parse.urlsplit(endpoint)
    if split.scheme not in ("http", "https") or not split.hostname or split.query:
        return None
    if any(os.environ.get(v) or os.environ.get(v.upper()) for v in _PROXY_VARS):
        return None  # botocore's proxy rules (no_proxy, per-scheme) stay botocore's
    if (options.get("key") and options.get("username")) or (
        options.get("secret") and options.get("password")
    ):
        return None  # s3fs refuses the pair: its error, from the full client
    key = options.get("key") or options.get("username") or client.get("aws_access_key_id")
    secret = options.get("secret") or options.get("password") or client.get("aws_secret_access_key")
    token = options.get("token") or client.get("aws_session_token")
    if bool(key) != bool(secret):
        return None  # botocore's PartialCredentialsError, from the full client
    region = client.get("region_name") or config.get("region_name")
    return Plan(
        endpoint=split,
        region=str(region) if region else None,
        connect_timeout=float(config.get("connect_timeout", 60)),
        read_timeout=float(config.get("read_timeout", 60)),
        verify=client.get("verify"),
        keys=(str(key), str(secret), str(token) if token else None) if key else None,
        profile=str(options["profile"]) if options.get("profile") else None,
    )


@dataclass(frozen=True)
class ListedObject:
    """One object of a listing: its whole key, size in bytes, and modification time."""

    key: str
    size: int
    mtime: float | None


@dataclass(frozen=True)
class Listing:
    """One ``ListObjectsV2`` answer, every page: the objects and the common prefixes."""

    objects: list[ListedObject]
    prefixes: list[str]


class PlainClient:
    """Signed S3 requests over ``http.client`` with botocore's credentials and signer.

    Thread-safe: each request takes an idle connection or opens one. Raises
    :class:`PlainHTTPError` for a store's error answer and the socket's own exceptions
    otherwise; the backend retries and maps both, as for the full client.
    """

    def __init__(self, settings: Plan) -> None:
        import botocore.session
        from botocore.credentials import Credentials

        self.settings = settings
        session = botocore.session.Session(profile=settings.profile)
        if settings.keys is not None:
            self._credentials: Any = Credentials(*settings.keys)
        else:
            self._credentials = session.get_credentials()
        if self._credentials is None:
            raise LookupError("no credentials")  # the full client says it in its own words
        self.region = settings.region or session.get_config_variable("region") or "us-east-1"
        self._ca_bundle = session.get_config_variable("ca_bundle")
        base = settings.endpoint
        self._connections = ConnectionPool(
            f"{base.scheme}://{base.netloc}", settings.read_timeout, self._tls_context,
            connect_timeout=settings.connect_timeout,
        )  # fmt: skip
        self._base_path = base.path.rstrip("/")
        self._origin = f"{base.scheme}://{base.netloc}"

    # -- requests ---------------------------------------------------------------------------

    def _tls_context(self) -> Any:
        """TLS as botocore verifies it: ``client_kwargs.verify``, else the configured CA
        bundle (``AWS_CA_BUNDLE``, the profile's ``ca_bundle``), else certifi's or botocore's."""
        import ssl

        verify = self.settings.verify
        if verify is False:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        cafile = verify if isinstance(verify, str) else self._ca_bundle
        if not cafile:
            from botocore.httpsession import get_cert_path

            cafile = get_cert_path(True)
        return ssl.create_default_context(cafile=cafile)

    def request(
        self,
        method: str,
        bucket: str,
        key: str = "",
        query: Mapping[str, str] | None = None,
        body: Sequence[memoryview | bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One signed request; ``(status, headers, body)`` of a 2xx answer, else
        :class:`PlainHTTPError`. A ``body`` (buffers sent in turn, never joined) goes with its
        CRC32C and an unsigned payload; ``headers`` are signed with the rest."""
        extra = dict(headers or {})
        if body is not None:
            extra["Content-Length"] = str(sum(memoryview(b).nbytes for b in body))
            extra["x-amz-checksum-crc32c"] = crc32c_header(body)
        path, signed = self.signed(method, bucket, key, query, extra, unsigned=body is not None)
        conn = self._connections.take()
        reusable = False
        try:
            conn.request(method, path, body=body, headers=signed)
            resp = conn.getresponse()
            try:
                data = resp.read()
            except http.client.IncompleteRead as e:
                raise ConnectionResetError(f"the answer was cut short ({e})") from e
            reusable = not resp.will_close
            status, reason = resp.status, resp.reason
            answer = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            self._connections.give(conn, reusable)
        if 200 <= status < 300:
            return status, answer, data
        code, message = _error_of(data)
        # botocore's words for a bodiless answer (a HEAD): the status and its reason
        raise PlainHTTPError(status, code or str(status), message or reason)

    def signed(
        self,
        method: str,
        bucket: str,
        key: str = "",
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        unsigned: bool = False,
    ) -> tuple[str, dict[str, str]]:
        """The request's path (with its query) and headers, signed as botocore signs them:
        path-style, the key quoted as botocore quotes it, SigV4 for ``s3`` in the region.
        ``unsigned``: the payload is not hashed into the signature (``UNSIGNED-PAYLOAD``)."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        from ._unsigned import UnsignedPayload as _UnsignedPayload

        path = f"{self._base_path}/{urllib.parse.quote(bucket, safe='')}"
        if key:
            path += "/" + urllib.parse.quote(key, safe="/~")
        if query:
            path += "?" + "&".join(
                f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                for k, v in sorted(query.items())
            )
        req = AWSRequest(method=method, url=self._origin + path, headers=dict(headers or {}))
        creds = self._credentials.get_frozen_credentials()
        (_UnsignedPayload if unsigned else S3SigV4Auth)(creds, "s3", self.region).add_auth(req)
        return path, {k: str(v) for k, v in req.headers.items()}

    def get(self, bucket: str, key: str) -> bytes:
        return self.request("GET", bucket, key)[2]

    def head(self, bucket: str, key: str = "") -> dict[str, str]:
        return self.request("HEAD", bucket, key)[1]

    def list(self, bucket: str, prefix: str, *, delimiter: bool, limit: int = 0) -> Listing:
        """Every page of ``ListObjectsV2`` under ``prefix`` (or the first ``limit`` keys),
        with ``encoding-type=url`` as botocore sends it (names decoded here)."""
        query = {"list-type": "2", "prefix": prefix, "encoding-type": "url"}
        if delimiter:
            query["delimiter"] = "/"
        if limit:
            query["max-keys"] = str(limit)
        out = Listing([], [])
        while True:
            page = ET.fromstring(self.get_listing(bucket, query))
            decode = _text(page, "EncodingType") == "url"
            for item in _children(page, "Contents"):
                name = _text(item, "Key")
                name = urllib.parse.unquote_plus(name) if decode else name
                when = _text(item, "LastModified")
                out.objects.append(
                    ListedObject(name, int(_text(item, "Size") or 0), _timestamp(when))
                )
            for item in _children(page, "CommonPrefixes"):
                p = _text(item, "Prefix")
                out.prefixes.append(urllib.parse.unquote_plus(p) if decode else p)
            token = _text(page, "NextContinuationToken")
            if limit or _text(page, "IsTruncated") != "true" or not token:
                return out
            query["continuation-token"] = token

    def get_listing(self, bucket: str, query: Mapping[str, str]) -> bytes:
        return self.request("GET", bucket, "", query)[2]

    def get_versioned(self, bucket: str, key: str) -> tuple[bytes, str]:
        """The object and its ETag (quoted, as S3 sends it)."""
        _, headers, body = self.request("GET", bucket, key)
        return body, headers.get("etag", "")

    def put(
        self,
        bucket: str,
        key: str,
        body: Sequence[memoryview | bytes],
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """One ``PutObject`` of ``body``; the answer's headers. ``headers``: conditions
        (``If-None-Match``, ``If-Match``)."""
        return self.request("PUT", bucket, key, body=body, headers=headers)[1]

    def delete(self, bucket: str, key: str) -> None:
        """One ``DeleteObject`` (a missing key is no error, as on S3)."""
        self.request("DELETE", bucket, key)

    def delete_many(self, bucket: str, keys: Sequence[str]) -> None:
        """One quiet ``DeleteObjects`` of at most 1,000 keys. As on the s3fs path, the store's
        per-key errors in its answer are not raised."""
        root = ET.Element("Delete")
        ET.SubElement(root, "Quiet").text = "true"
        for k in keys:
            ET.SubElement(ET.SubElement(root, "Object"), "Key").text = k
        doc = ET.tostring(root, encoding="utf-8")
        md5 = hashlib.md5(doc, usedforsecurity=False).digest()  # S3 requires it here
        headers = {"Content-MD5": base64.b64encode(md5).decode()}
        self.request("POST", bucket, "", {"delete": ""}, body=[doc], headers=headers)

    def close(self) -> None:
        self._connections.close()


def crc32c_header(body: Sequence[memoryview | bytes]) -> str:
    """``x-amz-checksum-crc32c``'s value for these buffers: the big-endian CRC32C, base64."""
    import crc32c

    value = 0
    for b in body:
        value = crc32c.crc32c(b, value)
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(node: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in node if _local(c.tag) == name]


def _text(node: ET.Element, name: str) -> str:
    for c in node:
        if _local(c.tag) == name:
            return c.text or ""
    return ""


def _timestamp(text: str) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _error_of(body: bytes) -> tuple[str, str]:
    """``(code, message)`` of an S3 error document (empty for a HEAD's bodiless answer)."""
    if not body:
        return "", ""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", body[:200].decode("utf-8", "replace")
    return _text(root, "Code"), _text(root, "Message")
