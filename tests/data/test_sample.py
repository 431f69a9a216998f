"""The generated shapes set: real COCO JSON and JPEGs, true captions, determinism, atomic output."""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools.coco import COCO

import pipeline.data.sample as sample
from pipeline.data.sample import describe, generate_sample, layout_shapes

ARGS = {"seed": 7, "images": 40, "image_size": 64, "jpeg_quality": 90, "min_shapes": 1, "max_shapes": 3}
SIZE_WORDS = "small|medium|large"
RELATIONS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1), "below": (1, 1)}
CLAIM = re.compile(r"(\w+) (\w+) (?:is )?(to the left of|to the right of|above|below) (?:a|the) "
                   rf"(?:(?:{SIZE_WORDS}) )?(\w+) (\w+)")
# Hue ranges (degrees) that any reader would give these names; independent of the generator's palette.
HUES = {"red": [(345, 360), (0, 15)], "orange": [(15, 40)], "yellow": [(40, 75)],
        "green": [(90, 160)], "blue": [(190, 250)], "purple": [(260, 320)]}
# Single-shape position phrases -> (row, column) third of the image holding the centre.
PLACES = {"top left corner": (0, 0), "at the top": (0, 1), "top right corner": (0, 2),
          "on the left": (1, 0), "in the middle": (1, 1), "on the right": (1, 2),
          "bottom left corner": (2, 0), "at the bottom": (2, 1), "bottom right corner": (2, 2)}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """One set for the read-only tests: (directory, the COCO JSON, returned stats)."""
    out = tmp_path_factory.mktemp("sample") / "sample"
    stats = generate_sample(out, **ARGS)
    return out, json.loads((out / "annotations" / "captions.json").read_text()), stats


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def captions_by_image(coco: dict) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for ann in coco["annotations"]:
        out.setdefault(ann["image_id"], []).append(ann["caption"])
    return out


def check_caption(caption: str, shapes: list[dict], image_size: int) -> None:
    """Every shape is named, every size and relation stated is true for the shapes' metadata."""
    text = caption.lower()
    by_look = {(s["colour"], s["kind"]): s for s in shapes}
    for s in shapes:
        assert f"{s['colour']} {s['kind']}" in text or f"{s['kind']} coloured {s['colour']}" in text, caption
    for size, colour, kind in re.findall(rf"a (?:single )?({SIZE_WORDS}) (\w+) (\w+)", text):
        if kind == "coloured":  # "a single small cross coloured purple"
            colour, kind = re.search(r"(\w+) coloured (\w+)", text).group(2, 1)
        assert by_look[(colour, kind)]["size"] == size, caption
    claims = CLAIM.findall(text)
    assert len(claims) == len(re.findall(r"left of|right of|above|below", text)), caption
    for colour_a, kind_a, rel, colour_b, kind_b in claims:
        a, b = by_look[(colour_a, kind_a)], by_look[(colour_b, kind_b)]
        axis, sign = RELATIONS[rel]
        assert sign * (a["centre"][axis] - b["centre"][axis]) > 0, (caption, a, b)
    for phrase, (row, col) in PLACES.items():
        if phrase in text:
            assert len(shapes) == 1, caption
            cx, cy = shapes[0]["centre"]
            assert (min(int(3 * cy / image_size), 2), min(int(3 * cx / image_size), 2)) == (row, col)


def test_loads_with_pycocotools_and_has_five_distinct_captions(generated):
    out, coco_json, _ = generated
    coco = COCO(str(out / "annotations" / "captions.json"))
    assert sorted(coco.getImgIds()) == list(range(1, ARGS["images"] + 1))
    for image_id in coco.getImgIds():
        captions = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        assert len(captions) == 5 and len(set(captions)) == 5
    assert len({a["id"] for a in coco_json["annotations"]}) == len(coco_json["annotations"])
    assert {"info", "licenses", "images", "annotations"} <= coco_json.keys()


def test_every_image_is_a_real_jpeg_of_the_declared_size(generated):
    out, coco, _ = generated
    names = set()
    for record in coco["images"]:
        assert record["file_name"] == f"{record['id']:012d}.jpg"
        with Image.open(out / "images" / record["file_name"]) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == (record["width"], record["height"]) == (64, 64)
            img.load()  # decodes every byte: a truncated file raises here
        names.add(record["file_name"])
    assert {p.name for p in (out / "images").iterdir()} == names


def test_shape_counts_variety_and_no_overlap(generated):
    _, coco, _ = generated
    shapes = [s for r in coco["images"] for s in r["shapes"]]
    assert all(1 <= len(r["shapes"]) <= 3 for r in coco["images"])
    assert {len(r["shapes"]) for r in coco["images"]} == {1, 2, 3}
    assert len({s["kind"] for s in shapes}) >= 4 and len({s["colour"] for s in shapes}) >= 4
    assert {s["size"] for s in shapes} == {"small", "medium", "large"}
    for r in coco["images"]:
        for i, a in enumerate(r["shapes"]):
            assert a["radius"] <= min(*a["centre"], 64 - a["centre"][0], 64 - a["centre"][1])
            for b in r["shapes"][i + 1:]:
                assert math.dist(a["centre"], b["centre"]) > a["radius"] + b["radius"]


def test_captions_state_true_sizes_relations_and_positions(generated):
    _, coco, _ = generated
    captions = captions_by_image(coco)
    relations = 0
    for record in coco["images"]:
        for caption in captions[record["id"]]:
            check_caption(caption, record["shapes"], record["width"])
            relations += len(CLAIM.findall(caption.lower()))
    assert relations > ARGS["images"]  # the check above really exercised relation claims


def test_pixel_at_each_centre_has_the_named_colour(generated):
    out, coco, _ = generated
    for record in coco["images"]:
        pixels = np.asarray(Image.open(out / "images" / record["file_name"]).convert("RGB"), dtype=float)
        for s in record["shapes"]:
            x, y = (round(v) for v in s["centre"])
            rgb = pixels[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(axis=0) / 255  # 3x3 mean
            hue, sat, _ = colorsys.rgb_to_hsv(*rgb)
            assert sat > 0.5, (record["file_name"], s)
            assert any(lo <= hue * 360 < hi for lo, hi in HUES[s["colour"]]), (record["file_name"], s, hue)


def test_vocabulary_is_small_and_stats_match_the_json(generated):
    _, coco, stats = generated
    words = {w for a in coco["annotations"] for w in re.findall(r"[a-z]+", a["caption"].lower())}
    assert len(words) < 80
    shapes = [s for r in coco["images"] for s in r["shapes"]]
    assert stats["images"] == len(coco["images"]) and stats["captions"] == 5 * len(coco["images"])
    assert stats["captions_per_image"] == 5
    assert sum(stats["kinds"].values()) == sum(stats["colours"].values()) == len(shapes)
    assert stats["sizes"]["large"] == sum(s["size"] == "large" for s in shapes)
    assert sum(int(n) * c for n, c in stats["shapes_per_image"].items()) == len(shapes)


def test_same_seed_is_byte_identical_and_another_seed_differs(tmp_path):
    args = {**ARGS, "images": 8, "image_size": 48}
    generate_sample(tmp_path / "a", **args)
    generate_sample(tmp_path / "b", **args)
    generate_sample(tmp_path / "c", **{**args, "seed": 8})
    a, b, c = (tree_hashes(tmp_path / n) for n in "abc")
    assert a == b and len(a) == 9
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a) == len(a)


def test_image_i_depends_only_on_seed_and_index(tmp_path):
    generate_sample(tmp_path / "short", **{**ARGS, "images": 3})
    generate_sample(tmp_path / "long", **{**ARGS, "images": 6})
    short, long = tree_hashes(tmp_path / "short" / "images"), tree_hashes(tmp_path / "long" / "images")
    assert short == {k: long[k] for k in short}


def test_min_equal_max_gives_exact_counts(tmp_path):
    stats = generate_sample(tmp_path / "s", **{**ARGS, "images": 6, "min_shapes": 3, "max_shapes": 3})
    assert stats["shapes_per_image"] == {"3": 6} and stats["shapes"] == 18


@pytest.mark.parametrize("bad, name", [({"min_shapes": 3, "max_shapes": 2}, "min_shapes"),
                                       ({"images": 0}, "images"), ({"image_size": 8}, "image_size")])
def test_bad_arguments_are_named_and_nothing_is_written(tmp_path, bad, name):
    with pytest.raises(ValueError, match=name):
        generate_sample(tmp_path / "s", **{**ARGS, **bad})
    assert list(tmp_path.iterdir()) == []


def test_crash_midway_keeps_the_previous_set_whole(tmp_path, monkeypatch):
    out = tmp_path / "s"
    generate_sample(out, **{**ARGS, "images": 4})
    before = tree_hashes(out)
    calls = []

    def failing_draw(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_draw(*args, **kwargs)

    real_draw = sample.draw
    monkeypatch.setattr(sample, "draw", failing_draw)
    with pytest.raises(OSError, match="disk full"):
        generate_sample(out, **{**ARGS, "images": 4, "seed": 99})
    assert tree_hashes(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary directory left behind


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(1, 3), image_size=st.sampled_from([32, 48, 96, 200]))
def test_any_layout_gets_true_distinct_captions(seed, n, image_size):
    rng = np.random.default_rng(seed)
    shapes = layout_shapes(rng, image_size, n)
    captions = describe(shapes, image_size, rng)
    assert len(shapes) == n and len(set(captions)) == 5
    for caption in captions:
        check_caption(caption, [s.to_json() for s in shapes], image_size)
