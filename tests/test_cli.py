"""The ``cloudckpt`` command, run as a real subprocess: exit codes, ``--json``, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from config_files import write_store_config
from conftest import IN_PROCESS_FIXTURES, STORE_FIXTURES
from stores import StoreTarget

import cloudckpt
from cloudckpt.checkpoint_reader import open_checkpoint
from cloudckpt.config import config_reference
from cloudckpt.manager import CheckpointManager, step_name
from cloudckpt.storage import resolve

# memory:// and memobj:// live inside one process: the command cannot see them
CROSS_PROCESS = [n for n in STORE_FIXTURES if n not in IN_PROCESS_FIXTURES]


@pytest.fixture(params=CROSS_PROCESS)
def shared_store(request: pytest.FixtureRequest) -> StoreTarget:
    target: StoreTarget = request.getfixturevalue(request.param)
    return target


def run(*args: str, check_json: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CLOUDCKPT_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "cloudckpt", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def ok_json(*args: str) -> Any:
    r = run(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_error(r: subprocess.CompletedProcess[str], code: int, pattern: str) -> None:
    """Exit ``code`` and exactly one stderr line ``cloudckpt: error: ...`` matching."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cloudckpt: error: "), r.stderr
    assert __import__("re").search(pattern, lines[0]), lines[0]
    assert "Traceback" not in r.stderr


def _leftover(store: StoreTarget, step: int) -> None:
    """What a killed save leaves: data, no manifest."""
    backend, root = resolve(store.root, storage_options=store.storage_options)
    obj = backend.join(root, step_name(step), "data", "rank-00000-0000.safetensors")
    backend.write_object(obj, [b"x" * 64], 64)


def test_command_end_to_end_on_each_store(shared_store: StoreTarget, tmp_path: Path) -> None:
    store = shared_store
    cfg = str(write_store_config(tmp_path / "c.toml", store, '[writer]\nfile_size = "1KiB"\n'))
    with CheckpointManager(config=cfg) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((300,), float(step)), "m": {"b": torch.ones(2)}})
    _leftover(store, 9)  # a save that died, with the highest step

    listed = ok_json("ls", "--config", cfg)  # ROOT from [storage] root
    assert [r["step"] for r in listed] == [1, 2, 3]
    assert listed[0]["uri"] == store.uri(step_name(1)) and listed[0]["bytes"] > 1200
    assert ok_json("latest", store.root, "--config", cfg) == {
        "uri": store.uri(step_name(3)),
        "step": 3,
    }
    latest = run("latest", store.root, "--config", cfg)
    assert latest.returncode == 0 and latest.stdout == store.uri(step_name(3)) + "\n"

    info = ok_json("info", store.uri(step_name(3)), "--config", cfg)
    assert (info["world_size"], info["tensors"], info["files"]) == (1, 2, 2)
    verify = run("verify", store.uri(step_name(3)), "--config", cfg)
    assert verify.returncode == 0 and verify.stdout.startswith("ok: ") and verify.stderr == ""

    # gc: retention now, the young leftover stays (default --older-than 1d)
    gc = ok_json("gc", "--keep-last", "1", "--config", cfg)
    assert [r["step"] for r in gc["removed"]] == [1, 2]
    assert [s["uri"] for s in gc["skipped"]] == [store.uri(step_name(9))]
    dry = ok_json("gc", "--older-than", "0s", "--dry-run", "--config", cfg)
    assert [r["uri"] for r in dry["removed"]] == [store.uri(step_name(9))] and dry["dry_run"]
    assert ok_json("gc", "--older-than", "0s", "--config", cfg)["removed"][0]["step"] == 9
    assert [r["step"] for r in ok_json("ls", store.root, "--config", cfg)] == [3]

    assert ok_json("rm", store.uri(step_name(3)), "--config", cfg)["committed"] is True
    assert_error(run("latest", store.root, "--config", cfg), 1, r"no committed checkpoint under ")


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (t, t))


def test_gc_removes_a_leftover_only_when_old_enough(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with CheckpointManager(str(root), keep_last=2) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"v": torch.tensor([step])})
    target = StoreTarget("local", str(root))
    _leftover(target, 99)
    leftover = root / step_name(99)
    (root / "export" / "data").mkdir(parents=True)  # checkpoint-shaped, but not a step-N
    (root / "export" / "data" / "rank-00000-0000.safetensors").write_bytes(b"x" * 64)
    _age(root / "export", 30 * 86400)
    assert run("latest", str(root)).stdout.strip() == str(root / step_name(3))
    with CheckpointManager(str(root)) as mgr:
        assert mgr.steps() == [2, 3] and mgr.latest_step() == 3  # retention kept the leftover

    _age(leftover, 3600)  # an hour old: younger than the default day
    gc = ok_json("gc", str(root))
    assert gc["removed"] == [] and "younger than --older-than" in gc["skipped"][0]["reason"]
    assert ok_json("gc", str(root), "--older-than", "2h")["removed"] == []
    assert leftover.exists()
    text = run("gc", str(root), "--older-than", "30m", "--dry-run")
    assert text.returncode == 0 and text.stdout.startswith(
        f"would remove orphans under {leftover} "
    )
    assert leftover.exists()
    _age(leftover, 2 * 86400)
    gc = ok_json("gc", str(root))
    assert [r["uri"] for r in gc["removed"]] == [str(leftover)] and not leftover.exists()
    assert sorted(p.name for p in root.iterdir()) == ["export", "latest", *map(step_name, (2, 3))]


def _save_sample(uri: str) -> dict[str, Any]:
    sd = {"a": torch.arange(100, dtype=torch.float32), "b": {"w": torch.randn(50)}, "n": 1}
    cloudckpt.save(uri, sd, metadata={"run": "x"})
    return sd


def test_verify_finds_a_flipped_byte_and_names_the_key(tmp_path: Path) -> None:
    uri = str(tmp_path / "ck")
    _save_sample(uri)
    ck = open_checkpoint(uri)
    idx = ck.read_index(0)
    rec = next(t for t in idx.tensors if t.key == "b.w")
    data = tmp_path / "ck" / idx.files[rec.file].path
    raw = bytearray(data.read_bytes())
    raw[rec.offset + 7] ^= 0x10
    data.write_bytes(raw)

    r = run("verify", uri)
    assert_error(r, 1, rf"{uri} is damaged: 1 problem")
    assert f"{data}: tensor 'b.w': CRC32C" in r.stdout and "'a'" not in r.stdout
    doc = json.loads(run("verify", uri, "--json").stdout)
    assert doc["ok"] is False and len(doc["problems"]) == 1 and "'b.w'" in doc["problems"][0]


def test_verify_checks_the_safetensors_header_against_the_index(tmp_path: Path) -> None:
    uri = str(tmp_path / "ck")
    _save_sample(uri)
    idx = open_checkpoint(uri).read_index(0)
    data = tmp_path / "ck" / idx.files[0].path
    raw = data.read_bytes()
    assert b'"b.w"' in raw
    data.write_bytes(raw.replace(b'"b.w"', b'"b.x"', 1))  # same length: only the header lies
    r = run("verify", uri, "--json")
    assert r.returncode == 1
    problems = json.loads(r.stdout)["problems"]
    assert f"{data}: tensor 'b.w' is in the index but not the header" in problems
    assert f"{data}: tensor 'b.x' is in the header but not the index" in problems


def test_cp_local_to_each_store_commits_last(shared_store: StoreTarget, tmp_path: Path) -> None:
    src = str(tmp_path / "src")
    sd = _save_sample(src)
    cfg = str(write_store_config(tmp_path / "c.toml", shared_store))
    dst = shared_store.uri("copied")
    doc = ok_json("cp", src, dst, "--config", cfg)
    assert doc["files"] == 1 and doc["bytes"] > 600
    out = cloudckpt.load(dst, storage_options=shared_store.storage_options)
    assert torch.equal(out["a"], sd["a"]) and torch.equal(out["b"]["w"], sd["b"]["w"])
    assert out["n"] == 1
    assert open_checkpoint(dst, None, shared_store.storage_options).manifest.metadata == {
        "run": "x"
    }
    assert run("verify", dst, "--config", cfg).returncode == 0
    assert_error(
        run("cp", src, dst, "--config", cfg),
        1,
        r"already holds a committed checkpoint; pass --overwrite",
    )
    assert run("cp", src, dst, "--overwrite", "--config", cfg).returncode == 0


def test_cp_refuses_an_uncommitted_source(tmp_path: Path) -> None:
    _leftover(StoreTarget("local", str(tmp_path)), 5)
    src = str(tmp_path / step_name(5))
    assert_error(
        run("cp", src, str(tmp_path / "dst")), 1, r"holds no manifest.json: it is not a committed"
    )
    assert not (tmp_path / "dst").exists()


def test_rm(tmp_path: Path) -> None:
    uri = str(tmp_path / "ck")
    _save_sample(uri)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    assert_error(run("rm", str(tmp_path)), 1, r"is not a checkpoint .* refusing to remove it")
    assert_error(run("rm", str(tmp_path / "other")), 1, r"is not a checkpoint")
    assert_error(run("rm", str(tmp_path / "nothing")), 1, r"no checkpoint at .*nothing")
    r = run("rm", uri)
    assert r.returncode == 0 and r.stdout == f"removed {uri}\n" and not Path(uri).exists()
    assert (tmp_path / "other" / "notes.txt").exists()


def test_usage_and_config_errors_exit_2(tmp_path: Path) -> None:
    assert_error(run("frobnicate"), 2, r"invalid choice: 'frobnicate'")
    assert_error(run("info"), 2, r"the following arguments are required: URI")
    assert_error(
        run("gc", str(tmp_path), "--keep-last", "0"), 2, r"--keep-last: must be an integer >= 1"
    )
    assert_error(
        run("gc", str(tmp_path), "--older-than", "soon"), 2, r"--older-than: expected a duration"
    )
    assert_error(run("ls", str(tmp_path), "--storage-option", "novalue"), 2, r"expects KEY=VALUE")
    bad = tmp_path / "bad.toml"
    bad.write_text("[writer]\nconcurency = 4\n")
    assert_error(
        run("ls", str(tmp_path), "--config", str(bad)),
        2,
        rf"{bad}:2: unknown key 'concurency' in \[writer\]",
    )
    assert_error(run("ls"), 2, r"no ROOT given and no \[storage\] root")
    assert_error(run("info", str(tmp_path / "none")), 1, r"no checkpoint at .*none")


def test_help_and_config_reference() -> None:
    r = run("--help")
    assert r.returncode == 0
    for command in ("ls", "info", "verify", "cp", "rm", "gc", "latest"):
        assert command in r.stdout
    assert run("config-reference").stdout == config_reference()


def _run_on_a_terminal(*args: str) -> tuple[int, str, str]:
    """Run the command with stderr on a pseudo-terminal (stdout piped); return code, stdout and
    what reached the terminal."""
    import pty

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "CLOUDCKPT_CONFIG"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudckpt", *args],
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
        env=env,
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the command closed the terminal's last writer
            break
        if not chunk:
            break
        seen += chunk
    out, _ = proc.communicate(timeout=120)
    os.close(master)
    return proc.returncode, out, seen.decode(errors="replace")


def test_progress_bar_on_a_terminal_only(tmp_path: Path) -> None:
    uri = str(tmp_path / "ck")
    _save_sample(uri)
    code, out, tty = _run_on_a_terminal("verify", uri)
    assert code == 0 and out.startswith("ok: ")
    assert "verify:   0%|" in tty and "B/s]" in tty  # tqdm's bar, drawn to the terminal
    code, out, tty = _run_on_a_terminal("cp", uri, str(tmp_path / "copy"))
    assert code == 0 and out.startswith("copied ")
    assert "cp:   0%|" in tty and "B/s]" in tty
    code, out, tty = _run_on_a_terminal("verify", uri, "--json")
    assert code == 0 and json.loads(out)["ok"] and tty == ""  # scripts get no bar
    piped = run("verify", uri)
    assert piped.returncode == 0 and piped.stderr == ""  # piped: quiet


def test_commands_do_not_import_torch(tmp_path: Path) -> None:
    """No command handles tensors, so none pays for `import torch` (~1.4 s): indexes are
    checked with plain dtype tables."""
    root = tmp_path / "run"
    with CheckpointManager(str(root)) as mgr:
        sd = {"w": torch.ones(3), "h": torch.ones(2, dtype=torch.bfloat16), "n": torch.tensor(1)}
        mgr.save(1, {**sd, "c": torch.zeros(2, dtype=torch.complex64)})
    ck, copy = str(root / step_name(1)), str(tmp_path / "copy")
    probe = (
        "import sys\n"
        "from cloudckpt.cli import main\n"
        "root, ck, copy = sys.argv[1:]\n"
        "for argv in (['ls', root], ['latest', root], ['info', ck], ['verify', ck],\n"
        "             ['cp', ck, copy], ['rm', copy], ['config-reference'],\n"
        "             ['gc', root, '--keep-last', '1', '--dry-run']):\n"
        "    assert main(argv) == 0, argv\n"
        "print('torch' in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe, str(root), ck, copy], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "False"
