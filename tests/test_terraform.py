"""terraform/: the static checks (fmt, validate, ``terraform test`` on a mocked provider) and
the AWS example applied against local S3 servers, then used by cloudckpt through the
``cloudckpt_config`` it outputs, then destroyed.

Offline: providers come from the local mirror (a folder named tf-plugins). Skipped when there is
no terraform binary, except under CI (``CI`` set), where that fails. The apply and ``terraform
test`` are marked slow.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from terraform_helpers import (
    NO_TERRAFORM,
    TERRAFORM,
    TERRAFORM_DIR,
    Terraform,
    cli_config,
    copy_tree,
    find_plugin_mirror,
    terraform_env,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

# Without terraform a developer's run skips these; CI (CI=true) fails instead, so a CI machine
# that lost its terraform cannot pass by skipping them.
pytestmark = [
    pytest.mark.terraform,
    pytest.mark.skipif(TERRAFORM is None and not os.environ.get("CI"), reason=NO_TERRAFORM),
]

# Directories whose providers are all in the mirror (the google provider is not: the GCS module
# and example get fmt only).
OFFLINE_DIRS = ["modules/cloudckpt-config", "modules/aws-checkpoint-bucket", "examples/aws"]


@pytest.fixture(scope="session")
def tf_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if TERRAFORM is None:
        pytest.fail(f"CI={os.environ.get('CI')}: {NO_TERRAFORM}", pytrace=False)
    mirror = find_plugin_mirror()
    assert (mirror / "registry.terraform.io" / "hashicorp" / "aws").is_dir(), (
        f"the provider mirror {mirror} holds no registry.terraform.io/hashicorp/aws"
    )
    return terraform_env(cli_config(mirror, tmp_path_factory.mktemp("tfcli")))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return copy_tree(tmp_path)


def test_fmt(tf_env: dict[str, str]) -> None:
    Terraform(TERRAFORM_DIR, tf_env).run("fmt", "-check", "-recursive", "-diff", "-no-color")


@pytest.mark.parametrize("directory", OFFLINE_DIRS)
def test_init_and_validate(directory: str, tf_env: dict[str, str], tree: Path) -> None:
    tf = Terraform(tree / directory, tf_env)
    tf.init()
    tf.run("validate", "-no-color")


@pytest.mark.slow
def test_aws_module_terraform_test(tf_env: dict[str, str], tree: Path) -> None:
    """The module's rules on a mocked provider: encryption, public access block, TLS-only
    policy and its switch, lifecycle rules, prefix-scoped IAM policies, the config output.
    Slow (~20 s, a provider start per run block); CI's .ci/terraform.sh runs it too, and the
    default run keeps the module's init and validate (test_init_and_validate)."""
    tf = Terraform(tree / "modules/aws-checkpoint-bucket", tf_env)
    tf.init()
    out = tf.run("test", "-no-color").stdout
    assert "0 failed" in out and " passed" in out, out


def _render_config(tf_env: dict[str, str], tree: Path, variables: dict[str, Any]) -> str:
    """Apply the provider-free config renderer (what both bucket modules use) and return it."""
    work = tree / "render"
    work.mkdir()
    (work / "main.tf").write_text(
        'module "c" {\n'
        '  source = "../modules/cloudckpt-config"\n'
        + "".join(f"  {k} = {json.dumps(v)}\n" for k, v in variables.items())
        + "}\n"
        'output "toml" {\n  value = module.c.toml\n}\n'
    )
    tf = Terraform(work, tf_env)
    tf.init(backend=True)
    tf.run("apply", "-auto-approve", "-no-color")
    return tf.output("toml")


def test_gcs_style_config_loads_in_cloudckpt(tf_env: dict[str, str], tree: Path) -> None:
    """The TOML the GCS module renders (checked here without the google provider) is a valid
    cloudckpt config."""
    import cloudckpt

    text = _render_config(
        tf_env,
        tree,
        {
            "backend": "gcs",
            "root": "gs://ckpts/runs/exp1",
            "options": {"endpoint_url": "http://127.0.0.1:4443", "project": "p"},
            "file_size": "64MiB",
            "concurrency": 4,
        },
    )
    parsed = tomllib.loads(text)
    assert parsed == {
        "storage": {
            "backend": "gcs",
            "root": "gs://ckpts/runs/exp1",
            "options": {"endpoint_url": "http://127.0.0.1:4443", "project": "p"},
        },
        "writer": {"file_size": "64MiB", "concurrency": 4},
    }
    path = tree / "gcs.toml"
    path.write_text(text)
    cfg = cloudckpt.load_config(path)
    assert cfg.storage.root == "gs://ckpts/runs/exp1"
    assert cfg.storage.options["endpoint_url"] == "http://127.0.0.1:4443"


# ---------------------------------------------------------------------------------------------
# Apply the AWS example against a local server, use it through cloudckpt, destroy it.


def _example_vars(endpoint: str, bucket: str, **extra: Any) -> dict[str, Any]:
    return {
        "bucket_name": bucket,
        "prefix": "runs/exp1",
        "endpoint_url": endpoint,
        "s3_use_path_style": True,
        "skip_credentials_checks": True,
        "access_key": "testing",
        "secret_key": "testing",
        "force_destroy": True,
        # Plain-HTTP loopback: a deny-non-TLS policy would lock everyone out.
        "enforce_tls": False,
        **extra,
    }


@pytest.fixture
def s3_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def applied(tf_env: dict[str, str], tree: Path) -> Iterator[Any]:
    """A function applying the AWS example with given variables; destroys on teardown."""
    appliers: list[Terraform] = []

    def apply(variables: dict[str, Any]) -> Terraform:
        tf = Terraform(tree / "examples/aws", tf_env)
        (tf.workdir / "terraform.tfvars.json").write_text(json.dumps(variables))
        tf.init(backend=True)
        appliers.append(tf)
        tf.run("apply", "-auto-approve", "-no-color", timeout=480)
        return tf

    yield apply
    for tf in appliers:
        if not tf.destroyed:
            tf.destroy()


def _round_trip(tf: Terraform, config_dir: Path) -> dict[str, Any]:
    import cloudckpt

    config = config_dir / "cloudckpt.toml"
    config.write_text(tf.output("cloudckpt_config"))
    state = {"model": {"w": torch.randn(64, 32), "b": torch.arange(7)}, "step": 1}
    cloudckpt.save("step-000001", state, config=config)
    loaded = cloudckpt.load("step-000001", config=config)
    torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])
    torch.testing.assert_close(loaded["model"]["b"], state["model"]["b"])
    assert loaded["step"] == 1
    return tomllib.loads(config.read_text())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_apply_aws_example_on_moto(
    moto_server: Any, applied: Any, tmp_path: Path, s3_credentials: None
) -> None:
    """apply -> cloudckpt save/load through the generated config -> destroy, on moto. moto keeps
    but does not enforce bucket policies; the apply takes ~80 s, most of it the provider
    waiting for the lifecycle configuration to read back stable."""
    bucket = f"tf-ckpt-{uuid.uuid4().hex[:12]}"
    tf = applied(_example_vars(moto_server.endpoint, bucket))

    outputs = tf.outputs()
    assert outputs["root_uri"] == f"s3://{bucket}/runs/exp1"
    parsed = _round_trip(tf, tmp_path)
    assert parsed["storage"] == {
        "backend": "s3",
        "root": f"s3://{bucket}/runs/exp1",
        "options": {
            "endpoint_url": moto_server.endpoint,
            "client_kwargs": {"region_name": "us-east-1"},
            "config_kwargs": {"s3": {"addressing_style": "path"}},
        },
    }

    # What the server holds is what the module promises.
    s3 = moto_server.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys and all(k.startswith("runs/exp1/step-000001/") for k in keys), keys
    pab = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(pab.values()), pab
    sse = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]
    assert sse["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert any(
        r.get("AbortIncompleteMultipartUpload", {}).get("DaysAfterInitiation") == 2 for r in rules
    )
    assert any(r.get("NoncurrentVersionExpiration", {}).get("NoncurrentDays") == 7 for r in rules)

    writer = json.loads(outputs["writer_policy_json"])
    resources = {r for s in writer["Statement"] for r in s["Resource"]}
    assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/runs/exp1/*"}
    iam = moto_server_iam(moto_server)
    names = {p["PolicyName"] for p in iam.list_policies(Scope="Local")["Policies"]}
    assert {f"{bucket}-checkpoint-writer", f"{bucket}-checkpoint-reader"} <= names

    tf.destroy()
    assert bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    names = {p["PolicyName"] for p in iam.list_policies(Scope="Local")["Policies"]}
    assert not names & {f"{bucket}-checkpoint-writer", f"{bucket}-checkpoint-reader"}


def moto_server_iam(server: Any) -> Any:
    import boto3

    return boto3.client(
        "iam",
        endpoint_url=server.endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
