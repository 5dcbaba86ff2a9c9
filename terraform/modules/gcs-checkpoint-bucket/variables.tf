variable "project" {
  description = "The GCP project that owns the bucket."
  type        = string
}

variable "bucket_name" {
  description = "The bucket's name (globally unique)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be 3-63 characters of lowercase letters, digits, dots, hyphens and underscores."
  }
}

variable "location" {
  description = "The bucket's location: a region (cheapest, next to the accelerators) or a multi-region."
  type        = string
  default     = "US"
}

variable "storage_class" {
  description = "The default storage class for new objects."
  type        = string
  default     = "STANDARD"
}

variable "prefix" {
  description = "The object prefix checkpoints live under (no leading or trailing slash). The IAM conditions are scoped to it."
  type        = string
  default     = "checkpoints"

  validation {
    condition     = can(regex("^[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*$", var.prefix))
    error_message = "prefix must be non-empty, without leading or trailing slash, of safe object-name characters."
  }
}

variable "force_destroy" {
  description = "Let terraform destroy delete a bucket that still holds objects. Keep false in production."
  type        = bool
  default     = false
}

variable "kms_key_name" {
  description = "A Cloud KMS key for CMEK default encryption. Null: Google-managed encryption (always on)."
  type        = string
  default     = null
}

variable "versioning" {
  description = "Object versioning: overwritten or deleted checkpoints stay as noncurrent versions until noncurrent_delete_days."
  type        = bool
  default     = false
}

variable "soft_delete_retention_days" {
  description = "Soft-delete window: deleted objects stay restorable (and billed) this long. 0 turns it off; else 7 to 90."
  type        = number
  default     = 7

  validation {
    condition     = var.soft_delete_retention_days == 0 || (var.soft_delete_retention_days >= 7 && var.soft_delete_retention_days <= 90)
    error_message = "soft_delete_retention_days must be 0 or between 7 and 90."
  }
}

variable "noncurrent_delete_days" {
  description = "Delete noncurrent versions this many days after they became noncurrent (matters with versioning)."
  type        = number
  default     = 7
}

variable "abort_incomplete_multipart_days" {
  description = "Abort XML-API multipart uploads (S3-compatible clients) incomplete after this many days."
  type        = number
  default     = 2
}

variable "transition_days" {
  description = "Move checkpoints under the prefix to transition_storage_class this many days after they were written. Null: never."
  type        = number
  default     = null
}

variable "transition_storage_class" {
  description = "The cheaper class old checkpoints move to (NEARLINE, COLDLINE, ARCHIVE)."
  type        = string
  default     = "NEARLINE"
}

variable "log_bucket" {
  description = "A bucket that receives usage and storage logs for this one. Null: no access logs (Cloud Audit Logs still apply)."
  type        = string
  default     = null
}

variable "writer_members" {
  description = "IAM members (e.g. serviceAccount:trainer@PROJECT.iam.gserviceaccount.com) that write checkpoints."
  type        = list(string)
  default     = []
}

variable "reader_members" {
  description = "IAM members that only read checkpoints."
  type        = list(string)
  default     = []
}

variable "writer_role" {
  description = "The role writers get (create, get, list, delete objects)."
  type        = string
  default     = "roles/storage.objectUser"
}

variable "reader_role" {
  description = "The role readers get."
  type        = string
  default     = "roles/storage.objectViewer"
}

variable "prefix_conditions" {
  description = "Scope the writer and reader bindings to the prefix with IAM conditions (objects under it, listings of it)."
  type        = bool
  default     = true
}

variable "endpoint_url" {
  description = "A GCS endpoint for the generated cloudckpt config (an emulator). Null: Google's."
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

variable "labels" {
  description = "Labels for the bucket."
  type        = map(string)
  default     = {}
}
