"""The files evaluate@ writes for the report: round trip, whole-folder replacement, errors naming the file, and
pairing captions with the prepared images."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pipeline.report.examples import (
    CaptionExample,
    CaptionExamples,
    LanguageModelSamples,
    read_caption_examples,
    read_samples,
    write_examples,
)
from pipeline.report.sources import captioned_images

DECODING = {"beam_size": 3, "alpha": 0.7, "no_repeat_ngram": 3, "rerank_neighbours": 10, "ensemble_members": 2}


def examples(attention_rows: int = 2) -> CaptionExamples:
    rng = np.random.default_rng(0)
    maps = rng.dirichlet(np.ones(16), attention_rows).astype(np.float32)  # (T, N): 1 word + <end>
    return CaptionExamples("show_attend_tell", True, DECODING, [
        CaptionExample(0, 11, "a.jpg", ["circle"], ["a circle", "one circle"], "circle", maps),
        CaptionExample(1, 12, "b.jpg", ["a", "square", "."], ["a square."], "a square.", None)])


def test_captions_round_trip_with_half_precision_attention(tmp_path):
    written = examples()
    write_examples(tmp_path / "captioner", written)
    assert sorted(f.name for f in (tmp_path / "captioner").iterdir()) == ["attention_0.npy", "captions.json"]
    back = read_caption_examples(tmp_path / "captioner")
    assert (back.arch, back.attends, back.decoding) == ("show_attend_tell", True, DECODING)
    first, second = back.images
    assert (first.image_index, first.image_id, first.file_name, first.words, first.references, first.caption) == (
        0, 11, "a.jpg", ["circle"], ["a circle", "one circle"], "circle")
    assert first.attention.dtype == np.float16 and first.attention.shape == (2, 16)
    np.testing.assert_allclose(first.attention, written.images[0].attention, atol=1e-3)
    assert second.attention is None and second.caption == "a square."
    assert read_caption_examples(tmp_path / "absent") is None
    older = json.loads((tmp_path / "captioner" / "captions.json").read_text())
    del older["rerank_neighbours"], older["ensemble_members"]  # written before reranking and ensembles existed:
    (tmp_path / "captioner" / "captions.json").write_text(json.dumps(older))  # read as one model, not reranked
    assert read_caption_examples(tmp_path / "captioner").decoding == {**DECODING, "rerank_neighbours": 0,
                                                                       "ensemble_members": 1}


def test_a_new_evaluation_replaces_the_folder_whole(tmp_path):
    folder = tmp_path / "captioner"
    write_examples(folder, examples())
    fewer = examples()
    fewer.images[0].attention = None  # e.g. report.attention_images lowered to 0
    write_examples(folder, fewer)
    assert not (folder / "attention_0.npy").exists()  # no stale map left to be shown
    assert read_caption_examples(folder).images[0].attention is None
    assert [p.name for p in tmp_path.iterdir()] == ["captioner"]  # no temporary folder left beside it


def test_samples_round_trip(tmp_path):
    samples = LanguageModelSamples("The ", 5, 1337, [(0.5, "The quick"), (1.0, "The qu\nik")])
    write_examples(tmp_path / "lstm_lm", samples)
    assert read_samples(tmp_path / "lstm_lm") == samples
    assert read_samples(tmp_path / "nothing") is None


def test_damaged_files_are_errors_naming_the_file(tmp_path):
    folder = tmp_path / "captioner"
    write_examples(folder, examples())
    data = json.loads((folder / "captions.json").read_text())
    del data["images"][1]["references"]
    (folder / "captions.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'captions.json'}: not a captions file")):
        read_caption_examples(folder)
    write_examples(folder, examples(attention_rows=0))  # fewer maps than the caption's words
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'attention_0.npy'}: expected attention (T >= 1")):
        read_caption_examples(folder)
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "samples.json").write_text('{"prompt": "x", "length": 1, "seed": 0}')
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'lm' / 'samples.json'}: not a samples file")):
        read_samples(tmp_path / "lm")


def test_captions_are_paired_with_their_rows_of_the_prepared_images(tmp_path):
    shard = tmp_path / "images.npy"
    pixels = np.arange(3 * 3 * 4 * 4, dtype=np.uint8).reshape(3, 3, 4, 4)  # (N, 3, S, S)
    np.save(shard, pixels)
    pairs = captioned_images(list(reversed(examples().images)), shard)
    assert [p.example.image_id for p in pairs] == [12, 11]
    assert np.array_equal(pairs[0].image, pixels[1]) and np.array_equal(pairs[1].image, pixels[0])
    np.save(shard, pixels[:1])  # data prepared again, smaller: the captions no longer match it
    with pytest.raises(ValueError, match=re.escape(f"{shard}: no row 1 (1 images)")):
        captioned_images(examples().images, shard)
