"""models.captioner.max_len: `auto` comes from the training captions' lengths, and cutting a caption is said."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.vocab import Vocabulary
from pipeline.io import read_json
from pipeline.training.checkpoints import load_module
from pipeline.training.datamodules import CaptionDataModule
from pipeline.training.fit import caption_max_len, train
from tests.conftest import params_under


def train_lengths(p) -> list[int]:
    """Every training caption's length in tokens, <end> included."""
    lines = (Path(p.paths.coco) / "train" / "captions.jsonl").read_text("utf-8").splitlines()
    return [len(c) + 1 for line in lines for c in json.loads(line)["captions"]]


def test_prepare_coco_records_the_training_captions_lengths(prepared_params):
    recorded = read_json(Path(prepared_params.paths.coco) / "manifest.json")["train_caption_tokens"]
    lengths = train_lengths(prepared_params)
    assert recorded["max"] == max(lengths)
    assert recorded["p99"] == int(np.ceil(np.percentile(lengths, 99)))
    assert recorded["p50"] <= recorded["p95"] <= recorded["p99"] <= recorded["max"]
    assert sum(n > recorded["p99"] for n in lengths) <= 0.01 * len(lengths)  # auto cuts 1 % at most


def test_auto_is_the_99th_percentile_and_a_number_stays_as_given(prepared_params, tmp_path):
    p99 = read_json(Path(prepared_params.paths.coco) / "manifest.json")["train_caption_tokens"]["p99"]
    assert caption_max_len(params_under(prepared_params, tmp_path, **{"models.captioner.max_len": "auto"})) == p99
    assert caption_max_len(params_under(prepared_params, tmp_path, **{"models.captioner.max_len": 7})) == 7


def test_auto_without_the_lengths_names_the_manifest_and_the_fix(prepared_params, tmp_path):
    coco = tmp_path / "coco"
    coco.mkdir()
    (coco / "manifest.json").write_text("{}")
    p = params_under(prepared_params, tmp_path, **{"models.captioner.max_len": "auto", "paths.coco": str(coco)})
    with pytest.raises(ValueError, match=r"manifest.json: no train_caption_tokens.p99 .*rerun prepare_coco"):
        caption_max_len(p)


def test_a_trained_captioner_keeps_the_number_auto_stood_for(prepared_params, tmp_path):
    p = params_under(prepared_params, tmp_path, **{"models.captioner.max_len": "auto",
                                                   "train.captioner.max_epochs": 1})
    result = train(p, "captioner")
    assert load_module("captioner", result.best_checkpoint).model_cfg.max_len == caption_max_len(p)


def test_cutting_training_captions_is_a_warning_with_the_count(prepared_params, caplog):
    vocab = Vocabulary.load(Path(prepared_params.paths.vocab) / "words.json")
    lengths = train_lengths(prepared_params)
    short = min(lengths)  # every longer caption is cut
    with caplog.at_level(logging.WARNING, logger="pipeline.training.datamodules"):
        CaptionDataModule(prepared_params.paths.coco, vocab, 8, short, 0, 0, pin_memory=False).setup("fit")
    cut = sum(n > short for n in lengths)
    assert cut and f"{cut} of {len(lengths)} training captions are longer than max_len {short}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.training.datamodules"):
        CaptionDataModule(prepared_params.paths.coco, vocab, 8, max(lengths), 0, 0, pin_memory=False).setup("fit")
    assert "are cut" not in caplog.text
