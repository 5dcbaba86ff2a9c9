"""What the docs promise, executed: every shipped config saves and loads on its real store, every
relative link (and #anchor) in the Markdown resolves, install hints name things that exist, and
the user test file of docs/testing.md passes under pytest as a user would run it."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cloudckpt
from cloudckpt.testing import CloudStore

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "docs" / "examples"
TOMLS = sorted(p.name for p in EXAMPLES.glob("*.toml"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _state(step: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(64, 32, generator=g), "b": torch.zeros(32)}, "step": step}


def test_every_shipped_config_is_executed() -> None:
    assert TOMLS == ["gcs.toml", "local.toml", "memory.toml", "s3.toml"], (
        "a new docs/examples/*.toml needs a store in test_shipped_config_saves_and_loads"
    )


# s3/gcs parameters reach their store through getfixturevalue: marked for -m s3 / -m gcs
TOML_PARAMS = [
    pytest.param(n, marks=[getattr(pytest.mark, n[:-5])] if n in ("s3.toml", "gcs.toml") else [])
    for n in TOMLS
]


@pytest.mark.parametrize("name", TOML_PARAMS)
def test_shipped_config_saves_and_loads(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Each example as shipped, pointed at a test server: only the root (and the endpoint, via
    ``storage_options=``, which the docs say wins) change, plus a free TCPStore port."""
    cfg = cloudckpt.load_config(EXAMPLES / name)
    if cfg.barrier_config.barrier_type == "tcp_store":
        args = {**cfg.barrier_config.barrier_args, "tcpstore_port": _free_port()}
        cfg.barrier_config = dataclasses.replace(cfg.barrier_config, barrier_args=args)
    options: dict[str, object] = {}
    if name in ("s3.toml", "gcs.toml"):
        store: CloudStore = request.getfixturevalue(
            "cloudckpt_s3" if name == "s3.toml" else "cloudckpt_gcs"
        )
        root, options = store.uri, store.storage_options
    elif name == "memory.toml":
        root = f"{cfg.storage.root}/{tmp_path.name}"
    else:
        root = str(tmp_path / "runs")
    with cloudckpt.CheckpointManager(root, config=cfg, storage_options=options) as mgr:
        for step in (1, 2):
            mgr.save(step, _state(step))
        assert mgr.latest_step() == 2
        target = _state(0)
        mgr.load_latest(target)
    assert torch.equal(target["model"]["w"], _state(2)["model"]["w"])  # type: ignore[index]
    out = cloudckpt.load(mgr.uri(1), config=cfg, storage_options=options)
    assert torch.equal(out["model"]["w"], _state(1)["model"]["w"]) and out["step"] == 1


# ---- links ---------------------------------------------------------------------------------

MARKDOWN = sorted(
    p
    for p in [*REPO.glob("*.md"), *REPO.glob("docs/**/*.md"), *REPO.glob("terraform/**/*.md")]
    if ".venv" not in p.parts
)
_LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """Heading ids as mkdocs (Python-Markdown's toc) makes them."""
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        text = line.lstrip("#").strip().lower()
        text = re.sub(r"[^\w\s-]", "", text)
        out.add(re.sub(r"[-\s]+", "-", text).strip("-"))
    return out


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [a or b for a, b in _LINK.findall(text)]


@pytest.mark.parametrize("doc", MARKDOWN, ids=[str(p.relative_to(REPO)) for p in MARKDOWN])
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for link in _links(doc):
        if re.match(r"^[a-z]+:", link):
            continue  # http(s), mailto: not fetched (no network in CI)
        target, _, anchor = link.partition("#")
        dest = (doc.parent / target).resolve() if target else doc
        if not dest.exists():
            broken.append(
                f"{link}: no such file {dest.relative_to(REPO) if REPO in dest.parents else dest}"
            )
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{link}: no heading #{anchor} in {dest.relative_to(REPO)}")
        elif REPO not in dest.parents and dest != REPO:
            broken.append(f"{link}: points outside the repository")
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)


def test_docs_name_no_extra_that_does_not_exist() -> None:
    """``cloudckpt[s3]``/``[gcs]`` are not extras (the plugins are distributions of their own)."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    sources = [
        *MARKDOWN,
        *EXAMPLES.glob("*"),
        *(REPO / "cloudckpt").rglob("*.py"),
        *(REPO / "backends").rglob("*.py"),
    ]
    wrong = []
    for path in sources:
        for extra in re.findall(r"cloudckpt\[([a-z,]+)\]", path.read_text()):
            missing = [e for e in extra.split(",") if e not in extras]
            if missing:
                wrong.append(f"{path.relative_to(REPO)}: cloudckpt[{extra}]")
    assert not wrong, wrong


def test_unknown_backend_error_says_how_to_install_the_plugin(tmp_path: Path) -> None:
    with pytest.raises(cloudckpt.ConfigError) as info:
        cloudckpt.save("gs://b/x", {"x": torch.ones(1)}, config=_cfg(tmp_path, "gcsx"))
    assert "is not installed; known: " in str(info.value)
    assert str(info.value).endswith(
        "Install its plugin (a distribution with a 'cloudckpt.backends' entry point; the S3 and "
        "GCS ones, from a clone of cloudckpt: pip install -e backends/s3 / -e backends/gcs, "
        "published as cloudckpt-s3 / cloudckpt-gcs), or remove the key to pick by URI scheme."
    )
    from cloudckpt.storage import plugin_install_hint

    assert plugin_install_hint("gs") == (
        "its plugin: from a clone of cloudckpt, pip install -e backends/gcs "
        "(published as cloudckpt-gcs)"
    )
    for plugin in ("s3", "gcs"):
        assert (REPO / "backends" / plugin / "pyproject.toml").read_text().count(
            f'name = "cloudckpt-{plugin}"'
        ) == 1


def _cfg(tmp_path: Path, backend: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[storage]\nbackend = "{backend}"\n')
    return path


# ---- the user test file of docs/testing.md ------------------------------------------------


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.gcs
@pytest.mark.timeout(600)
def test_user_test_file_passes_under_pytest(tmp_path: Path) -> None:
    """docs/examples/test_user_checkpointing.py as a user runs it: ``pytest FILE`` in a fresh
    process, outside this repository's conftest, with the plugin found through its entry point.
    Slow (~25 s); the default run keeps a user's pytest run on the plugin's S3, GCS and fault
    fixtures (test_testing_plugin.py::test_plugin_fixtures_in_a_user_run)."""
    example = REPO / "docs" / "examples" / "test_user_checkpointing.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CLOUDCKPT_"))}
    env.pop("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(example), "-q", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-o", "addopts=", "-W", "error::RuntimeWarning"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed in [\d.]+s( \(.*\))?", summary), summary
    assert "skipped" not in summary


# ---- CI and install lines ------------------------------------------------------------------


def test_readme_torch_line_is_the_pinned_version_and_says_which_build() -> None:
    pinned = re.search(r"^torch==([\d.]+)$", (REPO / "constraints.txt").read_text(), re.M)
    assert pinned, "constraints.txt pins torch"
    readme = (REPO / "README.md").read_text()
    assert (
        f"pip install torch=={pinned.group(1)} --index-url " in readme
    )  # the CPU build, asked for
    assert "is the CUDA build" in readme  # what the pin alone gives on Linux x86_64


def test_ci_writes_nothing_outside_the_clone() -> None:
    scripts = [REPO / ".ci" / "run", *(REPO / ".ci").glob("*.sh")]
    for script in scripts:
        text = script.read_text()
        for outside in ("XDG_CACHE_HOME", ".cache/", "/root/"):
            assert outside not in text, f"{script.name} writes under {outside}"
        for line in text.splitlines():  # every venv CI makes is .venv or under the clone
            if "-m venv" in line and not line.lstrip().startswith("#"):
                assert "-m venv .venv" in line or '-m venv "$venv"' in line, line
    assert 'venv="$PWD/.ci/cache/checkov-venv"' in (REPO / ".ci" / "terraform.sh").read_text()
    for path in (".ci/cache/checkov-venv", ".ci/cache/site"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert ignored.returncode == 0, f"{path} must be ignored by git"


def test_terraform_checks_fail_without_terraform(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"  # a PATH with bash and coreutils but no terraform
    bindir.mkdir()
    for tool in ("bash", "dirname", "env"):
        found = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        (bindir / tool).symlink_to(found)
    proc = subprocess.run(
        ["bash", str(REPO / ".ci" / "terraform.sh")],
        env={"PATH": str(bindir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "terraform.sh: no terraform binary on PATH: install terraform >= 1.7" in proc.stderr
