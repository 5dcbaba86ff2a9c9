"""Test your checkpointing against local S3 and GCS servers: a pytest plugin and its parts.

With ``pip install 'cloudckpt[testing]'`` pytest loads the plugin by itself (entry point
``pytest11``) and a test asks for a store in one line::

    def test_resume(cloudckpt_s3):
        mgr = cloudckpt.CheckpointManager(cloudckpt_s3.uri, config=cloudckpt_s3.config_file)

Fixtures: ``cloudckpt_s3`` (moto over HTTP), ``cloudckpt_gcs`` (fake-gcs-server), each a
:class:`CloudStore` with a fresh bucket and prefix per test and one server per pytest run, and
``cloudckpt_faults`` (a :class:`Faults` proxy that answers 500/503, delays or drops requests in
front of either). See ``docs/testing.md``.
"""

from __future__ import annotations

from .faults import FaultProxy, Rule, Seen
from .servers import (
    FAKE_AWS_ENV,
    GCSServer,
    S3Server,
    fake_gcs_server,
    fresh_name,
    moto_server,
)
from .stores import CloudStore, Faults

__all__ = [
    "FAKE_AWS_ENV",
    "CloudStore",
    "FaultProxy",
    "Faults",
    "GCSServer",
    "Rule",
    "S3Server",
    "Seen",
    "fake_gcs_server",
    "fresh_name",
    "moto_server",
]
