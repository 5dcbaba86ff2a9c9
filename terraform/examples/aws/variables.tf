variable "bucket_name" {
  description = "The S3 bucket's name."
  type        = string
}

variable "prefix" {
  description = "The key prefix checkpoints live under."
  type        = string
  default     = "checkpoints"
}

variable "region" {
  description = "The AWS region."
  type        = string
  default     = "us-east-1"
}

variable "force_destroy" {
  description = "Let terraform destroy delete a non-empty bucket."
  type        = bool
  default     = false
}

variable "kms_key_arn" {
  description = "A KMS key for SSE-KMS; null: SSE-S3."
  type        = string
  default     = null
}

variable "enforce_tls" {
  description = "Deny non-TLS requests in the bucket policy. Set false only for a local plain-HTTP server."
  type        = bool
  default     = true
}

variable "versioning" {
  description = "Enable object versioning."
  type        = bool
  default     = true
}

variable "abort_incomplete_multipart_days" {
  description = "Abort multipart uploads incomplete after this many days."
  type        = number
  default     = 2
}

variable "noncurrent_version_expiration_days" {
  description = "Delete noncurrent versions after this many days."
  type        = number
  default     = 7
}

variable "transition_days" {
  description = "Move checkpoints to STANDARD_IA after this many days; null: never."
  type        = number
  default     = null
}

variable "create_iam_policies" {
  description = "Create the writer and reader IAM policies."
  type        = bool
  default     = true
}

variable "writer_role_names" {
  description = "IAM roles to attach the writer policy to."
  type        = list(string)
  default     = []
}

variable "reader_role_names" {
  description = "IAM roles to attach the reader policy to."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags for every taggable resource."
  type        = map(string)
  default     = {}
}

# --- local or S3-compatible servers -----------------------------------------------------------

variable "endpoint_url" {
  description = "An S3 endpoint override (e.g. http://127.0.0.1:5000 for moto); also used for IAM and STS unless those are given. Null: AWS."
  type        = string
  default     = null
}

variable "iam_endpoint_url" {
  description = "An IAM endpoint override; null: endpoint_url."
  type        = string
  default     = null
}

variable "sts_endpoint_url" {
  description = "An STS endpoint override; null: endpoint_url."
  type        = string
  default     = null
}

variable "s3_use_path_style" {
  description = "Path-style S3 addressing (local servers), for the provider and the generated cloudckpt config."
  type        = bool
  default     = false
}

variable "skip_credentials_checks" {
  description = "Skip the provider's STS credential validation, account-id lookup, metadata API and region checks (local servers)."
  type        = bool
  default     = false
}

variable "access_key" {
  description = "A static access key (local servers); null: the usual AWS credential chain."
  type        = string
  default     = null
  sensitive   = true
}

variable "secret_key" {
  description = "A static secret key (local servers); null: the usual AWS credential chain."
  type        = string
  default     = null
  sensitive   = true
}

variable "s3_compat_skip_bucket_controls" {
  description = "Leave out the public access block and ownership controls (S3-compatible servers without those APIs, e.g. SeaweedFS). Never on AWS."
  type        = bool
  default     = false
}
