"""train@ with registration: the checkpoint becomes a models-from-code pyfunc model, capline-<family>@champion,
sealed by the digests of its files, that decodes with the params evaluation uses."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from pipeline import inference, tracking
from pipeline.decoding import beam_search
from pipeline.inference import caption_bytes
from pipeline.models.ensemble import CaptionerEnsemble
from pipeline.rerank import rerank
from pipeline.served_files import caption_neighbours
from pipeline.tracking.registry import DIGESTS_TAG, compare_files, serve_command
from pipeline.training.checkpoints import captioner_ensemble, load_module
from pipeline.training.fit import train
from stages import evaluate as evaluate_stage
from stages import train as train_stage
from tests.conftest import params_under


def test_registered_champion_loads_and_predicts_with_the_evaluate_settings(prepared_params, tmp_path):
    p = params_under(prepared_params, tmp_path, **{"evaluate.sample_length": 7, "evaluate.beam_size": 4,
                                                    "evaluate.alpha": 0.3, "evaluate.no_repeat_ngram": 2,
                                                    "serve.temperature": 0.6})
    uri = p.tracking.uri
    best = Path(p.paths.sweeps) / "lstm_lm" / "best.json"
    best.parent.mkdir(parents=True)
    best.write_text(json.dumps({"overrides": {"train.lstm_lm.lr": 0.004}}))
    metrics = train_stage.run(p, "lstm_lm", best=True, register=True)
    assert metrics["registered"]["uri"] == "models:/capline-lstm_lm@champion"

    mlflow.set_tracking_uri(uri)
    version = mlflow.MlflowClient().get_model_version_by_alias("capline-lstm_lm", "champion")
    assert version.run_id == metrics["run_id"]
    fetched = tracking.fetch_model(uri, "lstm_lm", "champion", tmp_path / "fetched")
    folder = Path(fetched["path"])
    files = {f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file()}
    assert json.loads(version.tags[DIGESTS_TAG]).keys() == files - {"registered_model_meta"}

    # models-from-code: the code is a file, the settings are data, the weights a checkpoint; nothing pickled
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert mlmodel["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in mlmodel
    assert mlmodel["config"] == {"family": "lstm_lm", "beam_size": 4, "alpha": 0.3, "no_repeat_ngram": 2,
                                 "ensemble_members": 1, "rerank_neighbours": 0, "rerank_weight": 0.0,
                                 "sample_length": 7, "temperature": 0.6, "max_records": p.serve.max_records,
                                       "max_image_pixels": p.serve.max_image_pixels}
    assert not [f for f in folder.rglob("*") if f.suffix == ".pkl"]

    model = mlflow.pyfunc.load_model(str(folder))
    out = model.predict(pd.DataFrame({"prompt": ["The ", "def "]}))
    assert len(out) == 2 and out[0].startswith("The ") and out[1].startswith("def ")
    assert [len(o) for o in out] == [len("The ") + 7, len("def ") + 7]  # char-level: evaluate.sample_length chars

    scores = evaluate_stage.run(p, "lstm_lm")  # the test scores reach the version a user deploys
    version = mlflow.MlflowClient().get_model_version("capline-lstm_lm", version.version)
    assert float(version.tags["test.bits_per_char"]) == pytest.approx(scores["bits_per_char"], rel=1e-5)
    assert version.description.startswith("test split (") and f"perplexity {scores['perplexity']:.2f}" in \
        version.description


def test_a_champion_captioner_is_registered_with_its_ensemble_and_reranking_and_serves_them(prepared_params,
                                                                                            tmp_path, monkeypatch):
    """With evaluate.captioner_ensemble and evaluate.rerank_neighbours set, train@captioner registers the system
    evaluate@captioner scores: the other members and the training images' features and captions travel with it."""
    member = train(params_under(prepared_params, tmp_path / "member", seed=7), "captioner", logger=False)
    p = params_under(prepared_params, tmp_path, **{"evaluate.captioner_ensemble": [member.best_checkpoint],
                                                    "evaluate.rerank_neighbours": 3, "evaluate.rerank_weight": 0.1,
                                                    "evaluate.beam_size": 4})
    best = Path(p.paths.sweeps) / "captioner" / "best.json"
    best.parent.mkdir(parents=True)
    best.write_text(json.dumps({"overrides": {}}))
    metrics = train_stage.run(p, "captioner", best=True, register=True)
    folder = Path(tracking.fetch_model(p.tracking.uri, "captioner", "champion", tmp_path / "fetched")["path"])
    config = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]["config"]
    assert (config["ensemble_members"], config["rerank_neighbours"], config["rerank_weight"]) == (2, 3, 0.1)
    assert {f.name for f in (folder / "artifacts").iterdir()} == {"best.ckpt", "member-1.ckpt", "neighbours.npz"}

    images = sorted(Path(p.data.coco.images).glob("*.jpg"))[:3]
    raw = [path.read_bytes() for path in images]
    module = load_module("captioner", metrics["best_checkpoint"])
    e = p.evaluate
    expected = caption_bytes(module, raw, e.beam_size, e.alpha, no_repeat_ngram=e.no_repeat_ngram,
                             model=captioner_ensemble(module, e.captioner_ensemble, metrics["best_checkpoint"]),
                             neighbours=caption_neighbours(p, module, 3))  # weight: evaluate.rerank_weight
    decoded, voted = [], []
    monkeypatch.setattr(inference, "beam_search", lambda model, *a, **k: decoded.append(model) or beam_search(
        model, *a, **k))
    monkeypatch.setattr(inference, "rerank", lambda options, nearest, cider, weight: voted.append(
        (nearest, weight)) or rerank(options, nearest, cider, weight))
    served = mlflow.pyfunc.load_model(str(folder))
    assert served.predict(pd.DataFrame({"image": [base64.b64encode(b).decode("ascii") for b in raw]})) == expected
    assert isinstance(decoded[0], CaptionerEnsemble) and len(decoded[0].members) == 2
    nearest, weight = voted[0]
    assert weight == 0.1 and len(nearest) == 3 and all(len(n) == 3 for n in nearest.values())


def test_file_digests_are_compared_file_by_file():
    recorded = {"MLmodel": "a" * 64, "artifacts/best.ckpt": "b" * 64, "python_env.yaml": "c" * 64}
    found = {"MLmodel": "a" * 64, "artifacts/best.ckpt": "d" * 64, "python_model.pkl": "e" * 64}
    assert compare_files(found, recorded) == [
        "artifacts/best.ckpt: changed since registration (sha256 dddddddddddd, registered "
        "bbbbbbbbbbbb)", "python_env.yaml: missing", "python_model.pkl: not part of the registered model"]
    assert compare_files(recorded, recorded) == []


def test_the_server_refuses_pickles_and_takes_the_serve_time_caps(tmp_path):
    argv, env = serve_command(tmp_path, "127.0.0.1", 5005, 2, {"max_records": 3, "max_image_pixels": 100,
                                                             "temperature": 0.5})
    assert argv[1:4] == ["-m", "uvicorn", "--host"] and argv[-1] == "pipeline.tracking.serving_app:app"
    assert env["CAPLINE_SERVE_MAX_REQUEST_BYTES"] == str(64 << 20)
    assert env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    assert json.loads(env["SERVING_MODEL_CONFIG"]) == {"max_records": 3, "max_image_pixels": 100, "temperature": 0.5}
    assert str(tmp_path) in " ".join(env.values())
    with pytest.raises(ValueError, match="unknown \\['beam_size'\\]"):
        serve_command(tmp_path, overrides={"beam_size": 9})
