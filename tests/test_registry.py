"""train@ with registration: the checkpoint becomes a pyfunc model, capline-<family>@champion, that predicts."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd

from stages import train as train_stage
from tests.conftest import params_under


def test_registered_champion_loads_and_predicts(prepared_params, tmp_path):
    p = params_under(prepared_params, tmp_path)
    uri = p.tracking.uri
    best = Path(p.paths.sweeps) / "lstm_lm" / "best.json"
    best.parent.mkdir(parents=True)
    best.write_text(json.dumps({"overrides": {"train.lstm_lm.lr": 0.004}}))
    metrics = train_stage.run(p, "lstm_lm", best=True, register=True)
    assert metrics["registered"]["uri"] == "models:/capline-lstm_lm@champion"

    mlflow.set_tracking_uri(uri)
    version = mlflow.MlflowClient().get_model_version_by_alias("capline-lstm_lm", "champion")
    assert version.run_id == metrics["run_id"]
    model = mlflow.pyfunc.load_model("models:/capline-lstm_lm@champion")
    out = model.predict(pd.DataFrame({"prompt": ["The ", "def "]}))
    assert len(out) == 2 and out[0].startswith("The ") and out[1].startswith("def ")
