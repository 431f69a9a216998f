"""Security: checkpoints never unpickle code, outputs are never pickles, no credentials in the repository.

Archive extraction (path traversal, links, devices) is covered by tests/data/test_download.py; the MLflow
server's authentication by tests/infra (compose file and a real basic-auth server).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.training.checkpoints import learning_curve, load_module
from pipeline.training.fit import train
from tests.conftest import ROOT, params_under

SOURCES = sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").rglob("*.py")])
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    """Calls whose function is `name` or `<anything>.name`."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and (getattr(n.func, "attr", None) == name or getattr(n.func, "id", None) == name)]


def _kw(call: ast.Call, key: str) -> object:
    """The literal value of a keyword argument (missing: None; not a literal: '<expr>')."""
    for kw in call.keywords:
        if kw.arg == key:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def unsafe_loads(text: str, name: str) -> list[str]:
    """Every place in Python source that could unpickle or otherwise execute data."""
    tree = ast.parse(text)
    where = lambda n, what: f"{name}:{n.lineno}: {what}"  # noqa: E731
    found = [where(n, "torch.load without weights_only=True") for n in _calls(tree, "load")
             if ast.unparse(n.func) == "torch.load" and _kw(n, "weights_only") is not True]
    found += [where(n, "load_from_checkpoint without weights_only=True") for n in _calls(tree, "load_from_checkpoint")
              if _kw(n, "weights_only") is not True]
    found += [where(n, "Trainer.fit from a checkpoint without weights_only=True") for n in _calls(tree, "fit")
              if _kw(n, "ckpt_path") is not None and _kw(n, "weights_only") is not True]
    found += [where(n, "np.load with allow_pickle") for n in _calls(tree, "load") if _kw(n, "allow_pickle")]
    safe = {c.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef)  # SafeLoader subclasses in this file
            and any(ast.unparse(b).endswith("SafeLoader") for b in c.bases)}
    found += [where(n, "yaml.load without a SafeLoader") for n in _calls(tree, "load") if ast.unparse(n.func) ==
              "yaml.load" and not any(k.arg == "Loader" and (ast.unparse(k.value).endswith("SafeLoader") or
                                                              ast.unparse(k.value) in safe) for k in n.keywords)]
    found += [where(n, f"{ast.unparse(n.func)}") for n in ast.walk(tree) if isinstance(n, ast.Call)
              and ast.unparse(n.func) in ("yaml.unsafe_load", "eval", "exec")]
    for n in ast.walk(tree):
        if isinstance(n, ast.Import | ast.ImportFrom):
            modules = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]
            found += [where(n, f"import {m}") for m in modules if m.split(".")[0] in UNSAFE_MODULES]
    return found


def test_no_library_or_stage_code_can_unpickle_data():
    assert len(SOURCES) > 40
    problems = [p for f in SOURCES for p in unsafe_loads(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert problems == []


def test_the_source_check_catches_unsafe_loads():
    text = ("import pickle\nimport torch, yaml\nx = torch.load('a.ckpt')\ny = yaml.load(open('p'))\n"
            "trainer.fit(m, ckpt_path='last.ckpt')\nM.load_from_checkpoint('b', weights_only=False)\n"
            "z = np.load('c.npy', allow_pickle=True)\nok = torch.load('d.ckpt', weights_only=True)\n"
            "class L(yaml.SafeLoader): pass\nok = yaml.load(t, Loader=L)\nno = yaml.load(t, Loader=yaml.Loader)\n")
    assert sorted(unsafe_loads(text, "x.py")) == sorted([
        "x.py:1: import pickle", "x.py:3: torch.load without weights_only=True",
        "x.py:4: yaml.load without a SafeLoader", "x.py:11: yaml.load without a SafeLoader",
        "x.py:5: Trainer.fit from a checkpoint without weights_only=True",
        "x.py:6: load_from_checkpoint without weights_only=True", "x.py:7: np.load with allow_pickle"])


class Payload:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do with a real command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_checkpoint_is_refused_and_its_code_never_runs(prepared_params, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "epoch": 0, "payload": Payload(marker)}, evil)
    p = params_under(prepared_params, tmp_path)
    with pytest.raises(ValueError, match=f"{evil}: not a readable checkpoint .*UnpicklingError"):
        load_module("lstm_lm", evil)
    with pytest.raises(ValueError, match=f"{evil}: not a readable checkpoint"):
        train(p, "lstm_lm", resume=evil, logger=False)
    with pytest.raises(Exception, match="Weights only load failed"):
        learning_curve(evil)
    assert not marker.exists()


PICKLE_MAGIC = re.compile(rb"\A\x80[\x02-\x05]")  # a pickle stream starts with PROTO 2..5


def test_vocabularies_and_metadata_are_json_and_arrays_hold_no_objects(prepared_params):
    root = Path(prepared_params.paths.sample).parents[1]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert {"words.json", "chars.json", "manifest.json", "captions.jsonl", "words.npy"} <= {p.name for p in files}
    for path in files:
        data = path.read_bytes()
        assert not PICKLE_MAGIC.match(data), f"{path} is a pickle"
        if path.suffix == ".json":
            json.loads(data.decode("utf-8"))
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in data.decode("utf-8").splitlines()]
        elif path.suffix == ".npy":
            assert np.load(path, allow_pickle=False).dtype != object
    vocab = json.loads((Path(prepared_params.paths.vocab) / "words.json").read_text(encoding="utf-8"))
    assert all(isinstance(t, str) for t in vocab["tokens"])


# ---- credentials ---------------------------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"\$|<|\*\*\*|test|example|changeme|dummy|fake|xxx", re.IGNORECASE)
SECRETS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"aws_secret_access_key\W{1,4}([A-Za-z0-9/+=]{40})\b", re.IGNORECASE),
    "private key": re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----"),
    "access token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|xox[abprs]-[A-Za-z0-9-]{10,}|hf_[A-Za-z0-9]{30,}"
                               r"|glpat-[A-Za-z0-9_-]{20})\b"),
    "password in a URI": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:([^/\s@'\"]+)@"),
    "literal password or secret": re.compile(
        r"(?:password|passwd|secret|token|api_?key)\w*['\"]?\s*[:=]\s*['\"]([^'\"\s]{8,})['\"]", re.IGNORECASE),
}
SECRET_FILES = re.compile(r"(^|/)(\.env|.*\.pem|id_[rd]sa|id_ed25519|\.netrc|credentials(\.json)?)$")


def repository_files() -> list[Path]:
    """Tracked files and new ones git does not ignore (what a commit could carry)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


def credentials_in(name: str, text: str) -> list[str]:
    """What looks like a real credential in one file (placeholders such as ${VAR} or test values excepted)."""
    found = [f"{name}: a credentials file"] if SECRET_FILES.search(name) else []
    for what, pattern in SECRETS.items():
        for match in pattern.finditer(text):
            value = match.group(match.lastindex or 0)
            if not PLACEHOLDER.search(value):
                found.append(f"{name}:{text.count(chr(10), 0, match.start()) + 1}: {what}")
    return found


def test_no_credentials_are_in_the_repository():
    files = repository_files()
    assert any(f.name == "params.yaml" for f in files)
    found = [c for f in files for c in credentials_in(str(f.relative_to(ROOT)), f.read_text(errors="replace"))]
    assert found == []


def test_the_credentials_check_finds_planted_ones():
    key = "AKIA" + "Q" * 16
    planted = {
        "a.py": f"KEY = '{key}'\n",
        "b.yaml": "tracking:\n  uri: postgresql://mlflow:" + "s3cr3tpw" + "@db:5432/mlflow\n",
        "c.ini": "admin_password = " + "'Hunter2Hunter2'\n",
        "infra/.env": "X=1\n",
    }
    assert [credentials_in(name, text) != [] for name, text in planted.items()] == [True] * 4
    assert credentials_in("d.yaml", "uri: postgresql://mlflow:${PGPASSWORD}@db/mlflow\n") == []
    assert credentials_in("e.py", "KEYS = {'AWS_SECRET_ACCESS_KEY': 'capline-test-secret'}\n") == []
