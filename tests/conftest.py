"""Shared fixtures. ``store`` runs a test once per storage target (the conformance matrix).

Each module in ``tests/stores/`` is a pytest plugin that defines fixtures returning a
:class:`stores.StoreTarget` and lists their names in ``STORE_FIXTURES``; a new backend joins
every conformance test by adding one such module.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

_STORE_MODULES = sorted(
    f"stores.{p.stem}"
    for p in (Path(__file__).parent / "stores").glob("*.py")
    if p.stem != "__init__"
)
pytest_plugins = _STORE_MODULES
pytest.register_assert_rewrite(*_STORE_MODULES)  # imported just below, before pytest would

STORE_FIXTURES: list[str] = [
    name for mod in _STORE_MODULES for name in importlib.import_module(mod).STORE_FIXTURES
]
#: Targets whose store lives inside this process (another process cannot see their objects).
IN_PROCESS_FIXTURES: list[str] = [
    name
    for mod in _STORE_MODULES
    for name in getattr(importlib.import_module(mod), "IN_PROCESS_FIXTURES", [])
]


@pytest.fixture(params=STORE_FIXTURES)
def store(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """A fresh, empty prefix on each storage target in turn."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def tiny_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real 1 MiB filesystem (tmpfs), so writes fail with ENOSPC."""
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
