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
from collections.abc import Iterator
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


# Markers derived from the store matrix: a test that reaches a store module's fixture (directly,
# through another fixture, or as a parameter naming it) gets that module's marker (s3, gcs).
MARK_OF_FIXTURE: dict[str, str] = {
    name: mod.rsplit(".", 1)[1]
    for mod in _STORE_MODULES
    if mod.rsplit(".", 1)[1] in ("s3", "gcs")  # the stores that need a server
    for name in importlib.import_module(mod).STORE_FIXTURES
}
MARK_OF_FIXTURE.update(
    {
        "cloudckpt_moto_server": "s3",
        "moto_server": "s3",
        "seaweed_server": "s3",
        "cloudckpt_s3": "s3",
        "cloudckpt_gcs_server": "gcs",
        "gcs_server": "gcs",
        "cloudckpt_gcs": "gcs",
    }
)


def store_marks(item: pytest.Item) -> set[str]:
    """The store markers ``item`` needs, from its fixture closure and its parameters."""
    names = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        names |= {v for v in callspec.params.values() if isinstance(v, str)}
    return {MARK_OF_FIXTURE[n] for n in names if n in MARK_OF_FIXTURE}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for mark in sorted(store_marks(item)):
            if item.get_closest_marker(mark) is None:
                item.add_marker(getattr(pytest.mark, mark))


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[object], request: pytest.FixtureRequest
) -> None:
    """A store fixture asked for in a way collection cannot see (``getfixturevalue("name")``)
    fails the test unless it carries the store's marker, so ``-m s3`` / ``-m "not gcs"`` stay true."""
    mark = MARK_OF_FIXTURE.get(fixturedef.argname)
    node = request.node
    if mark and isinstance(node, pytest.Item) and node.get_closest_marker(mark) is None:
        raise pytest.UsageError(
            f"{node.nodeid} uses the {fixturedef.argname} fixture but is not marked "
            f"{mark}: add @pytest.mark.{mark} or take the fixture as an argument"
        )


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


@pytest.fixture(scope="session", autouse=True)
def rank_launchers() -> Iterator[None]:
    """One launcher process per harness script for the whole session (multirank_harness): it
    imports torch once; each ``run_ranks`` call still forks fresh ranks from it."""
    import multirank_harness

    launchers = multirank_harness.Launchers()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(multirank_harness, "LAUNCHERS", launchers)
        try:
            yield
        finally:
            launchers.close()
