"""Secrets stay secret: a password written into tracking.uri (`http://user:<password>@host`) authenticates, and
appears nowhere in what capline prints, logs to MLflow (params, tags, artifacts) or writes."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from typer.testing import CliRunner

from pipeline import tracking
from pipeline.cli import app
from pipeline.redact import redact, split_login
from pipeline.tracking import store
from tests.conftest import ROOT, params_under
from tests.reliability.test_tracking_down import running_mlflow_server

FAKE_PASSWORD = "fake-Hunter2-x7Qp"  # (the repository's secret scan, test_security, knows "fake" values)
URI = f"http://alice:{FAKE_PASSWORD}@127.0.0.1:5000"


@pytest.fixture
def login_vars(monkeypatch):
    """MLflow's login variables unset for the test; whatever store.use set is put back after it."""
    for name in store.LOGIN_VARS:
        monkeypatch.delenv(name, raising=False)
    yield
    store.without_login("sqlite:///unused.db")  # a URI without a login restores what was there before


@pytest.mark.parametrize("text, shown", [
    (URI, "http://127.0.0.1:5000"),
    (f"API request to {URI}/api/2.0/mlflow/runs/get failed", "API request to http://127.0.0.1:5000/api/2.0/"
                                                             "mlflow/runs/get failed"),
    (f"{URI} and s3://key:{FAKE_PASSWORD}@bucket/ray", "http://127.0.0.1:5000 and s3://bucket/ray"),
    ("https://u:fake%40pw@host:443/x?y=1", "https://host:443/x?y=1"),  # percent-encoded "@" in the password
    ("https://u:fake@pw@host/x", "https://host/x"),  # unencoded "@": everything up to the last one goes
    ("sqlite:///mlflow.db, s3://bucket/a@b, git@github.com:x", "sqlite:///mlflow.db, s3://bucket/a@b, "
                                                               "git@github.com:x"),  # nothing to hide
])
def test_redact_drops_the_login_of_every_uri_in_a_text(text, shown):
    assert redact(text) == shown


def test_split_login_decodes_what_the_http_client_would_send():
    assert split_login("http://al%20ice:fake%40pw@h:5000/p") == ("http://h:5000/p", ("al ice", "fake@pw"))
    assert split_login("http://h:5000") == ("http://h:5000", None)
    assert split_login("sqlite:///a.db") == ("sqlite:///a.db", None)


def test_mlflow_gets_the_bare_uri_and_the_login_on_the_side(login_vars, monkeypatch):
    """The URI's login replaces the environment's, and a later URI without one gets the environment's back."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "from-env")
    assert store.without_login(URI) == "http://127.0.0.1:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", FAKE_PASSWORD)
    assert store.without_login("http://127.0.0.1:5001") == "http://127.0.0.1:5001"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "from-env" and "MLFLOW_TRACKING_PASSWORD" not in os.environ


def test_a_trials_logged_params_and_tags_hold_no_tracking_secret(prepared_params, tmp_path):
    """What a sweep trial logs (open_child: its params, built by TrialContext.params) and an error tag."""
    from pipeline.tuning.trial import TrialContext

    base = params_under(prepared_params, tmp_path, **{"tracking.uri": URI}).to_dict()
    ctx = TrialContext("lstm_lm", base, str(tmp_path), "sweep-x", str(tmp_path / "train"), URI, "e", "parent", {},
                       1, False, 1.0, 0.0, 1, 0.25)
    trial = ctx.params({"train.lstm_lm.lr": 0.003})
    assert trial.tracking.uri == URI  # the trial itself still reaches the server with its login
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.create_run(db, "secrets")
    logged = tracking.log_params_flat(run_id, trial.to_dict())
    tracking.set_tags(run_id, {"error": f"API request to {URI}/api failed", "path": f"s3://k:{FAKE_PASSWORD}@b"})
    tracking.end_run("FINISHED", run_id)
    recorded = mlflow.get_run(run_id).data
    assert recorded.params == logged and logged["train.lstm_lm.lr"] == "0.003"
    assert not [k for k in recorded.params if k.startswith("tracking.")]
    assert recorded.tags["error"] == "API request to http://127.0.0.1:5000/api failed"
    assert recorded.tags["path"] == "s3://b"
    assert FAKE_PASSWORD not in repr(recorded.params) + repr(recorded.tags)


def test_params_show_keeps_the_password_out_of_sight():
    shown = CliRunner().invoke(app, ["params", "show", "--params", str(ROOT / "params.yaml"),
                                     "--set", f"tracking.uri={URI}"])
    assert shown.exit_code == 0, shown.output
    assert yaml.safe_load(shown.stdout)["tracking"]["uri"] == "http://127.0.0.1:5000"
    assert FAKE_PASSWORD not in shown.output


# ---- end to end: `capline train` against a real authenticated server ---------------------------------------


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` on 127.0.0.1 with infra/mlflow/basic_auth.ini (SQLite databases)."""
    root = tmp_path_factory.mktemp("auth-server")
    ini = (ROOT / "infra" / "mlflow" / "basic_auth.ini").read_text(encoding="utf-8")
    (root / "basic_auth.ini").write_text("\n".join(
        f"database_uri = sqlite:///{root / 'auth.db'}" if line.startswith("database_uri") else line
        for line in ini.splitlines()))
    password = secrets.token_urlsafe(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(root / "basic_auth.ini"), MLFLOW_AUTH_ADMIN_PASSWORD=password,
               MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16), MLFLOW_DISABLE_TELEMETRY="true")
    args = ["--app-name", "basic-auth", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts")]
    with running_mlflow_server(args, root, env) as (_, uri):
        yield {"root": root, "port": int(uri.rsplit(":", 1)[1]), "password": password}


def _store_text(db: Path) -> str:
    """Every value of every table of a SQLite database, as text."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        return "\n".join(con.iterdump())


def _files_holding(folder: Path, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.slow
def test_capline_train_with_a_password_in_tracking_uri_never_shows_or_stores_it(prepared_params, tmp_path,
                                                                                auth_server, login_vars):
    test_password, port = auth_server["password"], auth_server["port"]
    p = params_under(prepared_params, tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(p.to_dict(), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}  # the URI's login only
    cli = [sys.executable, "-m", "pipeline"]
    uri = f"tracking.uri=http://admin:{test_password}@127.0.0.1:{port}"
    done = subprocess.run([*cli, "train", "lstm_lm", "--params", str(params_file), "--set", uri],
                          capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"View run train-lstm_lm at: http://127.0.0.1:{port}/#/" in done.stdout  # MLflow's link, bare
    none = CliRunner().invoke(app, ["runs", "--params", str(params_file), "--set", uri])  # in this process
    assert none.exit_code == 1 and f"no sweep in http://127.0.0.1:{port} (experiment" in none.output

    printed = done.stdout + done.stderr + none.output
    assert test_password not in printed
    stored = _store_text(auth_server["root"] / "mlflow.db")
    assert "train-lstm_lm" in stored and "'FINISHED'" in stored  # the login worked: the run was recorded
    assert test_password not in stored
    assert not _files_holding(auth_server["root"] / "artifacts", test_password)  # checkpoint, registered model
    for local in (p.paths.models, p.paths.metrics):  # the checkpoints and metrics written here
        assert not _files_holding(Path(local), test_password)


def _call(server: dict, login: tuple[str, str], method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """(HTTP status, JSON answer) of one REST call to the server as `login`."""
    token = base64.b64encode(":".join(login).encode()).decode()
    request = urllib.request.Request(f"http://127.0.0.1:{server['port']}/api/{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, {}


@pytest.mark.slow
def test_a_user_of_the_team_server_sees_no_experiment_until_granted(auth_server):
    """infra/mlflow/basic_auth.ini: default_permission NO_PERMISSIONS (the README's grant calls, run for real)."""
    admin, ada = ("admin", auth_server["password"]), ("ada", secrets.token_urlsafe(12))
    user = {"username": ada[0], "password": ada[1]}
    assert _call(auth_server, admin, "POST", "2.0/mlflow/users/create", user)[0] == 200
    status, made = _call(auth_server, admin, "POST", "2.0/mlflow/experiments/create", {"name": "admins-own"})
    assert status == 200
    read = f"2.0/mlflow/experiments/get?experiment_id={made['experiment_id']}"
    assert _call(auth_server, ada, "GET", read)[0] == 403
    assert _call(auth_server, ada, "POST", "2.0/mlflow/runs/create", {"experiment_id": made["experiment_id"]})[0] == 403
    grant = {"username": ada[0], "resource_type": "experiment", "resource_id": made["experiment_id"],
             "permission": "READ"}
    assert _call(auth_server, admin, "POST", "3.0/mlflow/users/permissions/grant", grant)[0] == 200
    assert _call(auth_server, ada, "GET", read)[0] == 200
