"""`capline serve`: the registered captioner behind MLflow's scoring server, captioning an image over REST
with the decoding settings evaluation uses."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.inference import caption_bytes
from pipeline.params import Params
from pipeline.training.checkpoints import load_module
from stages import train as train_stage
from tests.conftest import ROOT, params_under

STARTUP_SECONDS = 240  # model download from the registry, torch + Lightning imports in the worker (2 shared cores)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"capline serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"no answer on {url}/ping after {STARTUP_SECONDS} s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    """End the server's whole process group (mlflow, its shell and uvicorn workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:  # workers can outlive the parent by a moment; nothing of the group may stay behind
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=20)


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url + "/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.loads(resp.read())


def register_captioner(p: Params) -> dict:
    """Train the tiny captioner with the sweep's (empty) best config and register it as champion."""
    best = Path(p.paths.sweeps) / "captioner" / "best.json"
    best.parent.mkdir(parents=True)
    best.write_text(json.dumps({"overrides": {}}))
    return train_stage.run(p, "captioner", best=True, register=True)


def start_server(p: Params, root: Path, *overrides: str) -> tuple[subprocess.Popen, str, Path]:
    """`capline serve captioner` on a free port of 127.0.0.1 (its own process group); (process, url, log)."""
    port = free_port()
    log = root / "serve.log"
    cmd = [sys.executable, "-m", "pipeline", "serve", "captioner", "--port", str(port), "--host", "127.0.0.1",
           "--params", str(ROOT / "params.yaml"), "--set", f"tracking.uri={p.tracking.uri}",
           *(arg for o in overrides for arg in ("--set", o))]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    return proc, f"http://127.0.0.1:{port}", log


def test_served_champion_captions_an_image_like_evaluation_does(prepared_params, tmp_path):
    p = params_under(prepared_params, tmp_path, **{"evaluate.beam_size": 4, "evaluate.alpha": 0.2,
                                                    "evaluate.no_repeat_ngram": 1})
    trained = register_captioner(p)
    images = sorted((Path(p.data.coco.images)).glob("*.jpg"))[:2]
    raw = [path.read_bytes() for path in images]
    module = load_module("captioner", trained["best_checkpoint"])
    e = p.evaluate
    expected = caption_bytes(module, raw, e.beam_size, e.alpha, no_repeat_ngram=1)  # evaluation's decoding
    assert expected != caption_bytes(module, raw, e.beam_size, e.alpha)  # the tiny model repeats words unblocked

    proc, url, log = start_server(p, tmp_path)
    try:
        wait_until_up(proc, url, log)
        body = post(url, {"dataframe_records": [{"image": base64.b64encode(b).decode("ascii")} for b in raw]})
        assert body == {"predictions": expected}
        assert all(isinstance(c, str) and c for c in expected)
    finally:
        stop(proc)
