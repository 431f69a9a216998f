#!/bin/sh
# One-shot MinIO setup, run by compose (service minio-setup) with MinIO's root account, which no other client
# gets: the buckets, and for each client a policy (the JSON file of the same name) and an access key.
#   mlflow    s3://mlflow/artifacts: MLflow's artifact store (read, write)
#   capline   s3://capline/ray: Ray's storage_path, sweep state included (Tune unpickles it on restore), so
#             written by the Ray cluster's key only; s3://capline/dvc: the DVC remote, written by DVC's key
# Safe to rerun: buckets and users are kept, policies and secrets updated.
set -eu

mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing local/mlflow local/capline
mc anonymous set none local/mlflow
mc anonymous set none local/capline

# grant ACCESS_KEY SECRET_KEY POLICY: the user with exactly that one policy
grant() {
  mc admin policy create local "$3" "/setup/$3.json"
  mc admin user add local "$1" "$2"
  # attach refuses a policy that is already attached (a rerun): check what the user has instead
  mc admin policy attach local "$3" --user "$1" >/dev/null 2>&1 || true
  mc admin user info local "$1" | grep -q "$3" || { echo "minio-setup: $3 not attached to $1" >&2; exit 1; }
}
grant "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY" capline-mlflow
grant "$RAY_S3_ACCESS_KEY" "$RAY_S3_SECRET_KEY" capline-ray
grant "$DVC_S3_ACCESS_KEY" "$DVC_S3_SECRET_KEY" capline-dvc
echo "minio-setup: buckets mlflow, capline; users with capline-mlflow, capline-ray, capline-dvc"
