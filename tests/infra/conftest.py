"""Loopback infrastructure for tests/infra: an S3 server (moto), a two-node Ray cluster, an MLflow server.

Every server listens on loopback addresses and free ports and is started here, in its own session, with a
marker in its environment. At the end of the module that used it, everything that inherited the marker
(Ray's raylets, workers, agents, job drivers) is killed, and the fixture fails if any of it is still alive:
no process outlives the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import ROOT

BIN = Path(sys.executable).parent  # ray, mlflow, dvc, moto_server of the environment running the tests
MARKER = "CAPLINE_INFRA_TEST"  # environment variable naming the fixture that started a process
BUCKET = "capline"
REGION = "us-east-1"
KEYS = {"AWS_ACCESS_KEY_ID": "capline-test-key", "AWS_SECRET_ACCESS_KEY": "capline-test-secret"}
INFRA = ROOT / "infra"
# Ray turns 127.0.0.1 into the host's routable address; other loopback addresses it keeps, so the two
# nodes get one each (as on two hosts) and all of Ray's traffic stays on the loopback interface.
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries MARKER=tag."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_marked(tag: str, grace: float = 3.0) -> None:
    """SIGTERM every process marked `tag`, SIGKILL what is left after `grace` s; fail if any survives."""
    procs = marked(tag)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive + marked(tag):  # and anything started meanwhile
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)
    left = marked(tag)
    assert not left, f"processes of {tag} still alive: {[(p.pid, p.name()) for p in left]}"


@dataclass
class Service:
    """A process tree started under a marker, its log file, and how to stop all of it."""

    tag: str
    log: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(args, env={**env, MARKER: self.tag}, cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        kill_marked(self.tag)
        for proc in self.procs:
            proc.wait(timeout=10)


def wait_until(check, what: str, service: Service, timeout: float = 60.0, every: float = 0.25):
    """Poll `check` until it returns something truthy; fail naming `what` with the service's log."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        service.check_alive()
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s:\n{service.tail()}")


def http_ok(url: str, headers: dict[str, str] | None = None) -> int | None:
    """The HTTP status of a GET (errors included), or None when nothing answers yet."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def get_json(url: str, headers: dict[str, str] | None = None) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
        return json.loads(r.read().decode("utf-8"))


def _base_env() -> dict[str, str]:
    """The test's environment without anything that would point a child at another Ray or MLflow."""
    drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI",
            "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_PROFILE", "AWS_ENDPOINT_URL",
            "MLFLOW_S3_ENDPOINT_URL")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


# ---- S3 ---------------------------------------------------------------------------------------------------


@dataclass
class S3:
    endpoint: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        """What a client (pyarrow, boto3, MLflow, Ray's storage) needs to reach this server."""
        return {**KEYS, "AWS_ENDPOINT_URL": self.endpoint, "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str) -> list[str]:
        """Every object key under prefix."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """moto's S3 server on 127.0.0.1 with one bucket (prefixes: dvc/, ray/, mlartifacts/)."""
    port = free_port()
    service = Service(f"s3-{secrets.token_hex(4)}", tmp_path_factory.mktemp("s3") / "moto.log")
    service.start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], _base_env())
    try:
        server = S3(f"http://127.0.0.1:{port}", BUCKET)
        wait_until(lambda: http_ok(f"{server.endpoint}/moto-api/") is not None, "moto_server", service)
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        service.stop()


# ---- MLflow -----------------------------------------------------------------------------------------------


@dataclass
class MlflowServer:
    uri: str
    username: str
    password: str
    service: Service

    @property
    def env(self) -> dict[str, str]:
        """A client's login (MLflow reads it from the environment)."""
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}

    def wait(self) -> MlflowServer:
        wait_until(lambda: http_ok(f"{self.uri}/health") == 200, "mlflow server", self.service, timeout=120)
        return self


def compose_service(name: str) -> dict:
    """One service of infra/mlflow/compose.yaml."""
    return yaml.safe_load((INFRA / "mlflow" / "compose.yaml").read_text(encoding="utf-8"))["services"][name]


@pytest.fixture(scope="module")
def mlflow_started(s3: S3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """The compose file's MLflow server command and settings, with SQLite for PostgreSQL and moto for MinIO.

    Authentication stays on: the admin password is generated here and handed over in the environment,
    as compose does; artifacts are proxied by the server into s3://<bucket>/mlartifacts. Started, not yet
    ready: the Ray cluster starts meanwhile (use `mlflow_server`).
    """
    root = tmp_path_factory.mktemp("mlflow")
    spec = compose_service("mlflow")
    ini = (INFRA / "mlflow" / "basic_auth.ini").read_text(encoding="utf-8")
    (root / "basic_auth.ini").write_text("\n".join(
        f"database_uri = sqlite:///{root / 'auth.db'}" if line.startswith("database_uri") else line
        for line in ini.splitlines()))
    port = free_port()
    password = secrets.token_urlsafe(16)
    compose_env = {k: str(v) for k, v in spec["environment"].items() if "${" not in str(v)}
    env = {**_base_env(), **compose_env, **s3.env,  # loopback values replace compose's host names below
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1",
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{root / 'mlflow.db'}",
           "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{s3.bucket}/mlartifacts",
           "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
           "MLFLOW_SERVER_ALLOWED_HOSTS": f"127.0.0.1:{port},localhost:{port}"}
    service = Service(f"mlflow-{secrets.token_hex(4)}", root / "server.log")
    service.start(spec["command"], env, cwd=root)
    try:
        yield MlflowServer(f"http://127.0.0.1:{port}", "admin", password, service)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def mlflow_server(mlflow_started: MlflowServer) -> MlflowServer:
    """The MLflow server, answering."""
    return mlflow_started.wait()


# ---- Ray ----------------------------------------------------------------------------------------------------


@dataclass
class RayCluster:
    dashboard: str  # http://127.0.0.1:<port>: the job API
    gcs: str  # <head ip>:<port>
    token: str  # Ray's token authentication (on by default since Ray 2.5x): nodes and clients share it
    head: Service
    worker: Service
    nodes: dict[str, str]  # node id -> "head" | "worker"

    @property
    def client_env(self) -> dict[str, str]:
        """What `ray job submit` needs beside the address."""
        return {**_base_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def get(self, path: str) -> dict:
        """A GET of the dashboard's HTTP API, authenticated."""
        return get_json(f"{self.dashboard}{path}", {"Authorization": f"Bearer {self.token}"})

    def node_id(self, role: str) -> str:
        return next(k for k, v in self.nodes.items() if v == role)


def _worker_port_range(size: int = 64) -> int:
    """The first of `size` consecutive free ports below the kernel's ephemeral range (where free_port picks)."""
    rng = random.Random()
    for _ in range(100):
        low = rng.randrange(20000, 30000 - size)
        try:
            for port in range(low, low + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return low
    raise RuntimeError("no free range of worker ports between 20000 and 30000")


def _node_ports() -> list[str]:
    """Every port a Ray node opens, chosen free: two nodes on one host (and other tests' Rays) must not collide."""
    low = _worker_port_range()
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
            "--min-worker-port", str(low), "--max-worker-port", str(low + 63)]


def _alive_nodes(dashboard: str, token: str) -> list[dict]:
    try:
        nodes = get_json(f"{dashboard}/api/v0/nodes", {"Authorization": f"Bearer {token}"})["data"]["result"]["result"]
    except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, ValueError):
        return []
    return [n for n in nodes if n.get("state") == "ALIVE"]


@pytest.fixture(scope="module")
def ray_cluster(s3: S3, mlflow_started: MlflowServer) -> Iterator[RayCluster]:
    """`ray start --head` plus a second `ray start --address`, 1 CPU each, with their own resources.

    The nodes' environment holds what a cloud node gets from its instance profile and secrets: S3 access
    (here moto's endpoint and keys) and the MLflow credentials. Temp dirs are short (Unix socket paths).
    """
    temp = Path(tempfile.mkdtemp(prefix="cl-ray-", dir="/tmp"))
    token = secrets.token_hex(32)
    env = {**_base_env(), **s3.env, **mlflow_started.env, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           # a lost node is declared dead within a few seconds instead of ~30
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
           "RAY_health_check_timeout_ms": "1000"}
    gcs_port, dash_port = free_port(), free_port()
    head = Service(f"ray-head-{secrets.token_hex(4)}", temp / "head.log")
    worker = Service(f"ray-worker-{secrets.token_hex(4)}", temp / "worker.log")
    common = ["--num-cpus", "1", "--num-gpus", "0",
              "--object-store-memory", str(100 * 1024**2), "--disable-usage-stats", "--block"]
    try:
        head.start([str(BIN / "ray"), "start", "--head", "--node-ip-address", HEAD_IP, "--port", str(gcs_port),
                    "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(dash_port), "--ray-client-server-port", str(free_port()),
                    "--include-dashboard", "true", "--temp-dir", str(temp / "head"),
                    "--resources", json.dumps({"head_node": 1}), *common, *_node_ports()], env)
        dashboard = f"http://127.0.0.1:{dash_port}"
        # one node at a time: `ray start` gives its raylet 30 s to register, tight on a busy 2-core machine
        wait_until(lambda: len(_alive_nodes(dashboard, token)) == 1, "ray head", head, timeout=120)
        worker.start([str(BIN / "ray"), "start", "--address", f"{HEAD_IP}:{gcs_port}", "--node-ip-address",
                      WORKER_IP, "--temp-dir", str(temp / "worker"), "--resources", json.dumps({"worker_node": 1}),
                      *common, *_node_ports()], env)
        nodes = wait_until(lambda: len(alive := _alive_nodes(dashboard, token)) == 2 and alive, "ray worker", worker,
                           timeout=120)
        mlflow_started.wait()  # it started before the head and came up meanwhile
        roles = {n["node_id"]: "worker" if "worker_node" in n["resources_total"] else "head" for n in nodes}
        yield RayCluster(dashboard, f"{HEAD_IP}:{gcs_port}", token, head, worker, roles)
    finally:
        worker.stop()
        head.stop()
        shutil.rmtree(temp, ignore_errors=True)
