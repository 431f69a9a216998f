"""Ray's saved sweep state, sealed by digests kept in MLflow: a sweep resumes only from state capline wrote.

Tune restores a sweep by unpickling files from `paths.ray_storage` (tuner.pkl, the experiment state with its
embedded cloudpickles, searcher and callback states, trials' error.pkl): whoever can write that storage (an S3
prefix on a cluster) could run code in the next `capline sweep`. So at every save of the experiment state the
driver records the sha256 of each such file in the sweep's MLflow parent run (the tracking database, which the
storage writer cannot reach), and before Tune reads anything back every such file must match a digest recorded
for it: a changed or unrecorded file stops the sweep naming the file, before Ray opens it.

What is sealed: every `*.pkl` file and the experiment folder's own `*.json` files (what Tune deserialises with
pickle on restore); trials' progress files are plain JSON/CSV and checkpoints are loaded weights-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from pyarrow import fs as pafs
from ray import tune

from pipeline import tracking

log = logging.getLogger(__name__)

TAG_PREFIX = "capline.ray_state."  # + sha256(relative path)[:16]; value {"path": ..., "sha256": [...]}
KEEP = 4  # digests kept per file: a save may be recorded before the previous one reached the storage
CHUNK = 1 << 20


class SweepStateError(ValueError):
    """Saved sweep state that capline did not record: the sweep stops before Ray reads it."""


def sealed(rel: str) -> bool:
    """Whether Tune deserialises this file (path relative to the experiment folder) with pickle on restore."""
    return rel.endswith(".pkl") or ("/" not in rel and rel.endswith(".json"))


def filesystem(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) for a local path or a storage URI."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def state_digests(path: str) -> dict[str, str]:
    """{relative path: sha256} of the sealed files under an experiment folder (local path or storage URI)."""
    fs, root = filesystem(path)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return {}
    digests = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = Path(info.path).relative_to(root).as_posix()
        if not sealed(rel):
            continue
        if info.type != pafs.FileType.File:
            raise SweepStateError(f"{path}/{rel}: not a regular file; remove {path} to start this sweep over")
        digest = hashlib.sha256()
        with fs.open_input_stream(info.path) as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        digests[rel] = digest.hexdigest()
    return digests


def tag_key(rel: str) -> str:
    """The MLflow tag of one file (paths may hold characters tag keys may not)."""
    return TAG_PREFIX + hashlib.sha256(rel.encode("utf-8")).hexdigest()[:16]


def recorded_digests(tags: dict[str, str]) -> dict[str, list[str]]:
    """{relative path: recorded sha256s} from a parent run's tags."""
    found = {}
    for key, value in tags.items():
        if key.startswith(TAG_PREFIX):
            entry = json.loads(value)
            found[entry["path"]] = list(entry["sha256"])
    return found


def record(uri: str, run_id: str, digests: dict[str, str], recorded: dict[str, list[str]]) -> None:
    """Add each file's current digest to its tag (the last KEEP kept); `recorded` is updated in place."""
    changed = {}
    for rel, digest in digests.items():
        known = recorded.get(rel, [])
        if digest not in known:
            recorded[rel] = [*known, digest][-KEEP:]
            changed[tag_key(rel)] = json.dumps({"path": rel, "sha256": recorded[rel]})
    if changed:
        tracking.use(uri)
        tracking.set_tags(run_id, changed)


def verify(path: str, recorded: dict[str, list[str]]) -> None:
    """SweepStateError naming every sealed file under `path` that capline did not record as it is now."""
    problems = []
    for rel, digest in sorted(state_digests(path).items()):
        if rel not in recorded:
            problems.append(f"{rel}: not written by this sweep")
        elif digest not in recorded[rel]:
            problems.append(f"{rel}: changed since it was saved (sha256 {digest[:12]})")
    if problems:
        raise SweepStateError(f"{path}: refusing to resume this sweep, its saved state differs from what was "
                              f"recorded in MLflow (someone wrote to the Ray storage): {'; '.join(problems)}. "
                              f"Remove {path} to start the sweep over")


def seal_storage(uri: str, run_id: str, path: str) -> None:
    """Record the sealed files now at `path` (the tuner.pkl Tune writes when a Tuner is made)."""
    recorded = recorded_digests(tracking.get_run(uri, run_id)["tags"])
    record(uri, run_id, state_digests(path), recorded)


class SealState(tune.Callback):
    """Records the digests of the experiment state each time Tune saves it, before it is synced to storage.

    Tune calls get_state() right after writing the experiment and searcher state into the driver's staging
    folder (which is then copied to the storage); returning None adds no file. The target run is looked up
    by experiment path (TARGETS), so that the callback pickled into tuner.pkl carries no URI or run id.
    """

    TARGETS: dict[str, tuple[str, str]] = {}  # experiment path -> (tracking uri, parent run id); this process

    def __init__(self, path: str) -> None:
        self.path = path
        self._trials: list | None = None
        self._recorded: dict[str, list[str]] | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self._trials = trials  # Tune's own list: trials it adds later are in it too

    def get_state(self) -> None:
        target = self.TARGETS.get(self.path)
        if target is None or not self._trials:
            return None
        uri, run_id = target
        if self._recorded is None:
            self._recorded = recorded_digests(tracking.get_run(uri, run_id)["tags"])
        staging = self._trials[0].storage.experiment_driver_staging_path
        record(uri, run_id, state_digests(staging), self._recorded)
        return None
