"""load_config: a TOML file selecting each store drives save/load; every bad input is a
ConfigError naming the file, the line and the key; the reference in docs/ is generated."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from config_files import write_store_config
from stores import StoreTarget

import cloudckpt
from cloudckpt.config import (
    CONFIG_ENV,
    CheckpointerConfig,
    config_reference,
    load_config,
    missing_key_docs,
    resolve_config,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_config_file_selects_each_store(store: StoreTarget, tmp_path: Path) -> None:
    path = write_store_config(tmp_path / "c.toml", store, '[writer]\nfile_size = "1KiB"\n')
    cfg = load_config(path)
    assert cfg.storage.root == store.root and cfg.storage.options == store.storage_options
    assert cfg.writer_config.file_size == 1024
    sd = {"a": torch.arange(600, dtype=torch.float32), "b": torch.ones(300), "n": 3}
    cloudckpt.save("ckpt", sd, config=str(path))  # a relative name resolves against the root
    out = cloudckpt.load(store.uri("ckpt"), config=str(path))
    assert torch.equal(out["a"], sd["a"]) and torch.equal(out["b"], sd["b"]) and out["n"] == 3
    # 1 KiB files: the 2400-byte and 1200-byte tensors each got a file of their own
    manifest = cloudckpt.checkpoint_reader.open_checkpoint(
        store.uri("ckpt"), store.backend, store.storage_options
    ).manifest
    assert len(manifest.ranks[0].files) == 2


def test_units_nested_tables_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[storage]\nroot = 's3://cfg/x'\n[storage.options]\nendpoint_url = 'http://a'\n"
        "client_kwargs = {region_name = 'eu'}\n"
        "[writer]\nfile_size = '1.5GB'\nwrite_barrier_timeout_secs = '10m'\nconcurrency = 3\n"
        "[process]\nsubprocess_init_timeout_secs = '500ms'\nsubprocess_shutdown_timeout_secs = 7\n"
        "[barrier]\nbarrier_type = 'tcp_store'\n[barrier.barrier_args]\ntcpstore_port = 29511\n"
        "[staging]\nuse_async_staging = false\n"
    )
    cfg = load_config(path)
    assert cfg.writer_config.file_size == 1_500_000_000
    assert cfg.writer_config.write_barrier_timeout_secs == 600
    assert cfg.writer_config.concurrency == 3
    assert cfg.process_config.subprocess_init_timeout_secs == 0.5
    assert cfg.process_config.subprocess_shutdown_timeout_secs == 7
    assert cfg.barrier_config.barrier_type == "tcp_store"
    assert cfg.barrier_config.barrier_args == {"tcpstore_port": 29511}
    assert cfg.staging_config.use_async_staging is False
    assert cfg.storage.options == {
        "endpoint_url": "http://a",
        "client_kwargs": {"region_name": "eu"},
    }
    assert cfg.storage.options_with({"endpoint_url": "http://b"})["endpoint_url"] == "http://b"


def test_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    path = tmp_path / "env.toml"
    path.write_text(f"[storage]\nroot = {str(root)!r}\n[writer]\nconcurrency = 2\n")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert resolve_config(None).writer_config.concurrency == 2
    cloudckpt.save("from-env", {"x": torch.ones(3)})  # no config=: $CLOUDCKPT_CONFIG's root
    assert (root / "from-env" / "manifest.json").is_file()
    explicit = CheckpointerConfig()
    assert resolve_config(explicit) is explicit  # an explicit config wins over the variable
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "missing.toml"))
    with pytest.raises(cloudckpt.ConfigError, match=r"missing\.toml: cannot read the config file"):
        cloudckpt.save("x", {"x": 1})


BAD = [
    # (file text, pattern after "<file>:<line>: " (line None: no line), line)
    ("[wirter]\nfile_size = 1\n", r"unknown table \[wirter\]; known tables: \[barrier\]", 1),
    ("root = 'x'\n", r"unknown top-level key 'root'; known tables", 1),
    (
        "[writer]\nconcurrency = 2\nfilesize = 1\n",
        r"unknown key 'filesize' in \[writer\]; known keys: concurrency, file_size",
        3,
    ),
    ("[writer]\nconcurrency = '8'\n", r"\[writer\] concurrency: expected int, got str '8'", 2),
    (
        "[staging]\n\nuse_async_staging = 1\n",
        r"\[staging\] use_async_staging: expected boolean, got int 1",
        3,
    ),
    (
        "[storage]\noptions = 'x'\n",
        r"\[storage\] options: expected table, got a str$",
        2,
    ),
    ("[storage]\nroot = 5\n", r"\[storage\] root: expected string or absent, got int 5", 2),
    (
        "[writer]\n[writer.concurrency]\na = 1\n",
        r"\[writer\] concurrency: expected int, got a dict",
        2,
    ),
    (
        "[writer]\nfile_size = '256MeB'\n",
        r"\[writer\] file_size: expected a size like 268435456, '256MiB'.*got '256MeB'",
        2,
    ),
    ("[writer]\nfile_size = -5\n", r"\[writer\] file_size: a size cannot be negative: -5", 2),
    (
        "[writer]\nwrite_barrier_timeout_secs = 'soon'\n",
        r"\[writer\] write_barrier_timeout_secs: expected a duration like 600, '10m'.*got 'soon'",
        2,
    ),
    ("[writer]\nconcurrency = 0\n", r"\[writer\] concurrency: must be at least 1, got 0", 2),
    (
        "[storage]\nroot = 'x'\nbackend = 'azure'\n",
        r"\[storage\] backend = 'azure' is not installed; known: .*fsspec.*local.*Install its plugin",
        3,
    ),
    (
        "[barrier]\nbarrier_type = 'mpi'\n",
        r"\[barrier\] barrier_type = 'mpi' is unknown; use one of dist_barrier, tcp_store",
        2,
    ),
    ("[writer]\nconcurrency = \n", r"not valid TOML: .*line 2", None),
    ("[writer]\nconcurrency = 1\n[writer]\n", r"not valid TOML: .*line 3", None),
]


@pytest.mark.parametrize(("text", "pattern", "line"), BAD)
def test_bad_config_names_file_line_and_key(
    tmp_path: Path, text: str, pattern: str, line: int | None
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    prefix = re.escape(str(path)) + (f":{line}: " if line else ": ")
    with pytest.raises(cloudckpt.ConfigError, match="^" + prefix + pattern):
        load_config(path)
    # every entry point reports it the same way
    with pytest.raises(cloudckpt.ConfigError, match=re.escape(str(path))):
        cloudckpt.CheckpointManager("memory://never", config=str(path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(
        cloudckpt.ConfigError,
        match=re.escape(str(tmp_path / "nope.toml"))
        + r": cannot read the config file \(No such file or directory\); check the path",
    ):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("name", ["local", "memory", "s3", "gcs"])
def test_shipped_examples_load(name: str) -> None:
    cfg = load_config(DOCS / "examples" / f"{name}.toml")
    assert cfg.storage.root and cfg.storage.root.split(":")[0] in {
        "local": "/tmp/cloudckpt/runs/exp1",
        "memory": "memory",
        "s3": "s3",
        "gcs": "gs",
    }[name].split(":")


def test_memory_example_saves_and_loads() -> None:
    path = DOCS / "examples" / "memory.toml"
    with cloudckpt.CheckpointManager(config=str(path)) as mgr:
        step = (max(mgr.steps(), default=0)) + 1
        mgr.save(step, {"w": torch.arange(4)})
        assert torch.equal(mgr.load_latest()["w"], torch.arange(4))


def test_reference_is_generated_and_complete() -> None:
    assert missing_key_docs() == [], "declare every config key with setting(doc=...)"
    committed = (DOCS / "config-reference.md").read_text()
    assert committed == config_reference(), (
        "docs/config-reference.md is stale: run `cloudckpt config-reference > "
        "docs/config-reference.md`"
    )
