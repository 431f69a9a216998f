"""Tracking down: an unreachable MLflow server stops training and sweeps before they start, naming
tracking.uri; a store lost mid-run stops the run but never the checkpoints already written."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import pytorch_lightning as pl
from mlflow.exceptions import MlflowException

from pipeline.training.checkpoints import checkpoint_path, checkpoint_step
from pipeline.training.fit import train
from stages import train as train_stage
from stages.train import tracked_logger
from tests.conftest import http_server, params_under

FAMILY = "lstm_lm"


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Unavailable(BaseHTTPRequestHandler):
    """What a reverse proxy answers while the MLflow server behind it is down."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(503)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def proxy_503():
    with http_server(Unavailable) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}"


def test_an_unreachable_server_stops_training_before_it_starts(prepared_params, tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    p = params_under(prepared_params, tmp_path, **{"tracking.uri": uri})
    with pytest.raises(ConnectionError, match=f"tracking.uri {uri}: MLflow server unreachable .*sqlite:///mlflow.db"):
        train_stage.run(p, FAMILY)  # `capline train`: its MLflow run is made before any step
    assert not checkpoint_path(p, FAMILY, "last").parent.exists()  # not one step trained


@pytest.mark.parametrize("lookup", ["get_run", "metric_history", "list_artifacts", "run_exists"])
def test_read_only_lookups_of_an_unreachable_server_fail_fast_naming_it(lookup):
    from pipeline import tracking

    uri = f"http://127.0.0.1:{closed_port()}"
    args = {"get_run": ("abc",), "metric_history": ("abc", "val/loss"), "list_artifacts": ("abc",),
            "run_exists": ("abc",)}[lookup]
    with pytest.raises(ConnectionError, match=f"tracking.uri {uri}: MLflow server unreachable"):
        getattr(tracking, lookup)(uri, *args)  # not MLflow's minutes of retries


def test_the_message_never_shows_a_password_written_into_tracking_uri():
    from pipeline import tracking

    port = closed_port()
    with pytest.raises(ConnectionError) as info:
        tracking.check_server(f"http://alice:{'hunter2' * 2}@127.0.0.1:{port}")
    assert f"tracking.uri http://127.0.0.1:{port}: MLflow server unreachable" in str(info.value)
    assert "hunter2" not in str(info.value) and "alice" not in str(info.value)


def test_a_server_answering_503_stops_the_train_stage_before_it_starts(prepared_params, tmp_path, proxy_503):
    from stages import train as train_stage

    p = params_under(prepared_params, tmp_path, **{"tracking.uri": proxy_503})
    with pytest.raises(ConnectionError, match=f"tracking.uri {proxy_503}: MLflow server answers HTTP 503"):
        train_stage.run(p, FAMILY)
    assert not checkpoint_path(p, FAMILY, "last").parent.exists()
    assert not (Path(p.paths.metrics) / f"train_{FAMILY}.json").exists()


def test_an_unreachable_server_stops_a_sweep_before_ray_starts(prepared_params, tmp_path):
    from pipeline.tuning import run_sweep

    uri = f"http://127.0.0.1:{closed_port()}"
    p = params_under(prepared_params, tmp_path, **{"tracking.uri": uri, "paths.ray_storage": str(tmp_path / "ray")})
    with pytest.raises(ConnectionError, match=f"tracking.uri {uri}: MLflow server unreachable"):
        run_sweep(p, FAMILY)
    assert not (tmp_path / "ray").exists()


@contextlib.contextmanager
def running_mlflow_server(args: list[str], cwd: Path, env: dict[str, str]) -> Iterator[tuple[subprocess.Popen, str]]:
    """`mlflow server ARGS` on a free port of 127.0.0.1 in its own process group, once it answers /health;
    (process, URI); killed at the end. Its output goes to cwd/server.log."""
    port = closed_port()
    log = open(cwd / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # liveness only: a loaded 2-core machine takes a while to import MLflow
        while not _healthy(uri):
            assert proc.poll() is None and time.time() < deadline, (cwd / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield proc, uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` (SQLite backend) on 127.0.0.1, in its own process group, killed at the end."""
    with running_mlflow_server(["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"], tmp_path,
                               {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}) as server:
        yield server


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


class KillServer(pl.Callback):
    """At the start of the second epoch (epoch 0 checkpointed), SIGKILL the tracking server."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.mark.slow
def test_a_server_lost_mid_run_stops_the_run_and_keeps_the_checkpoint(prepared_params, tmp_path, mlflow_server,
                                                                      monkeypatch):
    proc, uri = mlflow_server
    # MLflow's client would retry each request for ~4 minutes before giving up; the outcome is the same
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    p = params_under(prepared_params, tmp_path, **{"tracking.uri": uri, f"train.{FAMILY}.max_epochs": 2})
    # a new connection is refused; a kept-alive one the kill cut is reset: both say the server is gone
    with pytest.raises(MlflowException, match=f"API request to {uri}/.*(Connection refused|Connection reset by peer)"):
        train(p, FAMILY, logger=tracked_logger(p, FAMILY), callbacks=[KillServer(proc)])
    last = checkpoint_path(p, FAMILY, "last")
    per_epoch = checkpoint_step(last)  # epoch 0's checkpoint is whole
    assert per_epoch > 0

    resumed = train(p, FAMILY, resume=True, logger=False)  # go on without tracking, from where the run stopped
    assert resumed.steps == 2 * per_epoch
    assert [row["step"] for row in resumed.history] == [per_epoch, 2.0 * per_epoch]
