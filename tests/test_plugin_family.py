"""A model family from another package (tests/plugin_family, registered through the entry-point group
capline.families) goes through the front door as the built-in ones do: params check, sweep, train, evaluate,
generate and serve, each the installed `capline` or a DVC stage's module run as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.families import Family, plugins
from pipeline.params import OptimParams
from tests.conftest import ROOT, overrides_under
from tests.test_serve import free_port, post, stop, wait_until_up

CAPLINE = str(Path(sys.executable).with_name("capline"))
FAMILY = "bigram_lm"


def install_plugin(site: Path) -> dict[str, str]:
    """A distribution's metadata registering tests.plugin_family:FAMILY; the environment that finds it."""
    info = site / "capline_bigram-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: capline-bigram\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[capline.families]\n{FAMILY} = tests.plugin_family:FAMILY\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "MLFLOW_DISABLE_TELEMETRY": "true"}


def plugin_params(prepared, root: Path) -> Path:
    """The real params.yaml shrunk onto the prepared data, with the plug-in family's three sections."""
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in {**overrides_under(prepared, root), "paths.ray_storage": str(root / "ray")}.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    tree["models"][FAMILY] = {"level": "char", "embed_size": 16, "context": 32, "pretrained_embeddings": False}
    optim = {k: v for k, v in tree["train"]["transformer_lm"].items() if k in OptimParams.model_fields}
    tree["train"][FAMILY] = {**optim, "max_epochs": 2, "epoch_fraction": 1.0, "early_stopping_patience": 0}
    tree["sweep"][FAMILY] = {**tree["sweep"]["transformer_lm"], "num_samples": 2, "max_concurrent": 2,
                             "max_epochs": 1, "epoch_fraction": 1.0, "grace_period": 1,
                             "space": {f"train.{FAMILY}.lr": {"loguniform": [1e-3, 3e-2]}}}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def run(cmd: list[str], root: Path, env: dict[str, str], timeout: int = 900) -> str:
    """Run a front-door command in `root`; its output (the test fails with it on a non-zero exit)."""
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    why = f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, why
    return done.stdout


def test_a_broken_or_clashing_plug_in_is_left_out_with_a_warning_naming_it(caplog):
    class EntryPoint:
        def __init__(self, name: str, value: object) -> None:
            self.name, self.value, self._value = name, f"pkg:{name}", value

        def load(self) -> object:
            if isinstance(self._value, Exception):
                raise self._value
            return self._value

    fine = Family("mine", "language_model", "val/loss", "min", "m:M", "m:P", "m:T")
    found = plugins([EntryPoint("mine", fine), EntryPoint("broken", ImportError("no module named pkg")),
                     EntryPoint("clash", Family("lstm_lm", "language_model", "val/loss", "min", "m:M", "m:P", "m:T")),
                     EntryPoint("junk", {"name": "x"})])
    assert found == {"mine": fine}
    assert "broken = pkg:broken" in caplog.text and "no module named pkg" in caplog.text
    assert "'lstm_lm' is already registered" in caplog.text and "expected a pipeline.families.Family" in caplog.text


@pytest.mark.slow
def test_a_plug_in_family_sweeps_trains_evaluates_generates_and_serves(prepared_params, tmp_path):
    env = install_plugin(tmp_path / "site")
    params = plugin_params(prepared_params, tmp_path)
    common = ["--params", str(params)]

    assert run([CAPLINE, "params", "check", *common], tmp_path, env).strip().endswith("params.yaml: ok")
    bad = subprocess.run([CAPLINE, "params", "check", *common, "--set", f"models.{FAMILY}.embed_size=1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and f"models.{FAMILY}.embed_size" in bad.stderr  # its own schema validates it
    assert "Traceback" not in bad.stderr

    out = run([CAPLINE, "sweep", FAMILY, *common], tmp_path, env)
    best = json.loads((tmp_path / "sweeps" / FAMILY / "best.json").read_text())
    assert best["monitor"] == "val/loss" and set(best["overrides"]) == {f"train.{FAMILY}.lr"}, out

    run([sys.executable, "-m", "stages.train", FAMILY, "--best"], tmp_path, env)  # cwd holds params.yaml
    trained = json.loads((tmp_path / "metrics" / f"train_{FAMILY}.json").read_text())
    assert trained["registered"] and trained["epochs"] == 2

    run([sys.executable, "-m", "stages.evaluate", FAMILY], tmp_path, env)
    scores = json.loads((tmp_path / "metrics" / f"evaluate_{FAMILY}.json").read_text())
    assert scores["bits_per_char"] < scores["unigram_bits_per_char"]  # a bigram beats the unigram model

    text = run([CAPLINE, "generate", FAMILY, "--prompt", "The ", "--length", "20", *common], tmp_path, env)
    assert text.startswith("The ") and len(text.strip()) > len("The ")

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([CAPLINE, "serve", FAMILY, "--port", str(port), *common], cwd=tmp_path, env=env,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, url, log)
        body = post(url, {"dataframe_records": [{"prompt": "The "}]})
        assert body["predictions"][0].startswith("The ") and len(body["predictions"][0]) > len("The ")
    finally:
        stop(proc)
