"""The tracking store: where runs live, reaching it, and MLflow's limits on keys and values.

Runs live in a database store (default `sqlite:///mlflow.db`); file stores (./mlruns) are refused.
For a SQLite store, artifacts go to `mlartifacts/` next to the database file. MLflow records that folder as
an absolute URI, so a moved or copied project would read and write the old one: `use` refuses such a store,
naming both folders.
"""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.redact import redact, split_login

log = logging.getLogger(__name__)

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (characters)
MAX_TAG_VALUE = 8000
MAX_KEY = 250
# A tracking server must answer its /health page within this many seconds, once per process: MLflow's own
# client retries an unreachable server for about 4 minutes per request (MLFLOW_HTTP_REQUEST_MAX_RETRIES),
# which is right for a blip mid-run but not for a server that is not there when a run starts.
PROBE_TIMEOUT = 10.0
_answered: set[str] = set()  # servers that answered in this process
_placed: set[str] = set()  # SQLite stores whose artifact folders were checked in this process
ARTIFACTS = "mlartifacts"
# MLflow's login variables: a login written into tracking.uri reaches MLflow through them (see use), and
# what they held before is put back when a URI without a login is used next.
LOGIN_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
_replaced: dict[str, str | None] = {}


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for in-memory or other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def artifact_location(uri: str) -> str | None:
    """mlartifacts/ beside a SQLite file; None lets a server or other database decide."""
    db = _sqlite_file(uri)
    return (db.resolve().parent / ARTIFACTS).as_uri() if db else None


def _local_folder(location: str) -> Path | None:
    """The folder of a file: URI or plain path (None for s3:// and other remote artifact stores)."""
    parts = urlparse(location)
    if parts.scheme == "file":
        return Path(url2pathname(parts.path))
    return Path(location) if not parts.scheme or len(parts.scheme) == 1 else None


def check_moved(uri: str) -> None:
    """ValueError naming both folders when a SQLite store's experiments keep their artifacts in an
    mlartifacts/ that is not the one beside the database (the project was moved or copied)."""
    db = _sqlite_file(uri)
    if db is None or uri in _placed or not db.is_file():  # a lookup must not create the database
        return
    here = db.resolve().parent / ARTIFACTS
    for exp in MlflowClient().search_experiments(view_type=ViewType.ALL):
        there = _local_folder(exp.artifact_location)
        if there is not None and there.name == ARTIFACTS and there.resolve() != here:
            raise ValueError(f"MLflow store {db.resolve()} was moved or copied: its experiment {exp.name!r} keeps "
                             f"artifacts in {there}, not in {here} beside it (MLflow records absolute paths); run "
                             f"from where it was made, or start a new store here (move mlflow.db and {ARTIFACTS}/ "
                             f"aside)")
    _placed.add(uri)


def configure(uri: str, experiment: str) -> str:
    """Point MLflow at `uri`, create or get `experiment`; return its id."""
    scheme = urlparse(uri).scheme
    if not scheme or scheme == "file" or len(scheme) == 1:  # len 1: a Windows drive letter
        raise ValueError(f"tracking.uri {redact(uri)!r}: file stores (./mlruns) are not supported; use a "
                         f"database such as sqlite:///mlflow.db or a server http://host:5000")
    db = _sqlite_file(uri)
    if db is not None:
        db.resolve().parent.mkdir(parents=True, exist_ok=True)
    use(uri)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            return client.create_experiment(experiment, artifact_location=artifact_location(uri))
        except MlflowException:  # created meanwhile by a parallel process (a sweep)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        log.warning("MLflow experiment %r was deleted; restoring it", experiment)
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


def use(uri: str) -> None:
    """Point MLflow at `uri` for a read or write outside configure(), failing fast if a server is not there
    or a SQLite store was moved (see check_moved)."""
    check_server(uri)
    mlflow.set_tracking_uri(without_login(uri))
    check_moved(uri)


def without_login(uri: str) -> str:
    """`uri` without its user:password, which go to MLflow's login variables instead.

    MLflow prints its tracking URI in every "View run" link and API error message: given the bare URI, it
    has no password to print. The login written into the URI takes the place of any in the environment.
    """
    bare, login = split_login(uri)
    if login is not None:
        for name, value in zip(LOGIN_VARS, login, strict=True):
            _replaced.setdefault(name, os.environ.get(name))
            os.environ[name] = value
    else:  # a URI without a login must not inherit the previous URI's
        for name, value in _replaced.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _replaced.clear()
    return bare


def check_server(uri: str) -> None:
    """Fail fast, naming tracking.uri, when an http(s) tracking server does not answer GET /health."""
    parts = urlparse(uri)
    if parts.scheme not in ("http", "https") or uri in _answered:
        return
    shown = redact(uri)  # never a password in a message (nor in the probe: urllib would not send it anyway)
    hint = "start the server, fix tracking.uri, or track locally with tracking.uri: sqlite:///mlflow.db"
    try:
        with urllib.request.urlopen(f"{shown.rstrip('/')}/health", timeout=PROBE_TIMEOUT) as resp:
            status = resp.status
    except urllib.error.HTTPError as err:
        status = err.code
    except urllib.error.URLError as err:
        if not isinstance(err.reason, ssl.SSLError):  # TLS trouble: it answered; MLflow has its own TLS settings
            raise ConnectionError(f"tracking.uri {shown}: MLflow server unreachable ({err.reason}); {hint}") from None
        status = 200
    except (OSError, ValueError) as err:  # a timeout while reading, a reset connection, a malformed address
        raise ConnectionError(f"tracking.uri {shown}: MLflow server unreachable ({err}); {hint}") from None
    if status >= 500:  # e.g. a proxy in front of a server that is down
        raise ConnectionError(f"tracking.uri {shown}: MLflow server answers HTTP {status} on /health; {hint}")
    _answered.add(uri)


def mlflow_key(key: str) -> str:
    """An MLflow-safe key: allowed characters only, no empty or relative path segments."""
    key = re.sub(r"[^A-Za-z0-9_./\- ]", "_", str(key))
    parts = [p if p != ".." else "__" for p in key.split("/") if p not in ("", ".")]
    return "/".join(parts)[:MAX_KEY] or "_"


def mlflow_value(value: Any, limit: int, key: str) -> str:
    """Strings as they are, anything else as JSON, URIs without user:password; cut to MLflow's limit."""
    text = redact(value if isinstance(value, str) else json.dumps(value, default=str))
    if len(text) > limit:
        log.warning("MLflow value of %s is %d characters; truncated to %d", key, len(text), limit)
        text = text[: limit - 3] + "..."
    return text
