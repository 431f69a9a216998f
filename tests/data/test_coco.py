"""prepare_coco: strict loading, per-record validation by reason, seeded splits, aligned outputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.coco import REASONS, CocoDataError, CocoFormatError, load_annotations, prepare_coco


def colour(image_id: int) -> tuple[int, int, int]:
    """A distinct solid colour per image id (ids below 40 stay >= 20 apart in some channel)."""
    return ((image_id * 53) % 256, (image_id * 97 + 60) % 256, (image_id * 29 + 120) % 256)


def make_coco(root: Path, ids: range, name: str = "train") -> tuple[Path, Path, dict]:
    """JPEGs of solid colours under root/name and a COCO captions JSON root/name.json (2 captions each)."""
    images = root / name
    images.mkdir(parents=True)
    data: dict = {"info": {}, "images": [], "annotations": []}
    for image_id in ids:
        file_name = f"{image_id:06d}.jpg"
        Image.new("RGB", (40, 28), colour(image_id)).save(images / file_name, quality=95)
        data["images"].append({"id": image_id, "file_name": file_name, "width": 40, "height": 28})
        for c in range(2):
            data["annotations"].append({"id": 1000 + 2 * image_id + c, "image_id": image_id,
                                        "caption": f"A Photo of image {image_id}, take {c}."})
    return dump(root / f"{name}.json", data), images, data


def dump(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def prepare(out: Path, ann: Path, images: Path, **kw) -> dict:
    args = {"val_annotations": None, "val_images": None, "image_size": 16, "val": 3, "test": 2, "seed": 7,
            "max_skipped_fraction": 0.5, "workers": 1, "chunk_size": 3, "max_caption_tokens": 50, **kw}
    return prepare_coco(out, ann, images, **args)


def load_split(out: Path, split: str) -> tuple[np.ndarray, list[dict]]:
    lines = (out / split / "captions.jsonl").read_text("utf-8").splitlines()
    return np.load(out / split / "images.npy", mmap_mode="r"), [json.loads(line) for line in lines]


def split_ids(out: Path) -> dict[str, list[int]]:
    return {s: [r["image_id"] for r in load_split(out, s)[1]] for s in ("train", "val", "test")}


def test_colours_are_distinct():
    ids = range(1, 40)
    assert all(max(abs(a - b) for a, b in zip(colour(i), colour(j), strict=True)) >= 20
               for i in ids for j in ids if i < j)


def test_happy_path_shapes_alignment_manifest_and_metrics(tmp_path):
    ann, images, data = make_coco(tmp_path, range(1, 13))
    stats = prepare(tmp_path / "out", ann, images)
    out = tmp_path / "out"
    assert stats["images"] == 12 and stats["captions"] == 24
    assert stats["splits"] == {"train": 7, "val": 3, "test": 2}
    assert stats["skipped"] == dict.fromkeys(REASONS, 0) and stats["workers"] == 1
    assert stats["images_per_second"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    for split, n in stats["splits"].items():
        arr, lines = load_split(out, split)
        assert arr.shape == (n, 3, 16, 16) and arr.dtype == np.uint8
        assert [r["image_index"] for r in lines] == list(range(n))
        for row, rec in zip(arr, lines, strict=True):
            # each row is the image its captions line names
            assert np.allclose(row.reshape(3, -1).mean(axis=1), colour(rec["image_id"]), atol=4)
            assert rec["file_name"] == f"{rec['image_id']:06d}.jpg"
            assert rec["raw"] == [f"A Photo of image {rec['image_id']}, take {c}." for c in range(2)]
            assert rec["captions"][0] == ["a", "photo", "of", "image", str(rec["image_id"]), ",", "take",
                                          "0", "."]
        assert manifest["splits"][split] == {"images": n, "captions": 2 * n}
        for name in ("images.npy", "captions.jsonl"):
            digest = hashlib.sha256((out / split / name).read_bytes()).hexdigest()
            assert manifest["sha256"][f"{split}/{name}"] == digest
    assert manifest["image_size"] == 16


def test_split_is_deterministic_disjoint_and_seed_dependent(tmp_path):
    ann, images, _ = make_coco(tmp_path, range(1, 21))
    prepare(tmp_path / "a", ann, images, val=4, test=4)
    prepare(tmp_path / "b", ann, images, val=4, test=4)
    prepare(tmp_path / "c", ann, images, val=4, test=4, seed=8)
    a, b, c = split_ids(tmp_path / "a"), split_ids(tmp_path / "b"), split_ids(tmp_path / "c")
    assert a == b
    assert (tmp_path / "a" / "train" / "images.npy").read_bytes() == \
        (tmp_path / "b" / "train" / "images.npy").read_bytes()
    assert sorted(a["train"] + a["val"] + a["test"]) == list(range(1, 21))  # each image exactly once
    assert (len(a["val"]), len(a["test"])) == (4, 4)
    assert set(a["val"]) != set(c["val"])


def test_val_file_mode_train_is_main_file_and_val_file_is_divided(tmp_path):
    ann, images, _ = make_coco(tmp_path, range(1, 9), "train")
    vann, vimages, _ = make_coco(tmp_path, range(20, 30), "val")
    stats = prepare(tmp_path / "out", ann, images, val_annotations=vann, val_images=vimages, test=4)
    ids = split_ids(tmp_path / "out")
    assert sorted(ids["train"]) == list(range(1, 9))
    assert len(ids["test"]) == 4 and sorted(ids["test"] + ids["val"]) == list(range(20, 30))
    assert stats["splits"] == {"train": 8, "val": 6, "test": 4}
    arr, lines = load_split(tmp_path / "out", "val")
    for row, rec in zip(arr, lines, strict=True):
        assert np.allclose(row.reshape(3, -1).mean(axis=1), colour(rec["image_id"]), atol=4)


def test_results_identical_with_one_and_two_workers(tmp_path):
    ann, images, data = make_coco(tmp_path, range(1, 15))
    (images / "000003.jpg").write_bytes(b"")  # a skip inside a chunk exercises the cursor
    one = prepare(tmp_path / "one", ann, images, workers=1)
    two = prepare(tmp_path / "two", ann, images, workers=2)
    assert two["workers"] == 2 and one["skipped"] == two["skipped"]
    for split in ("train", "val", "test"):
        for name in ("images.npy", "captions.jsonl"):
            one_bytes = (tmp_path / "one" / split / name).read_bytes()
            assert one_bytes == (tmp_path / "two" / split / name).read_bytes()


def corrupt(images: Path, data: dict, kind: str) -> tuple[dict, str, int]:
    """Break image 5 (or its records) in one way; return the data, the expected reason and kept images."""
    path = images / "000005.jpg"
    good = path.read_bytes()
    if kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(2000))
        return data, "not_an_image", 11
    if kind == "corrupt_jpeg":
        # Scrambled entropy-coded data (end marker kept) in a noisy JPEG: libjpeg hits an invalid
        # marker. (It tolerates many corruptions, decoding garbage pixels; those cannot be detected.)
        noisy = np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)
        Image.fromarray(noisy).save(path, format="JPEG", quality=95)
        good = path.read_bytes()
        sos = good.find(b"\xff\xda") + 12
        path.write_bytes(good[:sos] + bytes(255 - b for b in good[sos:-2]) + good[-2:])
        return data, "corrupt_image", 11
    if kind in ("truncated", "zero_byte", "missing", "text_as_jpg"):
        if kind == "missing":
            path.unlink()
        else:
            path.write_bytes({"truncated": good[: len(good) - 40], "zero_byte": b"",
                              "text_as_jpg": b"hello, I am text\n"}[kind])
        return data, {"truncated": "truncated_image", "zero_byte": "empty_file", "missing": "missing_file",
                      "text_as_jpg": "not_an_image"}[kind], 11
    anns, imgs = data["annotations"], data["images"]
    first = next(a for a in anns if a["image_id"] == 5)
    if kind in ("empty_caption", "whitespace_caption", "non_string_caption", "unknown_image_id",
                "caption_without_image_id"):
        first.update({"empty_caption": {"caption": ""}, "whitespace_caption": {"caption": " \t\n "},
                      "non_string_caption": {"caption": 42}, "unknown_image_id": {"image_id": 999},
                      "caption_without_image_id": {"image_id": None}}[kind])
        return data, {"whitespace_caption": "empty_caption",
                      "caption_without_image_id": "bad_caption_record"}.get(kind, kind), 12
    if kind == "duplicate_image_id":
        imgs.append({"id": 5, "file_name": "another.jpg"})
        return data, kind, 12
    if kind == "no_valid_caption":
        data["annotations"] = [a for a in anns if a["image_id"] != 5]
        return data, kind, 11
    broken = {"image_missing_id": {"file_name": "000005.jpg"}, "image_missing_file_name": {"id": 5},
              "image_id_string": {"id": "5", "file_name": "x"}, "image_not_object": [5]}[kind]
    imgs[4] = broken  # its captions now point at an unknown id
    return data, "bad_image_record", 11


KINDS = ["random_bytes", "corrupt_jpeg", "truncated", "zero_byte", "missing", "text_as_jpg", "empty_caption",
         "whitespace_caption", "non_string_caption", "unknown_image_id", "caption_without_image_id",
         "duplicate_image_id", "no_valid_caption", "image_missing_id", "image_id_string",
         "image_missing_file_name", "image_not_object"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_bad_record_is_skipped_and_counted_under_its_reason(tmp_path, kind):
    ann, images, data = make_coco(tmp_path, range(1, 13))
    data, reason, kept = corrupt(images, data, kind)
    dump(ann, data)
    stats = prepare(tmp_path / "out", ann, images)
    assert stats["skipped"][reason] == 1
    others = {r: n for r, n in stats["skipped"].items() if r != reason}
    if kind.startswith("image_"):
        assert others == {**dict.fromkeys(others, 0), "unknown_image_id": 2}  # its two captions
    else:
        assert others == dict.fromkeys(others, 0)
    assert stats["images"] == kept
    # val and test keep their sizes: kept images fill them, a bad one shrinks train only
    assert stats["splits"] == {"train": kept - 5, "val": 3, "test": 2}
    ids = split_ids(tmp_path / "out")
    assert sorted(sum(ids.values(), [])) == sorted(set(sum(ids.values(), [])))
    if kept == 11:
        assert 5 not in sum(ids.values(), [])


def test_png_named_jpg_is_kept_as_a_valid_image(tmp_path):
    ann, images, data = make_coco(tmp_path, range(1, 8))
    Image.new("RGB", (30, 30), colour(5)).save(images / "000005.jpg", format="PNG")
    stats = prepare(tmp_path / "out", ann, images, val=1, test=1)
    assert stats["images"] == 7 and stats["skipped_images"] == 0


def test_captions_are_truncated_and_examples_name_files(tmp_path, caplog):
    ann, images, data = make_coco(tmp_path, range(1, 8))
    data["annotations"][0]["caption"] = "one two three four five six"
    (images / "000002.jpg").write_bytes(b"")
    dump(ann, data)
    stats = prepare(tmp_path / "out", ann, images, val=1, test=1, max_caption_tokens=4)
    assert stats["captions_truncated"] >= 1
    lines = [r for s in ("train", "val", "test") for r in load_split(tmp_path / "out", s)[1]]
    caps = {tuple(c) for r in lines for c in r["captions"]}
    assert ("one", "two", "three", "four") in caps and all(len(c) <= 4 for c in caps)
    assert "000002.jpg" in caplog.text and "empty_file" in caplog.text


def test_too_many_bad_images_fails_clearly_and_writes_nothing(tmp_path):
    ann, images, _ = make_coco(tmp_path, range(1, 11))
    for i in (2, 3):
        (images / f"{i:06d}.jpg").write_bytes(b"garbage")
    with pytest.raises(CocoDataError) as info:
        prepare(tmp_path / "out", ann, images, max_skipped_fraction=0.1)
    msg = str(info.value)
    assert "2 of 10" in msg and "not_an_image: 2" in msg and "000002.jpg" in msg
    assert "max_skipped_fraction" in msg
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp left behind


def test_split_sizes_that_leave_no_training_images_fail(tmp_path):
    ann, images, _ = make_coco(tmp_path, range(1, 6))
    with pytest.raises(CocoDataError, match="no training images"):
        prepare(tmp_path / "out", ann, images, val=3, test=2)
    vann, vimages, _ = make_coco(tmp_path, range(10, 13), "val")
    with pytest.raises(CocoDataError, match="test 4 exceeds the 3"):
        prepare(tmp_path / "out", ann, images, val_annotations=vann, val_images=vimages, test=4)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("content", "expected"), [
    (b'{"images": [], "annotations": [', "not valid JSON"),
    (b'{"images": [], "annotations": ["caf\xe9"]}', "not valid UTF-8"),
    (b'{"images": []}', "missing key 'annotations'"),
    (b'{"annotations": []}', "missing key 'images'"),
    (b'{"images": {}, "annotations": []}', "key 'images': expected a list, got dict"),
    (b'[1, 2]', "expected a JSON object"),
])
def test_malformed_files_name_the_file_and_field(tmp_path, content, expected):
    path = tmp_path / "captions.json"
    path.write_bytes(content)
    with pytest.raises(CocoFormatError, match=expected) as info:
        load_annotations(path)
    assert str(path) in str(info.value)
    with pytest.raises(CocoFormatError, match=expected):
        prepare(tmp_path / "out", path, tmp_path)
    assert not (tmp_path / "out").exists()


def test_missing_annotations_file_is_named(tmp_path):
    with pytest.raises(CocoFormatError, match="nope.json: captions file not found"):
        load_annotations(tmp_path / "nope.json")
