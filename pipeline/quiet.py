"""Third-party chatter off by default: what a user running `capline` or `dvc repro` does not need to read.

Lightning's info lines (accelerator banners, tips, "limit_train_batches was configured", "fit stopped"),
known deprecation warnings of our dependencies, and MLflow's artifact download bars. Warnings and errors
of every library still show; `capline -v` / `CAPLINE_VERBOSE=1` keeps everything (the front doors decide).
"""

from __future__ import annotations

import logging
import os
import warnings

# rank_zero_info goes through these loggers; Lightning resets the level of "pytorch_lightning" on import, not theirs
INFO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
KNOWN_WARNINGS = (  # (message regex, why it is not the user's to act on)
    (r"Add type hints to the `predict` method", "MLflow: capline's served model checks each record itself"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "Lightning's own use of a torch API"),
    (r"An input example was not provided when logging the model",
     "MLflow: the signature is declared; an example would be a whole base64 image stored in every model"),
)
ANSI_PREFIX = r"(?:\x1b\[[0-9;]*m)?"
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # MLflow reads this setting only from the environment


def quiet(verbose: bool = False) -> None:
    """Silence the chatter above for this process (and the processes it starts), unless verbose."""
    if verbose:
        return
    for name in INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message, _why in KNOWN_WARNINGS:  # MLflow colours some of its warnings: an ANSI code may come first
        warnings.filterwarnings("ignore", message=ANSI_PREFIX + message)
    os.environ.setdefault(PROGRESS_BAR_ENV, "false")
