"""fake-gcs-server on 127.0.0.1: the plugin's (cloudckpt.testing) under the names these tests use."""

from __future__ import annotations

import os

import pytest

from cloudckpt.testing import CloudStore, GCSServer
from cloudckpt.testing.servers import GCS_ENV, drain_log
from stores import StoreTarget

# This test process only (the plugin sets it per test): gcsfs reads it when first imported, and
# subprocesses inherit it.
for _k, _v in GCS_ENV.items():
    os.environ.setdefault(_k, _v)

STORE_FIXTURES = ["gcs_store"]

__all__ = ["GCSServer", "drain_log"]


@pytest.fixture(scope="session")
def gcs_server(cloudckpt_gcs_server: GCSServer) -> GCSServer:
    return cloudckpt_gcs_server


@pytest.fixture
def gcs_store(cloudckpt_gcs: CloudStore) -> StoreTarget:
    return StoreTarget("gcs", cloudckpt_gcs.uri, cloudckpt_gcs.storage_options)
