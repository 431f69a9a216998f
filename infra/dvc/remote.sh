#!/usr/bin/env bash
# Configure the team's DVC remote on S3 (or an S3-compatible store such as MinIO), in the current DVC repo.
# What may be shared goes to .dvc/config (commit it): the remote's URL and endpoint. Credentials, when
# given, go to .dvc/config.local, which DVC git-ignores: they never enter the repository.
#   DVC_REMOTE_URL=s3://capline-dvc/cache infra/dvc/remote.sh                 # AWS: instance profile / ~/.aws
#   DVC_REMOTE_URL=s3://dvc/cache DVC_S3_ENDPOINT_URL=http://minio.internal:9000 \
#     AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... infra/dvc/remote.sh          # MinIO with static keys
# Then `dvc push` uploads the cache and `dvc pull` restores the data in any clone.
set -euo pipefail

name=${DVC_REMOTE_NAME:-team}
url=${DVC_REMOTE_URL:?set DVC_REMOTE_URL, e.g. s3://bucket/dvc}
case $url in
  s3://*) ;;
  *) echo "remote.sh: DVC_REMOTE_URL must be an s3:// URL, got '$url'" >&2; exit 2 ;;
esac

dvc remote add --default --force "$name" "$url"
if [[ -n ${DVC_S3_ENDPOINT_URL:-} ]]; then
  dvc remote modify "$name" endpointurl "$DVC_S3_ENDPOINT_URL"
fi
if [[ -n ${AWS_ACCESS_KEY_ID:-} || -n ${AWS_SECRET_ACCESS_KEY:-} ]]; then
  : "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID together with AWS_SECRET_ACCESS_KEY}"
  : "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY together with AWS_ACCESS_KEY_ID}"
  dvc remote modify --local "$name" access_key_id "$AWS_ACCESS_KEY_ID"
  dvc remote modify --local "$name" secret_access_key "$AWS_SECRET_ACCESS_KEY"
fi
echo "DVC remote '$name' -> $url (default); credentials: $([[ -n ${AWS_ACCESS_KEY_ID:-} ]] && echo .dvc/config.local || echo 'the AWS default chain')"
