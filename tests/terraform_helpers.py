"""Running terraform offline from tests: find the provider mirror, write a CLI config, copy the
tree to scratch space, and run commands with readable failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TERRAFORM_DIR = REPO / "terraform"
TERRAFORM = shutil.which("terraform")
NO_TERRAFORM = "no `terraform` binary on PATH: install terraform >= 1.7 to run the terraform checks"

# Where a provider mirror named tf-plugins may live; $TF_PLUGINS_DIR wins.
MIRROR_ROOTS = ["/opt", "/usr/local", "/usr/share", "/usr/lib", "~", "/srv", "/var/lib"]
MIRROR_NAME = "tf-plugins"


def find_plugin_mirror(max_depth: int = 4) -> Path:
    """The filesystem provider mirror: ``$TF_PLUGINS_DIR``, else the first folder named
    ``tf-plugins`` within ``max_depth`` levels of a usual root."""
    env = os.environ.get("TF_PLUGINS_DIR")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"TF_PLUGINS_DIR={env} is not a directory")
        return path
    for root in MIRROR_ROOTS:
        base = Path(root).expanduser()
        if not base.is_dir():
            continue
        level = [base]
        for _ in range(max_depth):
            nxt = []
            for d in level:
                try:
                    children = sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink())
                except OSError:
                    continue
                for child in children:
                    if child.name == MIRROR_NAME:
                        return child
                    nxt.append(child)
            level = nxt
    raise FileNotFoundError(
        f"no terraform provider mirror: no folder named {MIRROR_NAME} under "
        f"{', '.join(MIRROR_ROOTS)}; set TF_PLUGINS_DIR to one holding "
        "registry.terraform.io/hashicorp/aws"
    )


def cli_config(mirror: Path, directory: Path) -> Path:
    """Write a terraform CLI config that installs hashicorp/* providers from ``mirror`` only."""
    path = directory / "terraform.rc"
    path.write_text(
        "provider_installation {\n"
        "  filesystem_mirror {\n"
        f"    path    = {json.dumps(str(mirror))}\n"
        '    include = ["registry.terraform.io/hashicorp/*"]\n'
        "  }\n"
        "  direct {\n"
        '    exclude = ["registry.terraform.io/hashicorp/*"]\n'
        "  }\n"
        "}\n"
    )
    return path


def terraform_env(config: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TF_CLI_CONFIG_FILE=str(config),
        TF_IN_AUTOMATION="1",
        TF_INPUT="0",
        CHECKPOINT_DISABLE="1",
    )
    env.pop("TF_DATA_DIR", None)
    return env


def copy_tree(dest: Path) -> Path:
    """A copy of terraform/ without local state, so runs neither dirty the checkout nor race."""
    ignore = shutil.ignore_patterns(
        ".terraform", ".terraform.lock.hcl", "*.tfstate", "*.tfstate.backup", "*.tfvars.json"
    )
    target = dest / "terraform"
    shutil.copytree(TERRAFORM_DIR, target, ignore=ignore)
    return target


class Terraform:
    """``terraform`` in one working directory, failing with its output on a non-zero exit."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.destroyed = False

    def run(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        assert TERRAFORM is not None, NO_TERRAFORM
        start = time.monotonic()
        proc = subprocess.run(
            [TERRAFORM, *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        took = time.monotonic() - start
        if check and proc.returncode != 0:
            raise AssertionError(
                f"terraform {' '.join(args)} in {self.workdir} failed (exit {proc.returncode}, "
                f"{took:.0f}s)\n--- stdout\n{proc.stdout[-8000:]}\n--- stderr\n{proc.stderr[-8000:]}"
            )
        return proc

    def init(self, backend: bool = False) -> None:
        self.run("init", f"-backend={str(backend).lower()}", "-input=false", "-no-color")

    def destroy(self) -> None:
        self.run("destroy", "-auto-approve", "-no-color", timeout=300)
        self.destroyed = True

    def output(self, name: str) -> str:
        return self.run("output", "-raw", name).stdout

    def outputs(self) -> dict[str, Any]:
        raw = json.loads(self.run("output", "-json").stdout)
        return {k: v["value"] for k, v in raw.items()}
