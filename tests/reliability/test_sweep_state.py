"""Ray's saved sweep state is sealed by digests in the sweep's MLflow run: a tampered file is never unpickled."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.tuning import run_sweep
from pipeline.tuning.state import TAG_PREFIX, SweepStateError, recorded_digests, state_digests, verify
from tests.tuning.test_sweep import FAMILY, local_ray, sweep_params  # noqa: F401 (local_ray: a fixture)


class Payload:
    """Unpickling this creates `marker`: the proof that code from the storage ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_only_files_tune_unpickles_are_sealed_and_every_difference_is_named(tmp_path) -> None:
    exp = tmp_path / "sweep-x"
    (exp / "trial_1").mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"state")
    (exp / "experiment_state-1.json").write_text("{}")
    (exp / "trial_1" / "result.json").write_text("{}")  # plain JSON a trial appends to: not sealed
    (exp / "trial_1" / "error.pkl").write_bytes(b"err")
    digests = state_digests(str(exp))
    assert sorted(digests) == ["experiment_state-1.json", "trial_1/error.pkl", "tuner.pkl"]
    recorded = {rel: ["0" * 64, d] for rel, d in digests.items()}
    verify(str(exp), recorded)  # any recorded digest of a file is accepted

    (exp / "tuner.pkl").write_bytes(pickle.dumps(Payload(tmp_path / "ran")))
    (exp / "trial_1" / "params.pkl").write_bytes(b"new")
    with pytest.raises(SweepStateError) as err:
        verify(str(exp), recorded)
    message = str(err.value)
    assert "tuner.pkl: changed since it was saved" in message
    assert "trial_1/params.pkl: not written by this sweep" in message
    assert "error.pkl" not in message and f"Remove {exp}" in message
    assert not (tmp_path / "ran").exists()


def test_a_fifo_in_the_state_is_refused_not_read(tmp_path) -> None:
    exp = tmp_path / "sweep-x"
    exp.mkdir()
    os.mkfifo(exp / "tuner.pkl")
    with pytest.raises(SweepStateError, match="tuner.pkl: not a regular file"):
        state_digests(str(exp))


@pytest.mark.usefixtures("local_ray")
def test_a_tampered_sweep_state_is_refused_by_name_and_its_payload_never_runs(prepared_params,
                                                                               tmp_path) -> None:
    p = sweep_params(prepared_params, tmp_path, **{f"sweep.{FAMILY}.num_samples": 1,
                                                   f"sweep.{FAMILY}.max_epochs": 1})
    result = run_sweep(p, FAMILY)
    parent = tracking.get_run(p.tracking.uri, result.parent_run_id)
    recorded = recorded_digests(parent["tags"])
    exp = Path(result.experiment_path)
    found = state_digests(str(exp))
    assert {"tuner.pkl", "capline_sweep.json"} <= set(found)
    assert any(rel.startswith("experiment_state-") for rel in found)
    assert all(found[rel] in recorded[rel] for rel in found)  # every saved file recorded as it is
    assert all(len(json.loads(v)["sha256"]) <= 4 for k, v in parent["tags"].items() if k.startswith(TAG_PREFIX))

    again = run_sweep(p, FAMILY)  # untouched: the finished sweep is read back
    assert again.parent_run_id == result.parent_run_id

    marker = tmp_path / "payload-ran"
    (exp / "tuner.pkl").write_bytes(pickle.dumps(Payload(marker)))
    state_file = next(exp.glob("experiment_state-*.json"))
    state = json.loads(state_file.read_text())
    state["stats"]["evil"] = {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(Payload(marker)).hex()}
    state_file.write_text(json.dumps(state))
    with pytest.raises(SweepStateError) as err:
        run_sweep(p, FAMILY)
    assert "tuner.pkl: changed since it was saved" in str(err.value)
    assert f"{state_file.name}: changed since it was saved" in str(err.value)
    assert not marker.exists()
    assert tracking.get_run(p.tracking.uri, result.parent_run_id)["status"] == "FINISHED"  # nothing reopened
