"""The pytest plugin (entry point ``pytest11``): ``cloudckpt_s3``, ``cloudckpt_gcs``, ``cloudckpt_faults``.

Each server starts once per pytest run, on first use; each test gets a fresh bucket and prefix.
Fake credentials (and the gcsfs switch the emulator needs) are set in ``os.environ`` only while
a test that uses a store runs, and restored after it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .servers import GCSServer, S3Server, fake_gcs_server, moto_server
from .stores import CloudStore, Faults, fresh_store


@pytest.fixture(scope="session")
def cloudckpt_moto_server() -> Iterator[S3Server]:
    """moto over HTTP on 127.0.0.1, one per pytest run (worker)."""
    with moto_server() as server:
        yield server


@pytest.fixture(scope="session")
def cloudckpt_gcs_server() -> Iterator[GCSServer]:
    """fake-gcs-server on 127.0.0.1, one per pytest run (worker)."""
    with fake_gcs_server() as server:
        yield server


@pytest.fixture
def cloudckpt_s3(
    cloudckpt_moto_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CloudStore]:
    """A fresh bucket and prefix on the moto server: ``uri``, ``storage_options``,
    ``config_file``, ``client`` (boto3)."""
    with fresh_store(cloudckpt_moto_server, tmp_path_factory.mktemp("cloudckpt-s3")) as store:
        yield store


@pytest.fixture
def cloudckpt_gcs(
    cloudckpt_gcs_server: GCSServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CloudStore]:
    """A fresh bucket and prefix on fake-gcs-server: ``uri``, ``storage_options``,
    ``config_file``, ``client`` (google.cloud.storage, when installed)."""
    with fresh_store(cloudckpt_gcs_server, tmp_path_factory.mktemp("cloudckpt-gcs")) as store:
        yield store


@pytest.fixture
def cloudckpt_faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    """Fault injection: ``store = cloudckpt_faults.front(cloudckpt_s3)``, then
    ``cloudckpt_faults.inject(status=503, times=3, method="PUT")``."""
    faults = Faults(tmp_path_factory.mktemp("cloudckpt-faults"))
    try:
        yield faults
    finally:
        faults.close()
