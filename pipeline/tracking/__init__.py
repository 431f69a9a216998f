"""MLflow tracking: the only package that imports mlflow.

Runs live in a database store (default `sqlite:///mlflow.db`) or a tracking server; file stores (./mlruns)
are refused. `store` reaches the store, `runs` starts, ends and logs into runs, `lineage` makes the lineage
tags (MLflow's mlflow.source.* among them), `datasets` logs the DVC data a run reads as its MLflow datasets,
`lookups` reads runs back as plain data, `registry` registers models (sealed by file digests), fetches
them back checked and serves them; `served_model` is a registered model's code (logged as a file, never
imported here). Everything is re-exported here: callers write `from pipeline import tracking` and
`tracking.create_run(...)`.
"""

from pipeline.tracking.datasets import DvcSource, log_data_inputs
from pipeline.tracking.lineage import dvc_hashes_under, lineage_tags, params_hash
from pipeline.tracking.lookups import (
    child_runs,
    find_runs,
    get_run,
    latest_sweep,
    list_artifacts,
    load_artifact_dict,
    metric_history,
    resolve_run_id,
    run_exists,
    tag_filter,
)
from pipeline.tracking.registry import fetch_model, record_scores, register_checkpoint, serve_command
from pipeline.tracking.runs import (
    HOST_TAG,
    PID_TAG,
    create_run,
    end_run,
    lightning_logger,
    log_artifact,
    log_dict,
    log_figure,
    log_metrics,
    log_params_flat,
    mark_stale_runs,
    reopen_run,
    set_tags,
)
from pipeline.tracking.store import (
    MAX_PARAM_VALUE,
    check_server,
    configure,
    use,
)

__all__ = [
    "HOST_TAG", "MAX_PARAM_VALUE", "PID_TAG",
    "DvcSource", "check_server", "child_runs", "configure", "create_run",
    "dvc_hashes_under", "end_run",
    "fetch_model", "find_runs",
    "get_run", "latest_sweep", "lightning_logger", "lineage_tags", "list_artifacts",
    "load_artifact_dict", "log_artifact", "log_data_inputs", "log_dict", "log_figure", "log_metrics", "log_params_flat",
    "mark_stale_runs", "metric_history", "params_hash", "record_scores", "register_checkpoint", "reopen_run",
    "resolve_run_id", "run_exists",
    "serve_command", "set_tags", "tag_filter", "use",
]
