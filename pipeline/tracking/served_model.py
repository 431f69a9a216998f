"""The registered model's code, logged as a file (MLflow models-from-code): a registered model holds this
file, its settings (model_config in MLmodel) and a Lightning checkpoint, and no pickle; loading it runs this
file and reads the checkpoint with `torch.load(weights_only=True)`. `capline serve` runs it only after every
file of the model has matched the digests recorded in the registry (pipeline/tracking/registry.py).

model_config: `family`; decoding as evaluation does it (`beam_size`, `alpha`, `no_repeat_ngram`, a captioner's
`ensemble_members` (its other members are the artifacts `member-1`, ...) and `rerank_neighbours` / `rerank_weight`
(the training images' features and captions are the artifact `neighbours`, plain arrays), `sample_length`) and
the language models' `temperature`; the request caps `max_records` and `max_image_pixels`.

A bad request is answered 400 with a message naming each bad record and its problem ("record 2: 'image' is
not valid base64"); anything else 500 with a generic message (the traceback goes to the server log only).
"""

from __future__ import annotations

import logging
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

log = logging.getLogger("capline.serve")

CONFIG_KEYS = ("family", "beam_size", "alpha", "no_repeat_ngram", "ensemble_members", "rerank_neighbours",
               "rerank_weight", "sample_length", "temperature", "max_records", "max_image_pixels")
EXAMPLE = {"image": '{"dataframe_records": [{"image": "<base64 of an image file>"}]}',
           "prompt": '{"dataframe_records": [{"prompt": "The "}]}'}


class RequestError(MlflowException):
    """An HTTP error answered with exactly this message (400 by default).

    MLflow's scoring server rewrites a model's MlflowException message to start with the whole input
    DataFrame; `message` ignores that rewrite so that the answer names the records, not their base64.
    """

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE) -> None:
        self._text = message
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str:
        return self._text

    @message.setter
    def message(self, value: str) -> None:  # the scoring server's rewrite (and MlflowException's own init)
        pass


class CaplineModel(PythonModel):
    """A trained capline checkpoint as a pyfunc model.

    Captioner: records with an `image` (base64 text of an image file, or bytes in-process) -> captions.
    Language models: records with a `prompt` -> the prompt continued by `sample_length` sampled tokens.
    """

    def load_context(self, context: Any) -> None:
        from pipeline.families import family
        from pipeline.training.checkpoints import load_module

        config = dict(context.model_config or {})
        missing = [k for k in CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(f"model_config lacks {', '.join(missing)}: register the model again")
        self.config = config
        self.column = family(config["family"]).served_input
        self.module = load_module(config["family"], context.artifacts["checkpoint"])
        self.model = self.neighbours = None  # one model's beam unless registered as an ensemble / with reranking
        if self.column == "image":
            self._load_decoding(context.artifacts)

    def _load_decoding(self, artifacts: dict[str, str]) -> None:
        """The ensemble's other members and the reranking neighbours that model_config asks for."""
        from pipeline.rerank import load_neighbours
        from pipeline.training.checkpoints import captioner_ensemble

        members = [artifacts[f"member-{i}"] for i in range(1, int(self.config["ensemble_members"]))]
        self.model = captioner_ensemble(self.module, members, artifacts["checkpoint"], "the registered model")
        k = int(self.config["rerank_neighbours"])
        if k > 0:
            self.neighbours = load_neighbours(artifacts["neighbours"], k, float(self.config["rerank_weight"]))

    def predict(self, context, model_input, params=None):  # no hints: MLflow would try to enforce them
        from pipeline.inference import BadRecords

        try:
            return self._predict(model_input)
        except RequestError:
            raise
        except BadRecords as err:
            raise RequestError(str(err)) from None
        except Exception:  # a bug or a resource error: the client gets no traceback and no server path
            log.exception("capline model: prediction failed")
            raise RequestError("the model failed on this request (see the server log)", INTERNAL_ERROR) from None

    def _predict(self, frame: Any) -> list[str]:
        """Check the request's shape and size, then caption or continue every record."""
        from pipeline import inference

        if not hasattr(frame, "columns"):
            raise RequestError(f"send records as a DataFrame, e.g. {EXAMPLE[self.column]}")
        if self.column not in frame.columns:  # the signature's only column: MLflow has dropped any other
            raise RequestError(f"no '{self.column}' in the request; send e.g. {EXAMPLE[self.column]}")
        records, cap = len(frame), int(self.config["max_records"])
        if records > cap:
            raise RequestError(f"{records} records in one request; this server takes at most {cap} "
                               f"(serve.max_records): split the request")
        if records == 0:
            return []
        values = list(frame[self.column])
        if self.column == "image":
            return inference.caption_bytes(self.module, values, int(self.config["beam_size"]),
                                           float(self.config["alpha"]), int(self.config["max_image_pixels"]),
                                           no_repeat_ngram=int(self.config["no_repeat_ngram"]), model=self.model,
                                           neighbours=self.neighbours)
        bad = [inference.BadRecord(i, "no 'prompt'" if v is None or v != v  # None or NaN: the record lacks it
                                   else f"'prompt' must be text, not {type(v).__name__}")
               for i, v in enumerate(values) if not isinstance(v, str)]
        if bad:
            raise inference.BadRecords(bad)
        return [inference.generate(self.module, prompt, int(self.config["sample_length"]),
                                   float(self.config["temperature"])) for prompt in values]


set_model(CaplineModel())
