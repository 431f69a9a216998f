"""Bad data, fuzzed: the annotation loader, prepare_coco, the text reader and the tokeniser never crash.

The fixed cases (each corrupt/truncated/zero-byte/wrongly-typed image, each malformed record and file)
are in tests/data/test_coco.py and tests/data/test_images.py; here hypothesis throws arbitrary input at
the same code and checks that every outcome is either a counted skip or an error naming the file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.data.coco import REASONS, CocoDataError, CocoFormatError, load_annotations, prepare_coco, read_captions
from pipeline.data.text import read_corpus, split_corpus, word_lines
from pipeline.data.tokenize import tokenize

FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
AWKWARD = st.sampled_from(["\ud800", "\udc80", "\x00", "\u2028", "\ufeff", "\x1b", "é", " "])
ANY_TEXT = st.lists(st.characters(codec=None) | AWKWARD, max_size=12).map("".join)  # lone surrogates, NUL...
SCALARS = st.none() | st.booleans() | st.integers(-2, 12) | st.floats() | ANY_TEXT
JSON = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(ANY_TEXT, kids, max_size=3),
                    max_leaves=6)
GOOD = [f"{i}.jpg" for i in range(1, 6)]
BAD = ["empty.jpg", "text.jpg", "truncated.jpg", "png.jpg", "folder.jpg", "missing.jpg", ".", "../1.jpg"]
ODD_IMAGE = st.fixed_dictionaries({"id": st.integers(0, 7) | JSON, "file_name": st.sampled_from(GOOD + BAD)
                                   | ANY_TEXT | JSON}) | JSON
ODD_CAPTION = st.fixed_dictionaries({"image_id": st.integers(0, 7) | JSON, "caption": ANY_TEXT | JSON},
                                    optional={"id": JSON}) | JSON
CAPTION_TEXT = st.just("a red circle") | ANY_TEXT | JSON


@st.composite
def coco_json(draw: st.DrawFn) -> object:
    """A usable captions file (ids 1..n on distinct good images) with odd records mixed in, or any JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    files = draw(st.lists(st.sampled_from(GOOD), unique=True, min_size=3))
    images = [{"id": i, "file_name": f} for i, f in enumerate(files, 1)] + draw(st.lists(ODD_IMAGE, max_size=3))
    captions = [{"image_id": i, "caption": draw(CAPTION_TEXT)} for i in range(1, len(files) + 1)
                for _ in range(draw(st.integers(1, 2)))] + draw(st.lists(ODD_CAPTION, max_size=3))
    data = {"images": draw(st.permutations(images)), "annotations": draw(st.permutations(captions))}
    if draw(st.integers(0, 9)) == 0:  # a top-level key missing or of the wrong type
        data[draw(st.sampled_from(["images", "annotations"]))] = draw(JSON)
    return data


COCO = coco_json()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good JPEGs 1..5.jpg plus a zero-byte, a text, a truncated file, a PNG named .jpg and a folder."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in GOOD:
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(root / name, quality=90)
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image\n")
    (root / "truncated.jpg").write_bytes((root / "1.jpg").read_bytes()[:200])
    Image.new("RGB", (9, 9), (0, 200, 0)).save(root / "png.jpg", format="PNG")
    (root / "folder.jpg").mkdir()
    return root


def _prepare(out: Path, ann: Path, images: Path) -> dict:
    return prepare_coco(out, ann, images, val_annotations=None, val_images=None, image_size=8, val=1, test=1,
                        seed=0, max_skipped_fraction=1.0, workers=1, chunk_size=4, max_caption_tokens=6)


def _check_outputs(out: Path, stats: dict, data: dict) -> None:
    """Counts add up and every written split reads back: UTF-8 JSON lines aligned with the image rows."""
    assert set(stats["skipped"]) == set(REASONS)
    assert stats["images"] + stats["skipped_images"] == stats["images_in"] == len(data["images"])
    assert stats["captions"] + stats["skipped_captions"] <= len(data["annotations"])
    for split, n in stats["splits"].items():
        rows = np.load(out / split / "images.npy", mmap_mode="r")
        assert rows.shape == (n, 3, 8, 8) and rows.dtype == np.uint8
        assert len(read_captions(out / split / "captions.jsonl", rows=n)) == n


@settings(FUZZ, max_examples=150)
@given(data=COCO, ascii_only=st.integers(0, 4).map(bool))  # mostly ASCII JSON: surrogates stay escapes
def test_prepare_coco_skips_and_counts_or_names_the_file_whatever_the_json(images: Path, data, ascii_only: bool):
    work = Path(tempfile.mkdtemp(dir=images.parent))
    try:
        ann = work / "captions.json"
        # ensure_ascii keeps lone surrogates as \ud800 escapes (valid JSON); without it they become invalid UTF-8
        ann.write_bytes(json.dumps(data, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"))
        try:
            stats = _prepare(work / "out", ann, images)
        except CocoFormatError as err:
            assert str(ann) in str(err)
            assert not (work / "out").exists()
            return
        except CocoDataError as err:  # too few usable images for the split sizes
            assert "images" in str(err)
            assert not (work / "out").exists()
            return
        _check_outputs(work / "out", stats, data)
    finally:
        shutil.rmtree(work)


def test_text_that_cannot_be_written_as_utf8_is_skipped_and_counted(images: Path, tmp_path: Path):
    # JSON may escape a lone surrogate (\\ud800): valid JSON, but no UTF-8 output can hold it; nor a path a NUL
    data = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(1, 5)]
            + [{"id": 5, "file_name": "5.jpg\x00"}, {"id": 6, "file_name": "\udc805.jpg"}],
            "annotations": [{"image_id": i, "caption": c} for i in range(1, 7)
                            for c in ("a red circle", f"a blue \ud800 square {i}")]}
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps(data), encoding="ascii")
    stats = _prepare(tmp_path / "out", ann, images)
    assert stats["images"] == 4 and stats["skipped"]["bad_image_record"] == 2
    assert stats["skipped"]["bad_caption_record"] == 4 and stats["skipped"]["unknown_image_id"] == 4
    assert stats["captions"] == 4
    _check_outputs(tmp_path / "out", stats, data)


@settings(FUZZ, max_examples=300)
@given(raw=st.binary(max_size=200) | COCO.map(lambda d: json.dumps(d).encode()[:-1]))
def test_the_annotation_loader_returns_lists_or_a_format_error_naming_the_file(tmp_path_factory, raw: bytes):
    path = tmp_path_factory.getbasetemp() / "fuzz.json"
    path.write_bytes(raw)
    try:
        data = load_annotations(path)
    except CocoFormatError as err:
        assert str(path) in str(err)
        return
    assert isinstance(data["images"], list) and isinstance(data["annotations"], list)


@settings(FUZZ, max_examples=500)
@given(text=st.text(alphabet=st.characters(codec=None)), lowercase=st.booleans())
def test_the_tokeniser_gives_non_empty_tokens_without_whitespace(text: str, lowercase: bool):
    tokens = tokenize(text, lowercase=lowercase)
    assert all(isinstance(t, str) and t and not any(c.isspace() for c in t) for t in tokens)
    assert all("\ud800" > c or c > "\udfff" for t in tokens for c in t)  # no lone surrogates reach a vocabulary
    if lowercase:
        assert tokens == [t.lower() for t in tokens]


@pytest.mark.parametrize("value", [None, 3, b"bytes", ["a"]])
def test_the_tokeniser_names_the_wrong_type(value):
    with pytest.raises(TypeError, match=f"tokenize expects str, got {type(value).__name__}"):
        tokenize(value)


@settings(FUZZ, max_examples=200)
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8")))
def test_the_text_reader_decodes_or_names_the_file_and_byte(tmp_path_factory, raw: bytes):
    path = tmp_path_factory.getbasetemp() / "corpus.txt"
    path.write_bytes(raw)
    try:
        docs = read_corpus([path])
    except ValueError as err:
        assert f"data.text.files: {path}: not valid UTF-8 at byte" in str(err)
        return
    splits = split_corpus(docs, 0.1, 0.1)
    for text in splits.values():
        text.encode("utf-8")  # writable as the stage's UTF-8 output
        for line in word_lines(text, lowercase=True):
            assert all(t and not any(c.isspace() for c in t) for t in line)
