variable "bucket_name" {
  description = "The S3 bucket's name (globally unique)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be 3-63 characters of lowercase letters, digits, dots and hyphens."
  }
}

variable "prefix" {
  description = "The key prefix checkpoints live under (no leading or trailing slash). The IAM policies are scoped to it."
  type        = string
  default     = "checkpoints"

  validation {
    condition     = can(regex("^[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*$", var.prefix))
    error_message = "prefix must be non-empty, without leading or trailing slash, of safe key characters."
  }
}

variable "force_destroy" {
  description = "Let terraform destroy delete a bucket that still holds objects. Keep false in production."
  type        = bool
  default     = false
}

variable "kms_key_arn" {
  description = "A KMS key ARN for SSE-KMS (with an S3 bucket key). Null: SSE-S3 (AES256)."
  type        = string
  default     = null
}

variable "enforce_tls" {
  description = <<-EOT
    Add the bucket-policy statement that denies every request not made over TLS. Keep true
    anywhere real; turn it off only to apply against a local plain-HTTP S3 server (moto,
    SeaweedFS), where it would lock everyone out, the applier included.
  EOT
  type        = bool
  default     = true
}

variable "versioning" {
  description = "Enable object versioning: overwritten or deleted checkpoints stay recoverable until noncurrent_version_expiration_days."
  type        = bool
  default     = true
}

variable "abort_incomplete_multipart_days" {
  description = "Abort multipart uploads still incomplete after this many days (the parts of a crashed save are billed until then)."
  type        = number
  default     = 2

  validation {
    condition     = var.abort_incomplete_multipart_days >= 1
    error_message = "abort_incomplete_multipart_days must be at least 1."
  }
}

variable "noncurrent_version_expiration_days" {
  description = "Delete noncurrent (overwritten or deleted) versions this many days after they stop being current."
  type        = number
  default     = 7

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1
    error_message = "noncurrent_version_expiration_days must be at least 1."
  }
}

variable "transition_days" {
  description = "Move checkpoints under the prefix to transition_storage_class this many days after they were written. Null: never."
  type        = number
  default     = null
}

variable "transition_storage_class" {
  description = "The cheaper storage class old checkpoints move to (STANDARD_IA, INTELLIGENT_TIERING, GLACIER_IR, ...)."
  type        = string
  default     = "STANDARD_IA"

  validation {
    condition     = contains(["STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR", "GLACIER", "DEEP_ARCHIVE"], var.transition_storage_class)
    error_message = "transition_storage_class must be one of STANDARD_IA, ONEZONE_IA, INTELLIGENT_TIERING, GLACIER_IR, GLACIER, DEEP_ARCHIVE."
  }
}

variable "access_log_bucket" {
  description = "A bucket that receives S3 server access logs for this one. Null: no access logging."
  type        = string
  default     = null
}

variable "create_iam_policies" {
  description = "Create the writer and reader aws_iam_policy resources (their JSON is output either way)."
  type        = bool
  default     = true
}

variable "writer_role_names" {
  description = "IAM role names to attach the writer policy to (needs create_iam_policies)."
  type        = list(string)
  default     = []
}

variable "reader_role_names" {
  description = "IAM role names to attach the read-only policy to (needs create_iam_policies)."
  type        = list(string)
  default     = []
}

variable "endpoint_url" {
  description = "An S3 endpoint for the generated cloudckpt config (a local or S3-compatible server). Null: AWS's."
  type        = string
  default     = null
}

variable "path_style" {
  description = "Write path-style addressing into the generated cloudckpt config (for local servers)."
  type        = bool
  default     = false
}

variable "region" {
  description = "A region for the generated cloudckpt config (client_kwargs.region_name). Null: left to the environment."
  type        = string
  default     = null
}

variable "writer_file_size" {
  description = "[writer] file_size in the generated cloudckpt config."
  type        = string
  default     = "256MiB"
}

variable "writer_concurrency" {
  description = "[writer] concurrency in the generated cloudckpt config."
  type        = number
  default     = 8
}

variable "tags" {
  description = "Tags for every taggable resource."
  type        = map(string)
  default     = {}
}

variable "s3_compat_skip_bucket_controls" {
  description = <<-EOT
    Leave out the public access block and the ownership controls, for S3-compatible servers
    that lack those APIs (SeaweedFS answers 501/403). Never set it on AWS: the bucket would rely
    on its policy alone to stay private.
  EOT
  type        = bool
  default     = false
}
