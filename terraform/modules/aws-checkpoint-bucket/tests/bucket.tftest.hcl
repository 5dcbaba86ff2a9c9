# Offline checks of the module's rules, against a mocked AWS provider (no endpoint needed).
# Run: terraform init && terraform test   (in modules/aws-checkpoint-bucket)

mock_provider "aws" {
  mock_data "aws_partition" {
    defaults = {
      partition = "aws"
    }
  }
}

variables {
  bucket_name = "ckpt-test-bucket"
  prefix      = "runs/exp1"
}

run "defaults_are_private_encrypted_and_tls_only" {
  command = apply

  assert {
    condition = alltrue([
      aws_s3_bucket_public_access_block.this[0].block_public_acls,
      aws_s3_bucket_public_access_block.this[0].block_public_policy,
      aws_s3_bucket_public_access_block.this[0].ignore_public_acls,
      aws_s3_bucket_public_access_block.this[0].restrict_public_buckets,
    ])
    error_message = "all four public access blocks must be on"
  }

  assert {
    condition     = one(aws_s3_bucket_ownership_controls.this[0].rule).object_ownership == "BucketOwnerEnforced"
    error_message = "ACLs must be disabled (BucketOwnerEnforced)"
  }

  assert {
    condition     = one(one(aws_s3_bucket_server_side_encryption_configuration.this.rule).apply_server_side_encryption_by_default).sse_algorithm == "AES256"
    error_message = "default encryption must be SSE-S3 when no KMS key is given"
  }

  assert {
    condition     = aws_s3_bucket_versioning.this.versioning_configuration[0].status == "Enabled"
    error_message = "versioning is on by default"
  }

  assert {
    condition = length([
      for r in aws_s3_bucket_lifecycle_configuration.this.rule : r
      if r.status == "Enabled" && length(r.abort_incomplete_multipart_upload) == 1
      && try(r.abort_incomplete_multipart_upload[0].days_after_initiation, 0) == 2
    ]) == 1
    error_message = "an enabled rule must abort incomplete multipart uploads after 2 days"
  }

  assert {
    condition = length([
      for r in aws_s3_bucket_lifecycle_configuration.this.rule : r
      if r.status == "Enabled" && try(r.noncurrent_version_expiration[0].noncurrent_days, 0) == 7
    ]) == 1
    error_message = "an enabled rule must expire noncurrent versions after 7 days"
  }

  assert {
    condition     = length(aws_s3_bucket_lifecycle_configuration.this.rule) == 2
    error_message = "no transition rule unless transition_days is set"
  }

  assert {
    condition = length([
      for s in jsondecode(aws_s3_bucket_policy.this[0].policy).Statement : s
      if s.Effect == "Deny" && s.Principal == "*" && s.Action == "s3:*"
      && s.Condition.Bool["aws:SecureTransport"] == "false"
      && toset(s.Resource) == toset(["arn:aws:s3:::ckpt-test-bucket", "arn:aws:s3:::ckpt-test-bucket/*"])
    ]) == 1
    error_message = "the bucket policy must deny every non-TLS request on the bucket and its objects"
  }

  assert {
    condition     = length(aws_iam_policy.writer) == 1 && length(aws_iam_policy.reader) == 1
    error_message = "both IAM policies are created by default"
  }

  assert {
    condition     = output.root_uri == "s3://ckpt-test-bucket/runs/exp1"
    error_message = "root_uri must be s3://BUCKET/PREFIX"
  }
}

run "writer_policy_is_scoped_to_the_prefix" {
  command = apply

  assert {
    # Every object-level statement names only objects under the prefix.
    condition = alltrue(flatten([
      for s in jsondecode(output.writer_policy_json).Statement : [
        for r in s.Resource : r == "arn:aws:s3:::ckpt-test-bucket/runs/exp1/*"
      ] if s.Sid == "ReadWriteCheckpoints"
    ]))
    error_message = "the writer's object statement must cover only PREFIX/*"
  }

  assert {
    # No statement grants anything on the whole bucket's objects or on any other resource.
    condition = alltrue(flatten([
      for s in jsondecode(output.writer_policy_json).Statement : [
        for r in s.Resource : contains(["arn:aws:s3:::ckpt-test-bucket", "arn:aws:s3:::ckpt-test-bucket/runs/exp1/*"], r)
      ]
    ]))
    error_message = "the writer policy must name only the bucket and PREFIX/*"
  }

  assert {
    condition = toset(one([
      for s in jsondecode(output.writer_policy_json).Statement : s.Action if s.Sid == "ReadWriteCheckpoints"
      ])) == toset([
      "s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts",
    ])
    error_message = "the writer may put, get, delete and abort multipart uploads under the prefix (no version deletes)"
  }

  assert {
    condition = one([
      for s in jsondecode(output.writer_policy_json).Statement : s
      if contains(s.Action, "s3:ListBucket")
    ]).Condition.StringLike["s3:prefix"] == ["runs/exp1", "runs/exp1/*"]
    error_message = "ListBucket must be limited to the prefix"
  }

  assert {
    condition = alltrue([
      for s in jsondecode(output.writer_policy_json).Statement : s.Effect == "Allow" && !contains(s.Action, "s3:*")
    ])
    error_message = "no wildcard actions in the writer policy"
  }

  assert {
    condition     = aws_iam_policy.writer[0].policy == output.writer_policy_json
    error_message = "the created IAM policy is the output JSON"
  }
}

run "reader_policy_is_read_only" {
  command = apply

  assert {
    condition = toset(flatten([
      for s in jsondecode(output.reader_policy_json).Statement : s.Action
    ])) == toset(["s3:ListBucket", "s3:GetBucketLocation", "s3:GetObject"])
    error_message = "the reader may only list, locate and get"
  }

  assert {
    condition = one([
      for s in jsondecode(output.reader_policy_json).Statement : s.Resource if s.Sid == "ReadCheckpoints"
    ]) == ["arn:aws:s3:::ckpt-test-bucket/runs/exp1/*"]
    error_message = "the reader's GetObject is limited to PREFIX/*"
  }
}

run "tls_statement_can_be_switched_off_for_local_servers" {
  command = apply

  variables {
    enforce_tls = false
  }

  assert {
    condition     = length(aws_s3_bucket_policy.this) == 0 && output.bucket_policy_json == null
    error_message = "with enforce_tls = false there is no deny-non-TLS statement (and so no bucket policy)"
  }

  assert {
    condition     = aws_s3_bucket_public_access_block.this[0].block_public_policy
    error_message = "public access stays blocked without the TLS statement"
  }
}

run "kms_key_and_transition" {
  command = apply

  variables {
    kms_key_arn              = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000"
    transition_days          = 30
    transition_storage_class = "GLACIER_IR"
    versioning               = false
    create_iam_policies      = false
  }

  assert {
    condition     = one(one(aws_s3_bucket_server_side_encryption_configuration.this.rule).apply_server_side_encryption_by_default).sse_algorithm == "aws:kms" && one(one(aws_s3_bucket_server_side_encryption_configuration.this.rule).apply_server_side_encryption_by_default).kms_master_key_id == var.kms_key_arn
    error_message = "SSE-KMS with the given key"
  }

  assert {
    condition     = one(aws_s3_bucket_server_side_encryption_configuration.this.rule).bucket_key_enabled
    error_message = "an S3 bucket key with KMS"
  }

  assert {
    condition = length([
      for r in aws_s3_bucket_lifecycle_configuration.this.rule : r
      if try(one(r.transition).days, 0) == 30 && try(one(r.transition).storage_class, "") == "GLACIER_IR"
      && try(r.filter[0].prefix, "") == "runs/exp1/"
    ]) == 1
    error_message = "old checkpoints under the prefix move to the cheaper class"
  }

  assert {
    condition     = aws_s3_bucket_versioning.this.versioning_configuration[0].status == "Suspended"
    error_message = "versioning off means Suspended"
  }

  assert {
    condition = length([
      for s in jsondecode(output.writer_policy_json).Statement : s
      if s.Resource == [var.kms_key_arn] && contains(s.Action, "kms:GenerateDataKey")
    ]) == 1
    error_message = "the writer may use the KMS key"
  }

  assert {
    condition     = length(aws_iam_policy.writer) == 0 && output.writer_policy_arn == null
    error_message = "create_iam_policies = false creates no policies"
  }
}

run "cloudckpt_config_for_aws" {
  command = apply

  assert {
    condition     = output.cloudckpt_config == "[storage]\nbackend = \"s3\"\nroot = \"s3://ckpt-test-bucket/runs/exp1\"\n\n[writer]\nfile_size = \"256MiB\"\nconcurrency = 8\n"
    error_message = "the AWS config names only backend, root and the writer settings: ${output.cloudckpt_config}"
  }
}

run "cloudckpt_config_for_a_local_server" {
  command = apply

  variables {
    endpoint_url       = "http://127.0.0.1:5000"
    path_style         = true
    region             = "us-east-1"
    writer_file_size   = "64MiB"
    writer_concurrency = 4
  }

  assert {
    condition     = output.cloudckpt_config == "[storage]\nbackend = \"s3\"\nroot = \"s3://ckpt-test-bucket/runs/exp1\"\n\n[storage.options]\nclient_kwargs = { region_name = \"us-east-1\" }\nconfig_kwargs = { s3 = { addressing_style = \"path\" } }\nendpoint_url = \"http://127.0.0.1:5000\"\n\n[writer]\nfile_size = \"64MiB\"\nconcurrency = 4\n"
    error_message = "endpoint, path style and region go into [storage.options]: ${output.cloudckpt_config}"
  }
}

run "rejects_a_prefix_with_slashes_at_the_ends" {
  command = plan

  variables {
    prefix = "/runs/"
  }

  expect_failures = [var.prefix]
}

run "s3_compat_switch_drops_only_the_unsupported_controls" {
  command = apply

  variables {
    s3_compat_skip_bucket_controls = true
  }

  assert {
    condition     = length(aws_s3_bucket_public_access_block.this) == 0 && length(aws_s3_bucket_ownership_controls.this) == 0
    error_message = "the switch leaves out the public access block and the ownership controls"
  }

  assert {
    condition     = length(aws_s3_bucket_policy.this) == 1 && length(aws_s3_bucket_server_side_encryption_configuration.this.rule) == 1
    error_message = "the TLS-only policy and encryption stay"
  }
}
