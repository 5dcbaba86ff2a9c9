# A cloudckpt checkpoint bucket on GCS with a writer and a reader service account:
#
#   terraform init && terraform apply -var project=my-project -var bucket_name=my-ckpts
#   terraform output -raw cloudckpt_config > cloudckpt.toml

terraform {
  required_version = ">= 1.7"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 5.0, < 7.0"
    }
  }
}

provider "google" {
  project = var.project
  region  = var.region
}

resource "google_service_account" "writer" {
  count = var.create_service_accounts ? 1 : 0

  account_id   = "${var.service_account_prefix}-writer"
  display_name = "cloudckpt checkpoint writer (${var.bucket_name})"
}

resource "google_service_account" "reader" {
  count = var.create_service_accounts ? 1 : 0

  account_id   = "${var.service_account_prefix}-reader"
  display_name = "cloudckpt checkpoint reader (${var.bucket_name})"
}

module "checkpoints" {
  source = "../../modules/gcs-checkpoint-bucket"

  project                    = var.project
  bucket_name                = var.bucket_name
  location                   = var.location
  prefix                     = var.prefix
  force_destroy              = var.force_destroy
  versioning                 = var.versioning
  soft_delete_retention_days = var.soft_delete_retention_days
  transition_days            = var.transition_days

  # Members spelled from known values: for_each keys must be known at plan time.
  writer_members = concat(var.writer_members, var.create_service_accounts ? [local.writer_member] : [])
  reader_members = concat(var.reader_members, var.create_service_accounts ? [local.reader_member] : [])

  endpoint_url = var.endpoint_url

  depends_on = [google_service_account.writer, google_service_account.reader]
}

locals {
  writer_member = "serviceAccount:${var.service_account_prefix}-writer@${var.project}.iam.gserviceaccount.com"
  reader_member = "serviceAccount:${var.service_account_prefix}-reader@${var.project}.iam.gserviceaccount.com"
}
