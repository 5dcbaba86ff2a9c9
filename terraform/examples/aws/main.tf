# A cloudckpt checkpoint bucket on AWS, or on a local S3-compatible server (moto, SeaweedFS):
#
#   terraform init && terraform apply -var bucket_name=my-ckpts
#   terraform output -raw cloudckpt_config > cloudckpt.toml
#
# Local server (plain HTTP, so the TLS-only statement must be off):
#
#   terraform apply -var bucket_name=ckpts -var endpoint_url=http://127.0.0.1:5000 \
#     -var s3_use_path_style=true -var skip_credentials_checks=true -var enforce_tls=false \
#     -var access_key=testing -var secret_key=testing -var force_destroy=true

terraform {
  required_version = ">= 1.7"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 6.0"
    }
  }
}

provider "aws" {
  region     = var.region
  access_key = var.access_key
  secret_key = var.secret_key

  # Everything below only matters for a local or S3-compatible server.
  s3_use_path_style           = var.s3_use_path_style
  skip_credentials_validation = var.skip_credentials_checks
  skip_requesting_account_id  = var.skip_credentials_checks
  skip_metadata_api_check     = var.skip_credentials_checks
  skip_region_validation      = var.skip_credentials_checks

  dynamic "endpoints" {
    for_each = var.endpoint_url == null ? [] : [var.endpoint_url]

    content {
      s3  = endpoints.value
      iam = coalesce(var.iam_endpoint_url, endpoints.value)
      sts = coalesce(var.sts_endpoint_url, endpoints.value)
    }
  }
}

module "checkpoints" {
  source = "../../modules/aws-checkpoint-bucket"

  bucket_name                        = var.bucket_name
  prefix                             = var.prefix
  force_destroy                      = var.force_destroy
  kms_key_arn                        = var.kms_key_arn
  enforce_tls                        = var.enforce_tls
  versioning                         = var.versioning
  abort_incomplete_multipart_days    = var.abort_incomplete_multipart_days
  noncurrent_version_expiration_days = var.noncurrent_version_expiration_days
  transition_days                    = var.transition_days
  create_iam_policies                = var.create_iam_policies
  s3_compat_skip_bucket_controls     = var.s3_compat_skip_bucket_controls
  writer_role_names                  = var.writer_role_names
  reader_role_names                  = var.reader_role_names

  # What goes into the generated cloudckpt config.
  endpoint_url = var.endpoint_url
  path_style   = var.s3_use_path_style
  region       = var.region

  tags = var.tags
}
