#!/usr/bin/env bash
# Offline static checks of terraform/: fmt, init from a local provider mirror, validate,
# terraform test, and checkov when installed. Exits non-zero on the first failure.
#
# The provider mirror is a folder named "tf-plugins" (registry.terraform.io/hashicorp/aws/...):
# $TF_PLUGINS_DIR if set, else the first one found under a few usual roots. No registry is
# contacted. The google provider is not in the mirror, so the GCS module and example get fmt only.
set -euo pipefail
cd "$(dirname "$0")/.."
TF_DIR="$PWD/terraform"

# terraform is required: a machine without it fails here rather than passing by skipping.
# (On our machines it is a hand-installed binary, /usr/local/bin/terraform, beside the provider
# mirror /opt/tf-plugins; no package registry we reach ships a working one.)
if ! command -v terraform >/dev/null 2>&1; then
  echo "terraform.sh: no terraform binary on PATH: install terraform >= 1.7 (and a provider mirror" \
       "folder named tf-plugins, or TF_PLUGINS_DIR) to run the terraform checks" >&2
  exit 1
fi

find_mirror() {
  if [ -n "${TF_PLUGINS_DIR:-}" ]; then
    [ -d "$TF_PLUGINS_DIR" ] || { echo "TF_PLUGINS_DIR=$TF_PLUGINS_DIR is not a directory" >&2; return 1; }
    echo "$TF_PLUGINS_DIR"; return 0
  fi
  local root found
  for root in /opt /usr/local /usr/share /usr/lib "$HOME" /srv /var/lib; do
    [ -d "$root" ] || continue
    found=$(find "$root" -maxdepth 4 -type d -name tf-plugins -print -quit 2>/dev/null || true)
    if [ -n "$found" ]; then echo "$found"; return 0; fi
  done
  echo "no provider mirror: no folder named tf-plugins under /opt, /usr/local, /usr/share, /usr/lib, \$HOME, /srv, /var/lib; set TF_PLUGINS_DIR" >&2
  return 1
}

MIRROR=$(find_mirror)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cat >"$WORK/terraform.rc" <<RC
provider_installation {
  filesystem_mirror {
    path    = "$MIRROR"
    include = ["registry.terraform.io/hashicorp/*"]
  }
  direct {
    exclude = ["registry.terraform.io/hashicorp/*"]
  }
}
RC
export TF_CLI_CONFIG_FILE="$WORK/terraform.rc"
export TF_IN_AUTOMATION=1 TF_INPUT=0 CHECKPOINT_DISABLE=1
echo "terraform: $(terraform version | head -1), provider mirror: $MIRROR"

step() { echo "== terraform: $*"; }

step "fmt -check -recursive"
terraform fmt -check -recursive -diff "$TF_DIR"

# Each directory that needs only mirrored providers: init (into a scratch data dir, so the
# tree stays clean), validate, and terraform test where it has tests.
for dir in modules/cloudckpt-config modules/aws-checkpoint-bucket examples/aws; do
  step "init + validate $dir"
  export TF_DATA_DIR="$WORK/data/${dir//\//_}"
  (
    cd "$TF_DIR/$dir"
    terraform init -backend=false -input=false >"$WORK/init.log" 2>&1 \
      || { cat "$WORK/init.log"; exit 1; }
    terraform validate -no-color
    if [ -d tests ]; then
      step "test $dir"
      terraform test -no-color
    fi
  )
done
unset TF_DATA_DIR

step "modules/gcs-checkpoint-bucket, examples/gcp: fmt only (the google provider is not in the mirror)"

# checkov pins old boto3/botocore/packaging/networkx, which clash with the test venv (s3fs needs
# a current botocore, pytest packaging>=24): it lives in a venv of its own inside the clone, in
# the ignored folder .ci/cache/ (nothing is written outside the clone).
# $CHECKOV names a binary, or "skip"; else checkov on PATH; else that venv, made on first use.
find_checkov() {
  if [ -n "${CHECKOV:-}" ]; then echo "$CHECKOV"; return 0; fi
  if command -v checkov >/dev/null 2>&1; then command -v checkov; return 0; fi
  local venv="$PWD/.ci/cache/checkov-venv"
  if [ ! -x "$venv/bin/checkov" ]; then
    echo "== installing checkov into $venv" >&2
    python3 -m venv "$venv" >&2 && "$venv/bin/pip" install -q checkov >&2 || return 1
  fi
  echo "$venv/bin/checkov"
}
if [ "${CHECKOV:-}" = skip ]; then
  echo "== checkov skipped (CHECKOV=skip)"
else
  CHECKOV_BIN=$(find_checkov) || { echo "checkov could not be installed; set CHECKOV=skip to go without" >&2; exit 1; }
  step "checkov ($("$CHECKOV_BIN" --version 2>/dev/null))"
  "$CHECKOV_BIN" --config-file "$TF_DIR/.checkov.yaml" -d "$TF_DIR"
fi
echo "== terraform checks passed"
