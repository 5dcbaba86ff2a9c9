output "bucket_name" {
  description = "The bucket's name."
  value       = google_storage_bucket.this.name
}

output "bucket_url" {
  description = "The bucket's gs:// URL."
  value       = google_storage_bucket.this.url
}

output "bucket_self_link" {
  description = "The bucket's self link."
  value       = google_storage_bucket.this.self_link
}

output "prefix" {
  description = "The object prefix checkpoints live under."
  value       = var.prefix
}

output "root_uri" {
  description = "The checkpoint root, gs://BUCKET/PREFIX."
  value       = "gs://${google_storage_bucket.this.name}/${var.prefix}"
}

output "writer_iam_json" {
  description = "The writer bindings (role, member, condition) as JSON."
  value = jsonencode([for b in local.writer_bindings : merge(b, {
    condition = var.prefix_conditions ? local.prefix_expression : null
  })])
}

output "reader_iam_json" {
  description = "The reader bindings (role, member, condition) as JSON."
  value = jsonencode([for b in local.reader_bindings : merge(b, {
    condition = var.prefix_conditions ? local.prefix_expression : null
  })])
}

output "prefix_condition_expression" {
  description = "The IAM condition (CEL) that scopes the bindings to the prefix."
  value       = local.prefix_expression
}

output "cloudckpt_config" {
  description = "A cloudckpt configuration file (TOML) pointing at the bucket: terraform output -raw cloudckpt_config > cloudckpt.toml"
  value       = module.cloudckpt_config.toml
}
