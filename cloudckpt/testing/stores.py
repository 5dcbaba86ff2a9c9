"""What the fixtures hand a test: a fresh place on a store, and the fault proxy in front of one."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .faults import FaultProxy, Rule, Seen
from .servers import GCSServer, S3Server, environ, fresh_name


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string


@dataclass
class CloudStore:
    """A fresh bucket and prefix on a local test server.

    ``uri`` is the prefix (``s3://bucket/prefix``), ``storage_options`` reach the server from
    ``cloudckpt.save``/``load``/``CheckpointManager``, ``config_file`` is a TOML file that selects
    the backend, the root and the endpoint (credentials are not in it: the fixture sets fake ones
    in the environment for the test), ``client`` is a boto3 S3 client (S3) or a
    ``google.cloud.storage`` client (GCS, when that package is installed).
    """

    backend: str
    bucket: str
    prefix: str
    server: S3Server | GCSServer
    storage_options: dict[str, Any]
    config_file: Path
    endpoint: str = ""
    _client: Any = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return f"{self.server.scheme}://{self.bucket}/{self.prefix}"

    def join(self, *parts: str) -> str:
        """``uri`` with ``parts`` appended: ``store.join("step-1")``."""
        return "/".join([self.uri, *parts])

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self.server.client(self.endpoint or None)
        return self._client

    def keys(self) -> list[str]:
        """Every object name under ``prefix``, sorted (through the store's own API)."""
        if self.backend == "s3":
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + "/"
            )
            return sorted(o["Key"] for p in pages for o in p.get("Contents", []))
        import fsspec

        fs = fsspec.filesystem("gcs", **_fsspec_options(self.storage_options))
        return sorted(p.split("/", 1)[1] for p in fs.find(f"{self.bucket}/{self.prefix}"))

    def through(self, endpoint: str, config_file: Path) -> CloudStore:
        """The same bucket and prefix reached through ``endpoint`` (a proxy)."""
        options = self.server.options(endpoint)
        write_config(config_file, self.backend, self.uri, options)
        return dataclasses.replace(
            self, storage_options=options, config_file=config_file, endpoint=endpoint, _client=None
        )


@contextlib.contextmanager
def fresh_store(server: S3Server | GCSServer, workdir: Path) -> Iterator[CloudStore]:
    """A fresh bucket and prefix on ``server`` and its config file under ``workdir``, with
    the server's environment (fake credentials) set for the block."""
    with environ(server.env):
        bucket, prefix = server.new_bucket(), fresh_name()
        options = server.options()
        config = workdir / "cloudckpt.toml"
        write_config(config, server.backend, f"{server.scheme}://{bucket}/{prefix}", options)
        yield CloudStore(server.backend, bucket, prefix, server, options, config)


def _fsspec_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k != "retry_stall_timeout"}


def write_config(path: Path, backend: str, root: str, options: dict[str, Any]) -> Path:
    """A cloudckpt TOML config selecting ``backend`` at ``root`` with ``options`` (no secrets)."""
    lines = ["[storage]", f"backend = {_toml_value(backend)}", f"root = {_toml_value(root)}", ""]
    lines.append("[storage.options]")
    for key, value in options.items():
        if key in ("key", "secret", "token") and backend == "s3":
            continue  # the fixture's environment carries the fake credentials
        lines.append(f"{key} = {_toml_value(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


class Faults:
    """Fault injection in front of a test store: ``store = faults.front(cloudckpt_s3)``.

    ``front`` starts a :class:`FaultProxy` to the store's server and returns the same bucket and
    prefix reached through it; ``inject`` adds a rule to every proxy started (see :class:`Rule`:
    ``status``, ``times``, ``method``, ``path_re``, ``delay``, ``drop``); ``seen`` lists the
    requests that passed, with the fault each got.
    """

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._proxies: dict[str, FaultProxy] = {}

    def front(self, store: CloudStore) -> CloudStore:
        target = store.server.endpoint
        proxy = self._proxies.get(target)
        if proxy is None:
            u = urlsplit(target)
            proxy = FaultProxy(u.hostname or "127.0.0.1", int(u.port or 80)).start()
            self._proxies[target] = proxy
        config = self._workdir / f"cloudckpt-{store.backend}-faults-{proxy.port}.toml"
        return store.through(proxy.url, config)

    def inject(self, **rule: Any) -> list[Rule]:
        """Add one rule (keyword arguments of :class:`Rule`) to each proxy; call ``front`` first."""
        if not self._proxies:
            raise RuntimeError("cloudckpt_faults: call front(store) before inject(...)")
        return [p.inject(**rule) for p in self._proxies.values()]

    def clear(self) -> None:
        for p in self._proxies.values():
            p.clear()

    @property
    def seen(self) -> list[Seen]:
        return [s for p in self._proxies.values() for s in p.seen]

    def faults(self) -> list[str]:
        """The faults injected so far, in order (``"503"``, ``"drop"``, ``"delay"``, ...)."""
        return [s.fault for s in self.seen if s.fault]

    def close(self) -> None:
        for p in self._proxies.values():
            p.stop()
        self._proxies.clear()
