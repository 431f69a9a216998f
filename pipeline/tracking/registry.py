"""The model registry: a checkpoint as an MLflow pyfunc model, registered as capline-<family>@alias, and
the command that serves it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.tracking.store import use


class CaplineModel(mlflow.pyfunc.PythonModel):
    """A trained capline checkpoint as an MLflow pyfunc model.

    Captioner: a DataFrame with an `image` column of encoded image bytes (or base64 text) -> captions.
    Language models: a `prompt` column -> the prompt continued by `length` sampled tokens.
    """

    def __init__(self, family: str, beam_size: int = 3, alpha: float = 0.7, length: int = 200,
                 temperature: float = 0.8) -> None:
        self.family, self.beam_size, self.alpha = family, beam_size, alpha
        self.length, self.temperature = length, temperature

    def load_context(self, context: Any) -> None:
        from pipeline.training.fit import load_module

        self.module = load_module(self.family, context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):  # no hints: MLflow would try to enforce them
        from pipeline import inference

        if self.family == "captioner":
            return inference.caption_bytes(self.module, list(model_input["image"]), self.beam_size, self.alpha)
        return [inference.generate(self.module, str(prompt), self.length, self.temperature)
                for prompt in model_input["prompt"]]


def register_checkpoint(uri: str, run_id: str, family: str, checkpoint: str | Path,
                        alias: str = "champion") -> dict[str, str]:
    """Log `checkpoint` as a pyfunc model in run `run_id` and register it as `capline-<family>`@alias."""
    use(uri)
    client = MlflowClient()
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=CaplineModel(family), artifacts={"checkpoint": str(checkpoint)},
            # explicit requirements: inferring them would load the model in a subprocess (slow)
            pip_requirements=["torch", "pytorch-lightning", "pillow", "numpy", "nltk", "pydantic"])
    name = f"capline-{family}"
    version = mlflow.register_model(info.model_uri, name)
    client.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "version": str(version.version), "alias": alias, "uri": f"models:/{name}@{alias}"}


def serve_command(uri: str, family: str, alias: str = "champion", host: str = "127.0.0.1", port: int = 5001,
                  workers: int = 1) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment of `mlflow models serve` for `capline-<family>@alias` from the store at uri.

    `--env-manager local`: the model runs in this environment (capline and torch are already here).
    """
    model_uri = f"models:/capline-{family}@{alias}"
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "--host", host, "--port", str(port), "--workers", str(workers)]
    return argv, {"MLFLOW_TRACKING_URI": uri}
