"""The core's own targets: a local directory and fsspec's in-memory filesystem."""

from __future__ import annotations

from pathlib import Path

import pytest

from stores import StoreTarget, fresh_name

STORE_FIXTURES = ["local_store", "memory_store"]
IN_PROCESS_FIXTURES = ["memory_store"]


@pytest.fixture
def local_store(tmp_path: Path) -> StoreTarget:
    return StoreTarget("local", str(tmp_path / "store"))


@pytest.fixture
def memory_store() -> StoreTarget:
    return StoreTarget("memory", f"memory://cloudckpt-tests/{fresh_name()}")
