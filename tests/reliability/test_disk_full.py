"""A write that fails part-way (the disk fills up) leaves every earlier output byte-identical and no temp files.

The failure is the kernel's, not a mock: RLIMIT_FSIZE makes any write past the limit fail with EFBIG, in the
middle of whichever file crosses it, exactly where ENOSPC would strike on a full disk (Python ignores the
SIGXFSZ that would otherwise kill the process). tests/test_io.py covers ENOSPC raised inside pipeline.io.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import re
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.params import Params, load_params
from pipeline.training.checkpoints import checkpoint_path, checkpoint_step
from pipeline.training.fit import train
from tests.conftest import ROOT, tiny_overrides


@contextlib.contextmanager
def disk_full_after(nbytes: int) -> Iterator[None]:
    """Any file write beyond `nbytes` fails with EFBIG inside this block (this process and its children)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def injected(err: OSError) -> bool:
    """The simulated full disk, nothing else: EFBIG, or NumPy's report of the short write that precedes it."""
    return err.errno == errno.EFBIG or re.fullmatch(r"\d+ requested and \d+ written", str(err)) is not None


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path (temp files included, so leftovers show)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def prepared_copy(prepared_params: Params, tmp_path: Path) -> Path:
    """A private copy of the session's prepared data (this test may damage it), with its own system temp dir."""
    root = tmp_path / "project"
    shutil.copytree(Path(prepared_params.paths.sample).parents[1], root)
    return root


def params(root: Path, **overrides: object) -> Params:
    return load_params(ROOT / "params.yaml", {**tiny_overrides(root), **overrides})


# (stage, an override that changes its outputs, a limit smaller than its largest new file)
STAGES = [
    ("sample", {"sample.images": 30}, 4_000),  # the JPEGs fit; captions.json does not
    ("prepare_text", {"prepare_text.split.val": 0.2}, 2_000),  # train.txt
    ("prepare_coco", {"prepare_coco.image_size": 40}, 16_000),  # shards: images.npy (N, 3, 40, 40)
    ("vocab", {"vocab.min_freq": 2}, 8_000),  # the vocabularies fit; an encoded stream does not
    ("embeddings", {"embeddings.dim": 32}, 8_000),  # words.npy (V, 32) float32
]


@pytest.mark.parametrize(("stage", "overrides", "limit"), STAGES, ids=[s[0] for s in STAGES])
def test_a_stage_that_fills_the_disk_leaves_the_previous_outputs_whole(prepared_copy, stage, overrides, limit):
    import importlib

    run = importlib.import_module(f"stages.{stage}").run
    before = snapshot(prepared_copy)
    with pytest.raises(OSError) as info, disk_full_after(limit):
        run(params(prepared_copy, **overrides))
    assert injected(info.value), info.value
    assert snapshot(prepared_copy) == before  # outputs and metrics of the last good run, no temp files


def test_a_checkpoint_that_fills_the_disk_leaves_the_previous_one_whole(prepared_copy, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "systmp"))  # Lightning stages checkpoints here
    (tmp_path / "systmp").mkdir()
    one = params(prepared_copy)
    first = train(one, "lstm_lm", logger=False)
    models = checkpoint_path(one, "lstm_lm").parent
    before = snapshot(models)
    size = checkpoint_path(one, "lstm_lm", "last").stat().st_size

    with pytest.raises(OSError) as info, disk_full_after(size // 2):
        train(params(prepared_copy, **{"train.lstm_lm.max_epochs": 2}), "lstm_lm", resume=True, logger=False)
    assert injected(info.value), info.value
    assert snapshot(models) == before
    assert checkpoint_step(checkpoint_path(one, "lstm_lm", "last")) == first.steps  # still resumable
    assert not list((tmp_path / "systmp").iterdir())  # the partial copy was discarded
