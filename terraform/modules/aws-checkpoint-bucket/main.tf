# An S3 bucket for cloudckpt checkpoints: private, encrypted, TLS-only, with the lifecycle rules
# checkpoint buckets need, and IAM policies scoped to the checkpoint prefix.

data "aws_partition" "current" {}

locals {
  bucket_arn  = "arn:${data.aws_partition.current.partition}:s3:::${var.bucket_name}"
  objects_arn = "${local.bucket_arn}/${var.prefix}/*"
  use_kms     = var.kms_key_arn != null
}

resource "aws_s3_bucket" "this" {
  bucket        = var.bucket_name
  force_destroy = var.force_destroy
  tags          = var.tags
}

# No ACLs: the bucket owner owns every object, and access is decided by policies alone.
resource "aws_s3_bucket_ownership_controls" "this" {
  count = var.s3_compat_skip_bucket_controls ? 0 : 1

  bucket = aws_s3_bucket.this.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  count = var.s3_compat_skip_bucket_controls ? 0 : 1

  bucket = aws_s3_bucket.this.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = local.use_kms ? "aws:kms" : "AES256"
      kms_master_key_id = var.kms_key_arn
    }
    # With KMS, one data key per bucket instead of one KMS call per object (checkpoints are many
    # objects): cuts KMS request costs by orders of magnitude.
    bucket_key_enabled = local.use_kms ? true : null
  }
}

resource "aws_s3_bucket_versioning" "this" {
  bucket = aws_s3_bucket.this.id

  versioning_configuration {
    status = var.versioning ? "Enabled" : "Suspended"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  # A save that crashes mid-upload leaves multipart parts that are billed (and invisible to
  # listings) until aborted.
  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_days
    }
  }

  # Overwritten or deleted checkpoints stay billed as noncurrent versions until expired.
  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"

    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }
  }

  dynamic "rule" {
    for_each = var.transition_days == null ? [] : [var.transition_days]

    content {
      id     = "transition-old-checkpoints"
      status = "Enabled"

      filter {
        prefix = "${var.prefix}/"
      }

      transition {
        days          = rule.value
        storage_class = var.transition_storage_class
      }
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

resource "aws_s3_bucket_logging" "this" {
  count = var.access_log_bucket == null ? 0 : 1

  bucket        = aws_s3_bucket.this.id
  target_bucket = var.access_log_bucket
  target_prefix = "${var.bucket_name}/"
}

locals {
  deny_insecure_transport = {
    Sid       = "DenyInsecureTransport"
    Effect    = "Deny"
    Principal = "*"
    Action    = "s3:*"
    Resource  = [local.bucket_arn, "${local.bucket_arn}/*"]
    Condition = { Bool = { "aws:SecureTransport" = "false" } }
  }

  bucket_policy_statements = var.enforce_tls ? [local.deny_insecure_transport] : []

  bucket_policy_json = length(local.bucket_policy_statements) == 0 ? null : jsonencode({
    Version   = "2012-10-17"
    Statement = local.bucket_policy_statements
  })
}

resource "aws_s3_bucket_policy" "this" {
  count = local.bucket_policy_json == null ? 0 : 1

  bucket = aws_s3_bucket.this.id
  policy = local.bucket_policy_json

  # Put the public access block first: both write the bucket policy state and S3 rejects
  # concurrent changes.
  depends_on = [aws_s3_bucket_public_access_block.this]
}

# ---------------------------------------------------------------------------------------------
# IAM: a writer (put, get, list, delete, abort multipart under the prefix) and a reader (get,
# list under the prefix). Neither can touch object versions: noncurrent checkpoints are removed
# by the lifecycle rule only.

locals {
  list_prefix_condition = { StringLike = { "s3:prefix" = [var.prefix, "${var.prefix}/*"] } }

  writer_policy_json = jsonencode({
    Version = "2012-10-17"
    Statement = concat([
      {
        Sid       = "ListCheckpointPrefix"
        Effect    = "Allow"
        Action    = ["s3:ListBucket"]
        Resource  = [local.bucket_arn]
        Condition = local.list_prefix_condition
      },
      {
        Sid      = "BucketMetadata"
        Effect   = "Allow"
        Action   = ["s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
        Resource = [local.bucket_arn]
      },
      {
        Sid    = "ReadWriteCheckpoints"
        Effect = "Allow"
        Action = [
          "s3:PutObject",
          "s3:GetObject",
          "s3:DeleteObject",
          "s3:AbortMultipartUpload",
          "s3:ListMultipartUploadParts",
        ]
        Resource = [local.objects_arn]
      },
      ], local.use_kms ? [{
        Sid      = "UseCheckpointKey"
        Effect   = "Allow"
        Action   = ["kms:GenerateDataKey", "kms:Decrypt", "kms:Encrypt"]
        Resource = [var.kms_key_arn]
    }] : [])
  })

  reader_policy_json = jsonencode({
    Version = "2012-10-17"
    Statement = concat([
      {
        Sid       = "ListCheckpointPrefix"
        Effect    = "Allow"
        Action    = ["s3:ListBucket"]
        Resource  = [local.bucket_arn]
        Condition = local.list_prefix_condition
      },
      {
        Sid      = "BucketMetadata"
        Effect   = "Allow"
        Action   = ["s3:GetBucketLocation"]
        Resource = [local.bucket_arn]
      },
      {
        Sid      = "ReadCheckpoints"
        Effect   = "Allow"
        Action   = ["s3:GetObject"]
        Resource = [local.objects_arn]
      },
      ], local.use_kms ? [{
        Sid      = "DecryptCheckpoints"
        Effect   = "Allow"
        Action   = ["kms:Decrypt"]
        Resource = [var.kms_key_arn]
    }] : [])
  })
}

resource "aws_iam_policy" "writer" {
  count = var.create_iam_policies ? 1 : 0

  name        = "${var.bucket_name}-checkpoint-writer"
  description = "Write, read, list and delete cloudckpt checkpoints under s3://${var.bucket_name}/${var.prefix}/"
  policy      = local.writer_policy_json
  tags        = var.tags
}

resource "aws_iam_policy" "reader" {
  count = var.create_iam_policies ? 1 : 0

  name        = "${var.bucket_name}-checkpoint-reader"
  description = "Read and list cloudckpt checkpoints under s3://${var.bucket_name}/${var.prefix}/"
  policy      = local.reader_policy_json
  tags        = var.tags
}

resource "aws_iam_role_policy_attachment" "writer" {
  for_each = var.create_iam_policies ? toset(var.writer_role_names) : toset([])

  role       = each.value
  policy_arn = aws_iam_policy.writer[0].arn
}

resource "aws_iam_role_policy_attachment" "reader" {
  for_each = var.create_iam_policies ? toset(var.reader_role_names) : toset([])

  role       = each.value
  policy_arn = aws_iam_policy.reader[0].arn
}

# ---------------------------------------------------------------------------------------------

module "cloudckpt_config" {
  source = "../cloudckpt-config"

  backend = "s3"
  root    = "s3://${aws_s3_bucket.this.bucket}/${var.prefix}"
  options = {
    endpoint_url  = var.endpoint_url
    client_kwargs = var.region == null ? null : { region_name = var.region }
    config_kwargs = var.path_style ? { s3 = { addressing_style = "path" } } : null
  }
  file_size   = var.writer_file_size
  concurrency = var.writer_concurrency
}
