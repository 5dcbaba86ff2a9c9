# A GCS bucket for cloudckpt checkpoints: uniform bucket-level access (no object ACLs), public
# access prevention enforced, lifecycle rules, and prefix-scoped IAM bindings.
#
# The google provider is not in the offline mirror CI uses: this module is checked with
# terraform fmt only (plus the shared cloudckpt-config module, which is applied and tested).

locals {
  bucket_resource = "projects/_/buckets/${var.bucket_name}"

  # Objects under the prefix, and listings whose prefix lies under it.
  prefix_expression = join(" || ", [
    "resource.name.startsWith(\"${local.bucket_resource}/objects/${var.prefix}/\")",
    "(resource.type == \"storage.googleapis.com/Bucket\" && (api.getAttribute(\"storage.googleapis.com/objectListPrefix\", \"\") == \"${var.prefix}\" || api.getAttribute(\"storage.googleapis.com/objectListPrefix\", \"\").startsWith(\"${var.prefix}/\")))",
  ])

  writer_bindings = [for m in var.writer_members : { role = var.writer_role, member = m }]
  reader_bindings = [for m in var.reader_members : { role = var.reader_role, member = m }]
}

resource "google_storage_bucket" "this" {
  name          = var.bucket_name
  project       = var.project
  location      = var.location
  storage_class = var.storage_class
  force_destroy = var.force_destroy
  labels        = var.labels

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  versioning {
    enabled = var.versioning
  }

  soft_delete_policy {
    retention_duration_seconds = var.soft_delete_retention_days * 86400
  }

  dynamic "logging" {
    for_each = var.log_bucket == null ? [] : [var.log_bucket]

    content {
      log_bucket        = logging.value
      log_object_prefix = var.bucket_name
    }
  }

  dynamic "encryption" {
    for_each = var.kms_key_name == null ? [] : [var.kms_key_name]

    content {
      default_kms_key_name = encryption.value
    }
  }

  # Parts of an abandoned XML-API multipart upload are billed until aborted. (gcsfs uses JSON-API
  # resumable uploads, which GCS drops after a week by itself.)
  lifecycle_rule {
    condition {
      age = var.abort_incomplete_multipart_days
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  # Noncurrent versions are billed like live ones until deleted.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_delete_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  dynamic "lifecycle_rule" {
    for_each = var.transition_days == null ? [] : [var.transition_days]

    content {
      condition {
        age            = lifecycle_rule.value
        matches_prefix = ["${var.prefix}/"]
        with_state     = "LIVE"
      }
      action {
        type          = "SetStorageClass"
        storage_class = var.transition_storage_class
      }
    }
  }
}

resource "google_storage_bucket_iam_member" "writer" {
  for_each = toset(var.writer_members)

  bucket = google_storage_bucket.this.name
  role   = var.writer_role
  member = each.value

  dynamic "condition" {
    for_each = var.prefix_conditions ? [local.prefix_expression] : []

    content {
      title       = "cloudckpt-writer-prefix"
      description = "Only objects under ${var.prefix}/"
      expression  = condition.value
    }
  }
}

resource "google_storage_bucket_iam_member" "reader" {
  for_each = toset(var.reader_members)

  bucket = google_storage_bucket.this.name
  role   = var.reader_role
  member = each.value

  dynamic "condition" {
    for_each = var.prefix_conditions ? [local.prefix_expression] : []

    content {
      title       = "cloudckpt-reader-prefix"
      description = "Only objects under ${var.prefix}/"
      expression  = condition.value
    }
  }
}

module "cloudckpt_config" {
  source = "../cloudckpt-config"

  backend = "gcs"
  root    = "gs://${google_storage_bucket.this.name}/${var.prefix}"
  options = {
    endpoint_url = var.endpoint_url
    project      = var.project
  }
  file_size   = var.writer_file_size
  concurrency = var.writer_concurrency
}
