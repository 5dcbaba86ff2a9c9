"""Shared fixtures. ``store`` runs a test once per storage target (the conformance matrix).

Each module in ``tests/stores/`` is a pytest plugin that defines fixtures returning a
:class:`stores.StoreTarget` and lists their names in ``STORE_FIXTURES``; a new backend joins
every conformance test by adding one such module.
"""

from __future__ import annotations

import importlib
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

STORE_FIXTURES: list[str] = [
    name for mod in _STORE_MODULES for name in importlib.import_module(mod).STORE_FIXTURES
]


@pytest.fixture(params=STORE_FIXTURES)
def store(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """A fresh, empty prefix on each storage target in turn."""
    return request.getfixturevalue(request.param)
