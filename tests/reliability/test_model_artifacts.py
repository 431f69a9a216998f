"""Nothing executes code from an artifact: a registered model holds no pickle and loading it unpickles nothing;
a file of it replaced in the artifact store (a pickle payload, or code in its code file) is refused by name by
`capline serve`, `capline caption` refuses it as a checkpoint, and no payload ever runs.

The artifact store here is the SQLite store's mlartifacts/ folder: what MinIO/S3 is on a cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline import tracking
from pipeline.cli import app
from pipeline.tracking.registry import DIGESTS_TAG
from tests.conftest import ROOT, params_under
from tests.test_serve import free_port, register_captioner

pytestmark = pytest.mark.slow

PICKLE_MAGIC = re.compile(rb"\A\x80[\x02-\x05]")  # a pickle stream starts with PROTO 2..5


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def registered(prepared_params, tmp_path_factory):
    """(params, the registered champion's folder in the artifact store, its recorded digests, a test image)."""
    root = tmp_path_factory.mktemp("model_artifacts")
    p = params_under(prepared_params, root)
    register_captioner(p)
    mlflow.set_tracking_uri(p.tracking.uri)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("capline-captioner", "champion")
    store = Path(client.get_model_version_download_uri("capline-captioner", version.version).removeprefix("file://"))
    image = sorted(Path(p.data.coco.images).glob("*.jpg"))[0]
    return p, store, json.loads(version.tags[DIGESTS_TAG]), image


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a payload ran"


@contextlib.contextmanager
def tampered(store: Path, rel: str, data: bytes):
    """The store's file `rel` holds `data` (created if absent) inside the block, then its old content or nothing."""
    path = store / rel
    old = path.read_bytes() if path.exists() else None
    path.write_bytes(data)
    try:
        yield path
    finally:
        if old is None:
            path.unlink()
        else:
            path.write_bytes(old)


def test_a_registered_model_is_code_settings_and_weights_with_no_pickle(registered):
    _, store, digests, _ = registered
    files = sorted(f.relative_to(store).as_posix() for f in store.rglob("*") if f.is_file())
    assert files == sorted(digests) and "served_model.py" in files and "artifacts/best.ckpt" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle")) or PICKLE_MAGIC.match((store / f).read_bytes())]
    flavor = yaml.safe_load((store / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    ckpt = torch.load(store / "artifacts/best.ckpt", map_location="cpu", weights_only=True)
    assert "state_dict" in ckpt


AUDIT = """
import sys
found = []
sys.addaudithook(lambda event, args: found.append(args[:2]) if event == "pickle.find_class" else None)
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
print(model.predict(pd.DataFrame({"image": [open(sys.argv[2], "rb").read()]})))
print("UNPICKLED", sorted(set(map(str, found))))
"""


def test_loading_and_predicting_never_unpickles(registered, tmp_path):
    p, _, _, image = registered
    fetched = tracking.fetch_model(p.tracking.uri, "captioner", "champion", tmp_path / "model")
    out = subprocess.run([sys.executable, "-c", AUDIT, fetched["path"], str(image)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("UNPICKLED []"), out.stdout  # pickle/cloudpickle resolve no global at all


def test_every_file_replaced_by_a_pickle_payload_is_refused_by_name(registered, marker, tmp_path):
    p, store, digests, _ = registered
    payload = pickle.dumps(Payload(marker))
    for i, rel in enumerate(sorted(digests)):
        with tampered(store, rel, payload):
            with pytest.raises(ValueError) as err:
                tracking.fetch_model(p.tracking.uri, "captioner", "champion", tmp_path / str(i))
        assert re.search(rf"models:/capline-captioner@champion \(version \d+\): refusing to load it.*: "
                         rf"{re.escape(rel)}: changed since registration \(sha256 \w+, registered \w+\)$",
                         str(err.value))
    # the original attack: a pickled model planted beside the model, MLmodel pointed at it
    mlmodel = (store / "MLmodel").read_text().replace("mlflow.pyfunc.loaders.code_model", "mlflow.pyfunc.model")
    with tampered(store, "python_model.pkl", payload), tampered(store, "MLmodel", mlmodel.encode()):
        with pytest.raises(ValueError, match=r"MLmodel: changed since registration .*; "
                                             r"python_model\.pkl: not part of the registered model"):
            tracking.fetch_model(p.tracking.uri, "captioner", "champion", tmp_path / "planted")
    ckpt = (store / "artifacts/best.ckpt").read_bytes()
    (store / "artifacts/best.ckpt").unlink()
    try:
        with pytest.raises(ValueError, match=r"artifacts/best\.ckpt: missing"):
            tracking.fetch_model(p.tracking.uri, "captioner", "champion", tmp_path / "missing")
    finally:
        (store / "artifacts/best.ckpt").write_bytes(ckpt)
    tracking.fetch_model(p.tracking.uri, "captioner", "champion", tmp_path / "restored")  # whole again: accepted


def test_capline_serve_refuses_changed_model_code_before_running_it(registered, marker, tmp_path):
    p, store, _, _ = registered
    code = (store / "served_model.py").read_text() + f"\nimport os\nos.system('touch {marker}')\n"
    cmd = [sys.executable, "-m", "pipeline", "serve", "captioner", "--port", str(free_port()), "--params",
           str(ROOT / "params.yaml"), "--set", f"tracking.uri={p.tracking.uri}"]
    with tampered(store, "served_model.py", code.encode()):
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "TMPDIR": str(tmp_path), "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert re.search(r"refusing to load it.*served_model\.py: changed since registration", out.stderr), out.stderr
    assert not list(tmp_path.glob("capline-serve-*")), "the refused download was left behind"


LOAD_EACH = """
import json, shutil, sys
from pathlib import Path
import mlflow
clean, payload, work = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes(), Path(sys.argv[3])
outcome = {}
for rel in json.loads(sys.argv[4]):
    copy = work / str(len(outcome))
    shutil.copytree(clean, copy)
    (copy / rel).write_bytes(payload)
    if rel == "python_model.pkl":  # the original attack: MLmodel pointed at a planted pickled model
        mlmodel = copy / "MLmodel"
        lines = [line for line in mlmodel.read_text().splitlines() if "model_code_path:" not in line]
        text = "\\n".join(lines).replace("mlflow.pyfunc.loaders.code_model", "mlflow.pyfunc.model")
        pickled = "    python_model: python_model.pkl\\n    loader_module:"
        mlmodel.write_text(text.replace("    loader_module:", pickled))
    try:
        mlflow.pyfunc.load_model(str(copy))
        outcome[rel] = "loaded"
    except BaseException as err:
        outcome[rel] = f"refused: {type(err).__name__}: {str(err)[:300]}"
print(json.dumps(outcome))
"""


def test_even_without_the_digest_check_mlflows_loader_runs_no_payload(registered, marker, tmp_path):
    """Depth: what `capline serve` hands MLflow (pickles refused) runs no payload whichever file carries it."""
    p, _, digests, _ = registered
    clean = Path(tracking.fetch_model(p.tracking.uri, "captioner", "champion", tmp_path / "clean")["path"])
    (tmp_path / "payload").write_bytes(pickle.dumps(Payload(marker)))
    (tmp_path / "work").mkdir()
    files = [*sorted(digests), "python_model.pkl"]
    out = subprocess.run([sys.executable, "-c", LOAD_EACH, str(clean), str(tmp_path / "payload"),
                          str(tmp_path / "work"), json.dumps(files)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"})
    assert out.returncode == 0, out.stderr[-3000:]
    outcome = json.loads(out.stdout.strip().splitlines()[-1])
    for rel in ("MLmodel", "served_model.py", "artifacts/best.ckpt", "python_model.pkl"):  # the files MLflow reads
        assert outcome[rel].startswith("refused"), outcome
    assert re.search(r"Weights only load failed|not a readable checkpoint", outcome["artifacts/best.ckpt"])
    assert "pickle is disallowed" in outcome["python_model.pkl"]
    shutil.rmtree(tmp_path / "work")


def test_capline_caption_refuses_a_model_file_carrying_a_payload(registered, marker, tmp_path):
    p, store, digests, image = registered
    params = ["--params", str(ROOT / "params.yaml"), "--set", f"tracking.uri={p.tracking.uri}"]
    payload = pickle.dumps(Payload(marker))
    runner = CliRunner()
    for rel in sorted(digests):  # every file of the model, as the checkpoint to caption with
        with tampered(store, rel, payload) as path:
            result = runner.invoke(app, ["caption", str(image), "--checkpoint", str(path), *params])
        said = result.output if isinstance(result.exception, SystemExit) else str(result.exception)
        assert result.exit_code != 0 and f"{path}: not a readable checkpoint" in said, (rel, said)
    # the checkpoint rewritten by torch.save with a payload inside, through the real front door
    ckpt = store / "artifacts/best.ckpt"
    with tampered(store, "artifacts/best.ckpt", b""):
        torch.save({"state_dict": {}, "global_step": 1, "payload": Payload(marker)}, ckpt)
        out = subprocess.run([sys.executable, "-m", "pipeline", "caption", str(image), "--checkpoint", str(ckpt),
                              *params], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert re.search(rf"{re.escape(str(ckpt))}: not a readable checkpoint \(UnpicklingError", out.stderr), out.stderr
