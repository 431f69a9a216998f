"""A run's input data as MLflow datasets: each DVC output it reads, named by its path, with DVC's md5 as digest.

MLflow's UI lists them in the Datasets column; two runs that read the same data show the same digest. The
source is the path in the project at the run's git commit: `git checkout <commit> && dvc checkout <path>`
brings that version back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import register_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT

from pipeline.tracking.lineage import dvc_hashes_under


class DvcSource(DatasetSource):
    """A DVC-tracked path of this project at a git commit."""

    def __init__(self, path: str, commit: str | None) -> None:
        self.path, self.commit = path, commit

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self) -> str:
        """The data's path in the project (`dvc checkout` puts the version of the digest there)."""
        return self.path

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False  # made from dvc.lock only, never guessed from a bare string

    @classmethod
    def _resolve(cls, raw_source: Any) -> DvcSource:
        raise NotImplementedError("DvcSource is made from dvc.lock, not resolved from a string")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "git_commit": self.commit}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> DvcSource:
        return cls(source_dict["path"], source_dict.get("git_commit"))


register_dataset_source(DvcSource)  # so mlflow.data.get_source() reads a logged input back


def dvc_datasets(lineage: Mapping[str, str], roots: list[str]) -> list[MetaDataset]:
    """One MetaDataset per DVC output of `lineage` at or under `roots`, by path."""
    commit = lineage.get(MLFLOW_GIT_COMMIT)
    return [MetaDataset(DvcSource(key[4:], commit), name=key[4:], digest=md5)
            for key, md5 in sorted(dvc_hashes_under(lineage, roots).items())]


def log_data_inputs(run_id: str, lineage: Mapping[str, str], roots: list[str],
                    context: str = "training") -> list[str]:
    """Log the DVC outputs of `lineage` under `roots` as the run's dataset inputs (what mlflow.log_input logs,
    for a run that need not be this process's active one); return their names."""
    datasets = dvc_datasets(lineage, roots)
    inputs = [DatasetInput(Dataset(**{k: d[k] for k in ("name", "digest", "source_type", "source")}),
                           [InputTag(MLFLOW_DATASET_CONTEXT, context)])
              for d in (ds.to_dict() for ds in datasets)]
    if inputs:
        client = MlflowClient()
        try:
            client.log_inputs(run_id, datasets=inputs)
        except MlflowException:  # parallel trials adding the same dataset at once: the retry finds it stored
            client.log_inputs(run_id, datasets=inputs)
    return [ds.name for ds in datasets]
