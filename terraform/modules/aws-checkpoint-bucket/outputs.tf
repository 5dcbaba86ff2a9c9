output "bucket_name" {
  description = "The bucket's name."
  value       = aws_s3_bucket.this.bucket
}

output "bucket_arn" {
  description = "The bucket's ARN."
  value       = aws_s3_bucket.this.arn
}

output "prefix" {
  description = "The key prefix checkpoints live under."
  value       = var.prefix
}

output "root_uri" {
  description = "The checkpoint root, s3://BUCKET/PREFIX."
  value       = "s3://${aws_s3_bucket.this.bucket}/${var.prefix}"
}

output "writer_policy_json" {
  description = "The writer IAM policy document (JSON)."
  value       = local.writer_policy_json
}

output "reader_policy_json" {
  description = "The read-only IAM policy document (JSON)."
  value       = local.reader_policy_json
}

output "writer_policy_arn" {
  description = "The writer aws_iam_policy's ARN (null when create_iam_policies is false)."
  value       = one(aws_iam_policy.writer[*].arn)
}

output "reader_policy_arn" {
  description = "The reader aws_iam_policy's ARN (null when create_iam_policies is false)."
  value       = one(aws_iam_policy.reader[*].arn)
}

output "bucket_policy_json" {
  description = "The bucket policy (JSON), null when it has no statements."
  value       = local.bucket_policy_json
}

output "cloudckpt_config" {
  description = "A cloudckpt configuration file (TOML) pointing at the bucket: terraform output -raw cloudckpt_config > cloudckpt.toml"
  value       = module.cloudckpt_config.toml
}
