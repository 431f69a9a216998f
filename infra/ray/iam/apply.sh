#!/usr/bin/env bash
# Create the Ray cluster's IAM roles and instance profiles and seal its storage bucket, from the JSON files
# beside this script (replace 123456789012, the region and the bucket names in them first). Run once, as an
# administrator; rerunning updates the policies.
#   capline-ray-head    head-policy.json: the worker's rights plus launching and stopping this cluster's workers
#   capline-ray-worker  worker-policy.json: S3 (Ray storage read/write, DVC cache read), ECR pull, its 3 secrets
#   capline-ray-pods    pods-policy.json on KubeRay (IRSA): make that role yourself, its trust names your EKS
#                       OIDC provider and the capline-ray service account; this script only attaches the policy
#   bucket-policy.json  on capline-ray: only these three roles may write under storage/, TLS only
set -euo pipefail
cd "$(dirname "$0")"

for role in capline-ray-head capline-ray-worker; do
  policy=${role#capline-ray-}-policy.json
  if ! aws iam get-role --role-name "$role" >/dev/null 2>&1; then
    aws iam create-role --role-name "$role" --assume-role-policy-document file://ec2-trust.json >/dev/null
  fi
  aws iam put-role-policy --role-name "$role" --policy-name capline --policy-document "file://$policy"
  if ! aws iam get-instance-profile --instance-profile-name "$role" >/dev/null 2>&1; then
    aws iam create-instance-profile --instance-profile-name "$role" >/dev/null
    aws iam add-role-to-instance-profile --instance-profile-name "$role" --role-name "$role"
  fi
done
if aws iam get-role --role-name capline-ray-pods >/dev/null 2>&1; then
  aws iam put-role-policy --role-name capline-ray-pods --policy-name capline --policy-document file://pods-policy.json
fi
aws s3api put-bucket-policy --bucket capline-ray --policy file://bucket-policy.json
echo "roles capline-ray-head, capline-ray-worker (+ capline-ray-pods if present); bucket policy on capline-ray"
