"""Mistaken input: config validated from field metadata at every entry point, barrier arguments
against the barrier's signature, storage options against the backend's declared options, rank
info from the barrier arguments, unknown keywords, nesting depth, and secrets never shown."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from multirank_harness import free_port, run_ranks
from stores import StoreTarget

import cloudckpt
from cloudckpt import cli
from cloudckpt.barriers import Barrier, BarrierConfig
from cloudckpt.checkpoint_writer import CheckpointWriter
from cloudckpt.config import CheckpointerConfig, load_config, validate
from cloudckpt.config_types import CheckpointWriterConfig
from cloudckpt.protocol.records import manifest_crc
from cloudckpt.storage import StorageConfig
from cloudckpt.types import RankInfo

DOCS = Path(__file__).resolve().parent.parent / "docs"
CANARY = "CANARY-s3cr3t-7f3a9e"


def _kw(store: StoreTarget, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"storage_options": {**store.storage_options, **(extra or {})}}


# -- validation from field metadata ---------------------------------------------------------


def test_configs_built_in_python_are_validated_like_files(tmp_path: Path) -> None:
    with pytest.raises(
        cloudckpt.ConfigError, match=r"^\[writer\] concurrency: must be at least 1, got 0$"
    ):
        CheckpointWriterConfig(concurrency=0)
    with pytest.raises(
        cloudckpt.ConfigError, match=r"^\[storage\] root: expected string or absent, got int 5$"
    ):
        StorageConfig(root=5)  # type: ignore[arg-type]
    cfg = CheckpointerConfig()
    cfg.writer_config.concurrency = "8"  # type: ignore[assignment]  # changed after construction
    with pytest.raises(
        cloudckpt.ConfigError,
        match=r"^config built in Python: \[writer\] concurrency: expected int, got str '8'$",
    ):
        cloudckpt.save(str(tmp_path / "a"), {"x": torch.ones(2)}, config=cfg)
    assert not (tmp_path / "a").exists()
    cfg.writer_config.concurrency = 2
    cfg.writer_config.file_size = "1KiB"
    cfg.process_config.subprocess_init_timeout_secs = "2m"  # type: ignore[assignment]
    assert validate(cfg) is cfg
    assert (
        cfg.writer_config.file_size == 1024
        and cfg.process_config.subprocess_init_timeout_secs == 120
    )
    with pytest.raises(
        cloudckpt.ConfigError, match=r"\[writer\] write_barrier_timeout_secs: expected a finite"
    ):
        CheckpointWriterConfig(write_barrier_timeout_secs=float("inf"))
    with pytest.raises(
        cloudckpt.ConfigError,
        match=r"process\] writer = 'proc' is not accepted; use one of thread, process",
    ):
        cloudckpt.CheckpointProcessConfig(writer="proc")


def test_barrier_args_checked_against_the_barrier_signature(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[barrier]\nbarrier_type = "tcp_store"\n[barrier.barrier_args]\nglobal_rank = 0\n'
        'global_world_size = 1\nmaster_adress = "10.0.0.1"\n'
    )
    with pytest.raises(
        cloudckpt.ConfigError,
        match=re.escape(
            f"{path}:6: [barrier.barrier_args] 'master_adress' (did you mean "
            "'master_address'?) is not an argument of TCPStoreBarrier (barrier_type = "
            "'tcp_store'); known: barrier_prefix, global_rank, global_world_size, "
            "master_address, tcpstore_port, timeout_barrier_init_secs, timeout_secs, "
            "use_checkpoint_barrier_tcpstore_libuv"
        ),
    ):
        load_config(path)
    # global_rank / global_world_size left out of a shared file come from this process
    cfg = CheckpointerConfig(
        barrier_config=BarrierConfig("tcp_store", {"tcpstore_port": free_port()})
    )
    cloudckpt.save(str(tmp_path / "b"), {"x": torch.ones(1)}, config=cfg)
    assert cloudckpt.load(str(tmp_path / "b"))["x"].tolist() == [1.0]
    path.write_text("[barrier.barrier_args]\ntimeout_secs = 5\n")
    with pytest.raises(
        cloudckpt.ConfigError,
        match=r"c\.toml:1: \[barrier.barrier_args\] is set but no barrier_type",
    ):
        load_config(path)


@pytest.mark.parametrize(
    ("typo", "hint"),
    [
        ("endpoint_ur", "endpoint_url"),
        ("part_sise", "part_size"),
        ("retry_max_atempts", "retry_max_attempts"),
    ],
)
def test_storage_option_typos_name_file_line_and_known_options(
    tmp_path: Path, typo: str, hint: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[storage]\nroot = "s3://bucket/run"\n[storage.options]\n{typo} = "1"\n')
    with pytest.raises(cloudckpt.ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(
        f"{path}:4: [storage.options] storage option {typo!r} (did you mean {hint!r}?) is not "
        "taken by backend 's3' for s3://; known options: "
    ), msg
    assert "endpoint_url" in msg and "part_size" in msg and "retry_stall_timeout" in msg


def test_storage_option_typos_at_call_time_on_every_store(store: StoreTarget) -> None:
    sd = {"x": torch.ones(3)}
    uri = store.uri("typo")
    with pytest.raises(
        cloudckpt.ConfigError, match=r"storage option 'endpoint_ur' .*is not taken by backend"
    ):
        cloudckpt.save(uri, sd, **_kw(store, {"endpoint_ur": "http://x"}))
    with pytest.raises(
        cloudckpt.ConfigError, match=re.escape(f"{uri}: storage option 'endpoint_ur'")
    ):
        cloudckpt.load(uri, **_kw(store, {"endpoint_ur": "http://x"}))
    with pytest.raises(
        cloudckpt.ConfigError, match=r"storage option 'bogus' is not taken by backend"
    ):
        cloudckpt.CheckpointManager(store.uri("mgr"), **_kw(store, {"bogus": 1})).steps()


def test_memory_store_refuses_options_it_would_ignore() -> None:
    with pytest.raises(
        cloudckpt.ConfigError,
        match=r"^memory://opts/x: storage option 'endpoint_url' is not taken by backend 'fsspec' "
        r"for memory://; known options: .*skip_instance_cache",
    ):
        cloudckpt.save(
            "memory://opts/x", {"x": torch.ones(1)}, storage_options={"endpoint_url": "http://a"}
        )


def test_malformed_uri_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(
        cloudckpt.ConfigError, match=r"^malformed URI 's3:/x': a store URI is s3://bucket/prefix"
    ):
        cloudckpt.save("s3:/x", {"x": torch.ones(1)})
    path = tmp_path / "c.toml"
    path.write_text('[storage]\nroot = "gs:bucket/run"\n')
    with pytest.raises(
        cloudckpt.ConfigError,
        match=re.escape(f"{path}:2: [storage] root: malformed URI 'gs:bucket/run'"),
    ):
        load_config(path)


# -- rank info from the barrier arguments ---------------------------------------------------


def _tcp_config(rank: int, world: int, port: int) -> CheckpointerConfig:
    return CheckpointerConfig(
        barrier_config=BarrierConfig(
            "tcp_store",
            {
                "global_rank": rank,
                "global_world_size": world,
                "tcpstore_port": port,
                "master_address": "127.0.0.1",
                "timeout_barrier_init_secs": 5,
            },
        )
    )


def test_rank_info_disagreeing_with_barrier_args_names_both(tmp_path: Path) -> None:
    cfg = _tcp_config(1, 2, free_port())
    with pytest.raises(
        cloudckpt.ConfigError,
        match=re.escape(
            "[barrier.barrier_args] says rank 1 of 2 (global_rank, global_world_size) "
            "but rank_info= says rank 0 of 1; make them agree"
        ),
    ):
        cloudckpt.save(
            str(tmp_path / "a"), {"x": torch.ones(1)}, config=cfg, rank_info=RankInfo(0, 1)
        )
    with pytest.raises(
        cloudckpt.ConfigError, match=r"says rank 1 of 2 .* but rank_info= says rank 0 of 2"
    ):
        cloudckpt.make_sync_checkpointer(cfg, rank_info=RankInfo(0, 2))
    with pytest.raises(
        cloudckpt.ConfigError, match=r"expected integers with 0 <= global_rank < global_world_size"
    ):
        cloudckpt.make_sync_checkpointer(_tcp_config(2, 2, free_port()))
    assert not (tmp_path / "a").exists()


class _FixedWorldBarrier(Barrier):
    """A wait-only barrier that says how many ranks it waits for (a custom barrier)."""

    barrier_type = "fixed_world_test"

    def __init__(self, world_size: int = 2) -> None:
        self._world = world_size

    def execute_barrier(self) -> None:
        raise AssertionError("never reached: the writer refuses first")

    @property
    def world_size(self) -> int | None:
        return self._world


def test_writer_refuses_a_world_size_its_barrier_disagrees_with(tmp_path: Path) -> None:
    writer = CheckpointWriter(
        CheckpointWriterConfig(),
        RankInfo(0, 1),
        barrier=_FixedWorldBarrier(2),
        storage=StorageConfig(),
    )
    uri = str(tmp_path / "w")
    with pytest.raises(
        cloudckpt.ConfigError,
        match=re.escape(
            f"{uri}: rank 0 thinks the job has 1 rank(s) but its barrier waits for 2; "
            "nothing was written"
        ),
    ):
        writer.write(uri, {"x": torch.ones(1)})
    writer.close()
    assert not os.path.exists(uri)


def _recipe_toml() -> str:
    text = (DOCS / "multirank.md").read_text()
    m = re.search(r"```toml\n(\[barrier\]\nbarrier_type = \"tcp_store\".*?)```", text, re.S)
    assert m, "docs/multirank.md lost its TOML recipe"
    return m.group(1)


def test_two_process_toml_recipe_from_the_docs_commits_both_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rank processes, each saving with nothing but its own copy of the recipe."""
    recipe = _recipe_toml()
    port = free_port()
    uri = str(tmp_path / "ckpt")
    configs = []
    for rank in (0, 1):
        text = re.sub(r"global_rank = 0\b", f"global_rank = {rank}", recipe)
        text = re.sub(r"global_world_size = \d+", "global_world_size = 2", text)
        text = re.sub(r"tcpstore_port = \d+", f"tcpstore_port = {port}", text)
        text = re.sub(r'master_address = "[^"]*"', 'master_address = "127.0.0.1"', text)
        path = tmp_path / f"rank{rank}.toml"
        path.write_text(text)
        configs.append(str(path))
    monkeypatch.delenv("CLOUDCKPT_CONFIG", raising=False)  # the ranks take this environment
    results = run_ranks("save_with_config_file", 2, {"configs": configs, "uri": uri})
    for rank, r in results.items():
        assert r["code"] == 0 and r["result"] == {"ok": True}, (rank, r)
    ckpt = cloudckpt.checkpoint_reader.open_checkpoint(uri, None, {})
    assert ckpt.manifest.world_size == 2
    for rank in (0, 1):
        out = cloudckpt.load(uri, rank=rank)
        assert out["rank"] == rank and torch.equal(out["w"], torch.full((4,), float(rank)))


# -- unknown keywords and nesting depth -----------------------------------------------------


def test_unknown_keywords_are_type_errors(tmp_path: Path) -> None:
    uri = str(tmp_path / "k")
    cloudckpt.save(uri, {"x": torch.ones(2)})
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'strikt'"):
        cloudckpt.load(uri, strikt=True)  # type: ignore[call-arg]
    with cloudckpt.make_sync_checkpointer() as ckpt:
        with pytest.raises(
            TypeError,
            match=r"^CheckpointReader.read\(\) got unexpected keyword argument\(s\) 'strikt'; it takes map_location, rank and storage_options$",
        ):
            ckpt.load(uri, strikt=True)
        with pytest.raises(
            TypeError,
            match=r"^CheckpointWriter.write\(\) got unexpected keyword argument\(s\) 'overwrit': extra keywords go to a commit hook, and this writer has none$",
        ):
            ckpt.save(str(tmp_path / "k2"), {"x": torch.ones(2)}, overwrit=True)
    assert not (tmp_path / "k2").exists()
    with cloudckpt.CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.save(1, {"x": torch.ones(2)})
        with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) 'strikt'"):
            mgr.load(1, strikt=True)


def test_deep_nesting_refused_before_a_byte_is_written(store: StoreTarget) -> None:
    deep: dict[str, Any] = {"leaf": torch.ones(2)}
    for _ in range(400):
        deep = {"a": deep}
    uri = store.uri("deep")
    with pytest.raises(
        cloudckpt.UnsupportedValueError,
        match=r"^a(\.a){99}: containers nested more than 100 deep; flatten this part",
    ):
        cloudckpt.save(uri, {"x": torch.ones(3), **deep}, **_kw(store))
    backend, path = cloudckpt.storage.resolve(
        uri, backend=store.backend, storage_options=store.storage_options
    )
    assert not backend.exists(path)
    ok: dict[str, Any] = {"leaf": 1}
    for _ in range(90):
        ok = {"a": ok}
    cloudckpt.save(uri, ok, **_kw(store))
    assert cloudckpt.load(uri, **_kw(store)) == ok


# -- secrets ----------------------------------------------------------------------------------


def test_canary_secret_never_in_reprs_errors_or_command_output(tmp_path: Path) -> None:
    options = {
        "key": CANARY,
        "secret": CANARY,
        "token": CANARY,
        "password": CANARY,
        "client_kwargs": {"aws_session_token": CANARY, "region_name": "eu"},
        "endpoint_url": "http://127.0.0.1:1",
    }
    path = tmp_path / "c.toml"
    path.write_text(
        '[storage]\nroot = "s3://bucket/run"\n[storage.options]\n'
        + "".join(f'{k} = "{CANARY}"\n' for k in ("key", "secret", "token", "password"))
        + f'client_kwargs = {{aws_session_token = "{CANARY}", region_name = "eu"}}\n'
        + '[barrier]\nbarrier_type = "tcp_store"\n[barrier.barrier_args]\n'
        + f'master_address = "{CANARY}-not-secret"\n'
    )
    cfg = load_config(path)
    texts = [
        repr(cfg),
        repr(cfg.storage),
        str(cfg),
        repr(StorageConfig(options=options)),
        repr(BarrierConfig("tcp_store", {"password": CANARY})),
    ]
    assert "region_name': 'eu'" in texts[0] and "'key': '***'" in texts[0]
    assert "-not-secret" in texts[0]  # only secret-looking keys are masked
    # a type error on a table never quotes its value
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[storage]\noptions = "secret={CANARY}"\n')
    with pytest.raises(cloudckpt.ConfigError) as e1:
        load_config(bad)
    texts.append(str(e1.value))
    with pytest.raises(cloudckpt.ConfigError) as e2:
        StorageConfig(options=f"token={CANARY}")  # type: ignore[arg-type]
    texts.append(str(e2.value))
    with pytest.raises(cloudckpt.ConfigError) as e3:
        load_config(tmp_path / "c.toml").storage.options["tokne"] = CANARY
        cloudckpt.CheckpointManager(
            config=validate(
                CheckpointerConfig(
                    storage=StorageConfig(root="s3://bucket/run", options={"tokne": CANARY})
                )
            )
        )
    texts.append(str(e3.value))
    # the command: a pair without '=', an unknown option next to a secret one
    for argv in (
        ["ls", str(tmp_path), "--storage-option", f"secret{CANARY}"],
        [
            "ls",
            "s3://bucket/run",
            "--storage-option",
            f"secret={CANARY}",
            "--storage-option",
            f"tokne={CANARY}",
        ],
        ["--config", str(bad), "ls", str(tmp_path)],
    ):
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = cli.main(argv)
            except SystemExit as exit_:
                code = int(exit_.code or 0)
        assert code == 2, (argv, err.getvalue())
        texts += [err.getvalue(), out.getvalue()]
    assert "--storage-option expects KEY=VALUE, got " in texts[-6]
    assert (
        "storage option 'tokne' (did you mean 'token'?) is not taken by backend 's3'" in texts[-4]
    )
    for text in texts:
        assert CANARY not in text.replace(f"{CANARY}-not-secret", ""), text


# -- listing: damaged checkpoints skipped, wrong locations are errors --------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CLOUDCKPT_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "cloudckpt", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


DAMAGED_MANIFESTS = {
    "infinity": lambda m: m.replace('"world_size": 1', '"world_size": Infinity'),
    "huge": lambda m: m.replace('"world_size": 1', '"world_size": 1000000000000'),
    "deep": lambda m: m.replace('"metadata": {}', '"metadata": ' + "[" * 100_000 + "]" * 100_000),
    "garbage": lambda m: "\x00\xff not json",
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_MANIFESTS))
def test_poisoned_root_skips_the_damaged_checkpoint(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "run"
    with cloudckpt.CheckpointManager(str(root)) as mgr:
        mgr.save(1, {"x": torch.ones(3), "step": 1})
        mgr.save(2, {"x": torch.ones(3), "step": 2})
    bad = root / "step-0000000002" / "manifest.json"
    text = bad.read_text()
    assert '"world_size": 1' in text and '"metadata": {}' in text
    bad.write_text(DAMAGED_MANIFESTS[damage](text))
    with cloudckpt.CheckpointManager(str(root)) as mgr, caplog.at_level("WARNING"):
        assert mgr.steps() == [1]
        assert mgr.latest_step() == 1
        assert mgr.load_latest()["step"] == 1
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"skipping {root}/step-0000000002: its manifest is damaged (")
    r = _cli("ls", str(root), "--json")
    assert r.returncode == 0, r.stderr
    import json as _json

    assert [row["step"] for row in _json.loads(r.stdout)] == [1]
    assert r.stderr.count("skipping") == 1 and "step-0000000002" in r.stderr
    r = _cli("latest", str(root))
    assert r.returncode == 0 and r.stdout.strip() == f"{root}/step-0000000001", r.stderr


def test_new_local_root_is_empty_and_the_first_save_creates_it(tmp_path: Path) -> None:
    root = tmp_path / "not" / "yet"
    with cloudckpt.CheckpointManager(str(root)) as mgr:
        assert mgr.latest_step() is None and mgr.steps() == []
        mgr.save(5, {"x": torch.ones(1)})
        assert mgr.latest_step() == 5
    r = _cli("ls", str(tmp_path / "missing"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == (
        f"cloudckpt: error: {tmp_path}/missing: nothing is stored there (no such directory or "
        "prefix); check ROOT"
    )
    r = _cli("latest", str(tmp_path / "missing"))
    assert r.returncode == 1 and "nothing is stored there" in r.stderr
    (tmp_path / "empty").mkdir()
    r = _cli("ls", str(tmp_path / "empty"))
    assert r.returncode == 0 and r.stdout == ""
    assert r.stderr.strip() == f"cloudckpt: no committed checkpoint under {tmp_path}/empty"
    r = _cli("gc", str(tmp_path / "empty"))
    assert r.returncode == 0 and "no committed checkpoint under" in r.stderr
    (tmp_path / "afile").write_text("x")
    with pytest.raises(
        cloudckpt.BackendError, match=r"afile/run: cannot hold checkpoints: .*afile is a file"
    ):
        cloudckpt.CheckpointManager(str(tmp_path / "afile" / "run")).latest_step()
    r = _cli("ls", "s3:/x")
    assert r.returncode == 2 and "malformed URI 's3:/x'" in r.stderr


def test_missing_bucket_is_an_error_for_manager_and_command(s3_moto_store: StoreTarget) -> None:
    opts = s3_moto_store.storage_options
    with pytest.raises(
        cloudckpt.BackendError,
        match=r"^s3://no-such-bucket-h13/r: the bucket 'no-such-bucket-h13' does not exist",
    ):
        cloudckpt.CheckpointManager("s3://no-such-bucket-h13/r", storage_options=opts).latest_step()
    args = [f"--storage-option={k}={v}" for k, v in opts.items() if not isinstance(v, dict)]
    for cmd in ("ls", "latest", "gc"):
        r = _cli(cmd, "s3://no-such-bucket-h13/r", *args)
        assert r.returncode == 1, (cmd, r.stderr)
        assert "the bucket 'no-such-bucket-h13' does not exist" in r.stderr, r.stderr
    # an existing bucket with a new prefix is a first run: nothing yet, the first save creates it
    root = s3_moto_store.uri("fresh-run")
    with cloudckpt.CheckpointManager(root, storage_options=opts) as mgr:
        assert mgr.latest_step() is None
        mgr.save(1, {"x": torch.ones(1)})
        assert mgr.latest_step() == 1


@pytest.mark.parametrize("kind", ["pickle", "object"])
def test_verify_reports_an_unknown_tree_node_that_load_refuses(tmp_path: Path, kind: str) -> None:
    import json as _json

    from cloudckpt.format.encoding import crc32c

    uri = str(tmp_path / "ck")
    cloudckpt.save(uri, {"x": torch.ones(2), "opt": {"lr": 0.1}})
    manifest_path = tmp_path / "ck" / "manifest.json"
    manifest = _json.loads(manifest_path.read_text())
    entry = manifest["ranks"][0]
    index_path = tmp_path / "ck" / entry["index"]
    index = _json.loads(index_path.read_text())
    items = index["tree"]["dict"]
    for item in items:
        if item[0] == "opt":
            item[1] = {kind: "gASVAAAAAAAAAAB9lC4="}  # checksums made to match below
    raw = _json.dumps(index, separators=(",", ":")).encode()
    index_path.write_bytes(raw)
    entry["size"], entry["crc32c"] = len(raw), crc32c(raw)
    manifest.pop("crc32c", None)
    manifest["crc32c"] = manifest_crc(manifest)
    manifest_path.write_text(_json.dumps(manifest, indent=1))
    expected = f"unknown node type {kind!r} at opt; this cloudckpt reads tensor, "
    with pytest.raises(cloudckpt.CorruptCheckpointError, match=re.escape(expected)):
        cloudckpt.load(uri)
    r = _cli("verify", uri)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert expected in r.stdout + r.stderr


def test_process_group_disagreeing_with_barrier_args_names_both(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        with pytest.raises(
            cloudckpt.ConfigError,
            match=re.escape(
                "[barrier.barrier_args] says rank 1 of 2 (global_rank, global_world_size) but the "
                "process group says rank 0 of 1; make them agree"
            ),
        ):
            cloudckpt.save(
                str(tmp_path / "g"), {"x": torch.ones(1)}, config=_tcp_config(1, 2, free_port())
            )
        # a disagreeing rank_info= with a group and no barrier: the writer refuses, nothing written
        with pytest.raises(
            cloudckpt.ConfigError,
            match=r"rank 0 thinks the job has 2 rank\(s\) but its barrier waits for 1; nothing was written",
        ):
            cloudckpt.save(str(tmp_path / "h"), {"x": torch.ones(1)}, rank_info=RankInfo(0, 2))
    finally:
        dist.destroy_process_group()
    assert not (tmp_path / "g").exists() and not (tmp_path / "h").exists()
