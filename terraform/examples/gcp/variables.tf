variable "project" {
  description = "The GCP project."
  type        = string
}

variable "region" {
  description = "The provider's default region."
  type        = string
  default     = "us-central1"
}

variable "bucket_name" {
  description = "The bucket's name."
  type        = string
}

variable "location" {
  description = "The bucket's location; a region next to the accelerators is cheapest."
  type        = string
  default     = "US-CENTRAL1"
}

variable "prefix" {
  description = "The object prefix checkpoints live under."
  type        = string
  default     = "checkpoints"
}

variable "force_destroy" {
  description = "Let terraform destroy delete a non-empty bucket."
  type        = bool
  default     = false
}

variable "versioning" {
  description = "Object versioning."
  type        = bool
  default     = false
}

variable "soft_delete_retention_days" {
  description = "Soft-delete window in days (0: off, else 7-90)."
  type        = number
  default     = 7
}

variable "transition_days" {
  description = "Move checkpoints to NEARLINE after this many days; null: never."
  type        = number
  default     = null
}

variable "create_service_accounts" {
  description = "Create a writer and a reader service account and bind them."
  type        = bool
  default     = true
}

variable "service_account_prefix" {
  description = "Account-id prefix for the created service accounts (6-24 characters in all)."
  type        = string
  default     = "ckpt"
}

variable "writer_members" {
  description = "Further IAM members that write checkpoints."
  type        = list(string)
  default     = []
}

variable "reader_members" {
  description = "Further IAM members that read checkpoints."
  type        = list(string)
  default     = []
}

variable "endpoint_url" {
  description = "A GCS endpoint for the generated cloudckpt config (emulator); null: Google's."
  type        = string
  default     = null
}
