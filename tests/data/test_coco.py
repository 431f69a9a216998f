"""prepare_coco: strict loading, per-record validation by reason, seeded splits, aligned outputs."""

from __future__ import annotations

import hashlib
import json
import os
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
        (images / f"{i:06d}.jpg").write_bytes(f"garbage {i}".encode())  # distinct: equal bytes are duplicates
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


def test_a_link_leading_out_of_the_images_folder_is_never_read(tmp_path, caplog):
    ann, images, _ = make_coco(tmp_path, range(1, 13))
    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    Image.new("RGB", (40, 28), (250, 250, 5)).save(secret)
    (images / "000005.jpg").unlink()
    (images / "000005.jpg").symlink_to(secret)  # absolute link out
    (images / "000006.jpg").unlink()
    (images / "000006.jpg").symlink_to("../elsewhere/secret.png")  # relative link out
    (images / "000007.jpg").unlink()
    (images / "000007.jpg").symlink_to("/dev/zero")  # would be read until memory runs out
    inner = images / "sub"
    inner.mkdir()
    (images / "000008.jpg").rename(inner / "eight.jpg")
    (images / "000008.jpg").symlink_to("sub/eight.jpg")  # a link that stays inside is fine
    stats = prepare(tmp_path / "out", ann, images, val=2, test=2)
    assert stats["skipped"]["outside_images_folder"] == 3 and stats["skipped_images"] == 3
    ids = sorted(sum(split_ids(tmp_path / "out").values(), []))
    assert ids == [i for i in range(1, 13) if i not in (5, 6, 7)]
    for split in ("train", "val", "test"):  # the secret's colour is in no row
        rows = load_split(tmp_path / "out", split)[0].reshape(-1, 3, 16 * 16).mean(axis=2)
        assert not np.any(np.all(np.abs(rows - (250, 250, 5)) < 20, axis=1))
    assert f"leads to {secret.resolve()}, outside the images folder" in caplog.text


def test_fifos_devices_and_folders_named_as_images_are_skipped_unopened(tmp_path):
    ann, images, _ = make_coco(tmp_path, range(1, 13))
    (images / "000005.jpg").unlink()
    os.mkfifo(images / "000005.jpg")  # opening it to read would block the stage for ever
    (images / "000006.jpg").unlink()
    (images / "000006.jpg").mkdir()
    stats = prepare(tmp_path / "out", ann, images, workers=2)
    assert stats["skipped"]["not_a_regular_file"] == 2 and stats["skipped_images"] == 2
    assert stats["images"] == 10


def test_files_over_max_image_bytes_are_skipped_unread(tmp_path, caplog):
    ann, images, _ = make_coco(tmp_path, range(1, 13))
    sizes = [(images / f"{i:06d}.jpg").stat().st_size for i in range(1, 13)]
    big = images / "000005.jpg"
    big.write_bytes(big.read_bytes() + b"\0" * (max(sizes) + 1 - big.stat().st_size))  # still a valid JPEG
    stats = prepare(tmp_path / "out", ann, images, max_image_bytes=max(sizes))
    assert stats["skipped"]["too_large"] == 1 and stats["skipped_images"] == 1
    assert 5 not in sum(split_ids(tmp_path / "out").values(), [])
    assert f"{max(sizes) + 1:,} bytes, more than max_image_bytes {max(sizes):,}" in caplog.text
    assert prepare(tmp_path / "again", ann, images, max_image_bytes=max(sizes) + 1)["skipped_images"] == 0


def test_images_over_max_image_pixels_are_skipped_undecoded(tmp_path, caplog):
    ann, images, _ = make_coco(tmp_path, range(1, 13))  # 40x28 = 1120 pixels each
    Image.new("RGB", (40, 29), colour(5)).save(images / "000005.jpg")
    stats = prepare(tmp_path / "out", ann, images, max_image_pixels=1120, workers=2)
    assert stats["skipped"]["too_many_pixels"] == 1 and stats["skipped_images"] == 1
    assert 5 not in sum(split_ids(tmp_path / "out").values(), [])
    assert "000005.jpg: 40x29 = 1,160 pixels, more than max_image_pixels 1,120" in caplog.text


def test_byte_identical_images_are_kept_once_before_splitting(tmp_path, caplog):
    ann, images, _ = make_coco(tmp_path, range(1, 21))
    for twin in (9, 17):
        (images / f"{twin:06d}.jpg").write_bytes((images / "000003.jpg").read_bytes())
    vann, vimages, _ = make_coco(tmp_path, range(30, 40), "val")
    (vimages / "000031.jpg").write_bytes((images / "000004.jpg").read_bytes())  # across the two files
    stats = prepare(tmp_path / "out", ann, images, val_annotations=vann, val_images=vimages, test=4)
    assert stats["skipped"]["duplicate_content"] == 3 and stats["skipped_images"] == 3
    ids = split_ids(tmp_path / "out")
    kept = sum(ids.values(), [])
    assert 3 in ids["train"] and 4 in ids["train"] and not {9, 17, 31} & set(kept)  # the lowest id wins
    assert sorted(kept) == sorted(set(range(1, 21)) - {9, 17} | set(range(30, 40)) - {31})
    assert "000009.jpg (image 9): the same bytes as" in caplog.text and "000003.jpg (image 3)" in caplog.text
    # within one file the split comes after de-duplication, so twins never straddle train and val/test
    single = prepare(tmp_path / "single", ann, images, val=5, test=5)
    assert single["skipped"]["duplicate_content"] == 2 and single["splits"] == {"train": 8, "val": 5, "test": 5}


def test_an_image_id_of_5000_digits_is_a_skipped_record(tmp_path, caplog):
    ann, images, data = make_coco(tmp_path, range(1, 13))
    data["images"][4]["id"] = -1  # image 5: its id and its captions' image_id become 5,000 digits
    for a in data["annotations"]:
        if a["image_id"] == 5:
            a["image_id"] = -1
    huge = "9" * 5000
    ann.write_text(json.dumps(data).replace("-1", huge))
    stats = prepare(tmp_path / "out", ann, images)
    assert stats["skipped"]["bad_image_record"] == 1 and stats["skipped"]["bad_caption_record"] == 2
    assert stats["images"] == 11
    assert "images[4]: field 'id': expected an integer of at most 4,300 digits, got <an integer of 5,000 digits>" \
        in caplog.text
    assert huge not in caplog.text
