"""infra/dvc/remote.sh: an S3 DVC remote (moto's server) with credentials only in .dvc/config.local;
`dvc push`, then `dvc pull` in a fresh clone restores the data."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.infra.conftest import INFRA, KEYS, S3, _base_env

pytestmark = pytest.mark.slow


def sh(args: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def clean_env(home: Path) -> dict[str, str]:
    """No AWS credentials from anywhere but what a test hands over (no ~/.aws, no instance metadata)."""
    env = {k: v for k, v in _base_env().items() if not k.startswith("AWS_")}
    return {**env, "HOME": str(home), "AWS_SHARED_CREDENTIALS_FILE": str(home / "none"),
            "AWS_CONFIG_FILE": str(home / "none"), "AWS_EC2_METADATA_DISABLED": "true",
            "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def test_push_to_s3_then_pull_into_a_fresh_clone(s3: S3, tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    repo, clone = tmp_path / "repo", tmp_path / "clone"
    repo.mkdir()
    sh(["git", "init", "-q"], repo, env)
    sh(["dvc", "init", "-q"], repo, env)
    data = repo / "data"
    (data / "nested").mkdir(parents=True)
    files = {"a.bin": os.urandom(4096), "nested/b.txt": secrets.token_hex(64).encode()}
    for name, content in files.items():
        (data / name).write_bytes(content)
    sh(["dvc", "add", "data"], repo, env)

    prefix = f"dvc-{secrets.token_hex(4)}"
    setup = {**env, **KEYS, "DVC_REMOTE_URL": f"s3://{s3.bucket}/{prefix}", "DVC_S3_ENDPOINT_URL": s3.endpoint}
    sh(["bash", str(INFRA / "dvc" / "remote.sh")], repo, setup)
    config, local = (repo / ".dvc" / "config").read_text(), (repo / ".dvc" / "config.local").read_text()
    assert f"s3://{s3.bucket}/{prefix}" in config and s3.endpoint in config
    assert KEYS["AWS_SECRET_ACCESS_KEY"] not in config and KEYS["AWS_ACCESS_KEY_ID"] not in config
    assert KEYS["AWS_SECRET_ACCESS_KEY"] in local
    sh(["git", "check-ignore", "-q", ".dvc/config.local"], repo, env)  # DVC's own .gitignore keeps it out
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-q", "-m", "data + remote"], repo, env)
    assert ".dvc/config.local" not in sh(["git", "ls-files"], repo, env).stdout

    sh(["dvc", "push"], repo, env)  # credentials from .dvc/config.local only
    assert len(s3.keys(f"{prefix}/")) >= len(files)

    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "data").exists() and not (clone / ".dvc" / "config.local").exists()
    refused = sh(["dvc", "pull"], clone, env, check=False)  # the clone has no credentials yet
    assert refused.returncode != 0 and not (clone / "data" / "a.bin").exists()
    assert "credentials" in (refused.stdout + refused.stderr).lower(), refused.stderr
    sh(["bash", str(INFRA / "dvc" / "remote.sh")], clone, setup)
    sh(["dvc", "pull"], clone, env)
    for name, content in files.items():
        assert (clone / "data" / name).read_bytes() == content
