# Renders a cloudckpt configuration file (see DESIGN.md, "Configuration") as a TOML string.
# Pure Terraform, no provider: the S3 and GCS modules both use it, and it is tested offline.

terraform {
  required_version = ">= 1.7"
}

variable "backend" {
  description = "The cloudckpt storage backend name, e.g. \"s3\" or \"gcs\"."
  type        = string
}

variable "root" {
  description = "The URI relative checkpoint names resolve against, e.g. s3://bucket/prefix."
  type        = string
}

variable "options" {
  description = <<-EOT
    The backend's storage options ([storage.options], handed to the fsspec filesystem). Values are
    strings, numbers, bools, or maps of those, nested at most two deep (enough for s3fs's
    config_kwargs = { s3 = { addressing_style = "path" } }). Null values are dropped.
  EOT
  type        = any
  default     = {}
}

variable "file_size" {
  description = "[writer] file_size: the size a rank's data files are cut at (bytes or with KiB/MiB/GiB)."
  type        = string
  default     = "256MiB"
}

variable "concurrency" {
  description = "[writer] concurrency: files a rank writes in parallel."
  type        = number
  default     = 8

  validation {
    condition     = var.concurrency >= 1 && floor(var.concurrency) == var.concurrency
    error_message = "concurrency must be a whole number of at least 1."
  }
}

locals {
  options = { for k, v in var.options : k => v if v != null }

  # TOML keys: bare when they may be, else quoted. Values: JSON's strings, numbers and bools are
  # valid TOML; maps become inline tables (two levels, which is what s3fs/gcsfs options need).
  option_lines = [
    for k in sort(keys(local.options)) : format("%s = %s",
      can(regex("^[A-Za-z0-9_-]+$", k)) ? k : jsonencode(k),
      can(keys(local.options[k])) ? format("{ %s }", join(", ", [
        for k2 in sort(keys(local.options[k])) : format("%s = %s",
          can(regex("^[A-Za-z0-9_-]+$", k2)) ? k2 : jsonencode(k2),
          can(keys(local.options[k][k2])) ? format("{ %s }", join(", ", [
            for k3 in sort(keys(local.options[k][k2])) : format("%s = %s",
              can(regex("^[A-Za-z0-9_-]+$", k3)) ? k3 : jsonencode(k3),
            jsonencode(local.options[k][k2][k3]))
        ])) : jsonencode(local.options[k][k2]))
    ])) : jsonencode(local.options[k]))
  ]

  toml = join("\n", concat(
    [
      "[storage]",
      "backend = ${jsonencode(var.backend)}",
      "root = ${jsonencode(var.root)}",
    ],
    length(local.option_lines) > 0 ? concat(["", "[storage.options]"], local.option_lines) : [],
    [
      "",
      "[writer]",
      "file_size = ${jsonencode(var.file_size)}",
      "concurrency = ${var.concurrency}",
      "",
    ],
  ))
}

output "toml" {
  description = "The cloudckpt configuration file's text."
  value       = local.toml
}
