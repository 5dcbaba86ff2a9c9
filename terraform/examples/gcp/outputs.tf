output "bucket_name" {
  description = "The bucket's name."
  value       = module.checkpoints.bucket_name
}

output "root_uri" {
  description = "The checkpoint root URI."
  value       = module.checkpoints.root_uri
}

output "writer_service_account" {
  description = "The writer service account's email (null when not created)."
  value       = one(google_service_account.writer[*].email)
}

output "reader_service_account" {
  description = "The reader service account's email (null when not created)."
  value       = one(google_service_account.reader[*].email)
}

output "writer_iam_json" {
  description = "The writer bindings as JSON."
  value       = module.checkpoints.writer_iam_json
}

output "reader_iam_json" {
  description = "The reader bindings as JSON."
  value       = module.checkpoints.reader_iam_json
}

output "cloudckpt_config" {
  description = "The cloudckpt configuration file (TOML)."
  value       = module.checkpoints.cloudckpt_config
}
