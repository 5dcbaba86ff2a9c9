output "bucket_name" {
  description = "The bucket's name."
  value       = module.checkpoints.bucket_name
}

output "bucket_arn" {
  description = "The bucket's ARN."
  value       = module.checkpoints.bucket_arn
}

output "root_uri" {
  description = "The checkpoint root URI."
  value       = module.checkpoints.root_uri
}

output "writer_policy_json" {
  description = "The writer IAM policy (JSON)."
  value       = module.checkpoints.writer_policy_json
}

output "reader_policy_json" {
  description = "The read-only IAM policy (JSON)."
  value       = module.checkpoints.reader_policy_json
}

output "bucket_policy_json" {
  description = "The bucket policy (JSON), null when empty."
  value       = module.checkpoints.bucket_policy_json
}

output "cloudckpt_config" {
  description = "The cloudckpt configuration file (TOML)."
  value       = module.checkpoints.cloudckpt_config
}
