"""Generate the embedded shapes captioning set: COCO captions JSON + real JPEGs, fully offline.

Each image holds 1-3 non-overlapping coloured shapes on a lightly textured pale background and
gets five differently worded captions whose colours, kinds, sizes and spatial relations are
computed from the drawn shapes, so every caption is true. Same seed and arguments give
byte-identical output; image i depends only on (seed, i), so growing the set keeps earlier images.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.tokenize import tokenize
from pipeline.io import atomic_dir, write_json

log = logging.getLogger(__name__)

CAPTIONS_PER_IMAGE = 5
KINDS = ("circle", "square", "triangle", "diamond", "star", "cross")
# Saturated colours with well separated hues, so each stays nameable after JPEG compression.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 130, 20), "yellow": (240, 210, 20),
    "green": (30, 170, 50), "blue": (30, 70, 220), "purple": (140, 50, 180),
}
# Bounding-circle radius as a fraction of the image side: gaps between sizes stay visible.
SIZES: dict[str, float] = {"small": 0.09, "medium": 0.13, "large": 0.18}
BACKGROUNDS = ((246, 246, 246), (236, 236, 231), (241, 237, 226), (229, 233, 239))
GAP = 0.04          # minimum empty space between two shapes' bounding circles (fraction of side)
PAD = 0.02          # minimum space between a shape and the image edge
NOISE = 4           # background texture: +-NOISE grey levels per pixel

# Templates by shape count. {A} = "a small red circle", {a} = "red circle", {Rab} = relation of
# shape a to shape b. Every relation is written "<colour> <kind> [is] <relation> a|the ..." so
# tests can parse and check each claim.
TEMPLATES: dict[int, tuple[str, ...]] = {
    1: ("{A}", "there is {A} {pos_a}", "{A} on a plain background", "one shape: {A}",
        "a picture of {A} {pos_a}", "a single {size_a} {kind_a} coloured {colour_a}",
        "the image shows {A}"),
    2: ("{A} {Rab} {B}", "there is {A} {Rab} {B}", "two shapes: {A} and {B}",
        "two shapes: {A} and {B}, the {a} is {Rab} the {b}", "the image shows {A} {Rab} {B}",
        "a picture of {A} and {B}", "{A} and {B}, the {b} is {Rba} the {a}"),
    3: ("{A} {Rab} {B} and {C} {Rcb} the {b}", "three shapes: {A}, {B} and {C}",
        "there is {A} {Rab} {B}, and {C}", "the image shows {A}, {B} and {C}",
        "three shapes: {A}, {B} and {C}, the {c} is {Rca} the {a}",
        "a picture of {A} {Rac} {C} and {B}", "{A}, {B} and {C}, the {a} is {Rab} the {b}"),
}
POSITIONS = (("in the top left corner", "at the top", "in the top right corner"),
             ("on the left", "in the middle", "on the right"),
             ("in the bottom left corner", "at the bottom", "in the bottom right corner"))


@dataclass(frozen=True)
class Shape:
    """One drawn shape: centre (x right, y down) and bounding-circle radius in pixels."""

    kind: str
    colour: str
    size: str
    cx: float
    cy: float
    r: float

    def to_json(self) -> dict[str, Any]:
        """COCO-side metadata (an extra field of the image record; COCO loaders ignore it)."""
        return {"kind": self.kind, "colour": self.colour, "size": self.size,
                "centre": [self.cx, self.cy], "radius": self.r}


def layout_shapes(rng: np.random.Generator, image_size: int, n: int) -> list[Shape]:
    """Place n shapes with distinct (colour, kind) and no overlap; retry with new draws if stuck."""
    if not 1 <= n <= 3:
        raise ValueError(f"layout_shapes: n must be 1..3 (got {n})")
    for _ in range(200):
        shapes = _try_layout(rng, image_size, n)
        if shapes is not None:
            return shapes
    raise RuntimeError(f"layout_shapes: could not place {n} shapes in a {image_size}px image")


def _try_layout(rng: np.random.Generator, image_size: int, n: int) -> list[Shape] | None:
    """One attempt: pick looks, then place each shape by rejection sampling; None if stuck."""
    # Distinct (colour, kind) pairs make "the red circle" an unambiguous reference in captions.
    combos = rng.choice(len(COLOURS) * len(KINDS), size=n, replace=False)
    sizes = rng.integers(len(SIZES), size=n)
    shapes: list[Shape] = []
    for combo, size_i in zip(combos, sizes, strict=True):
        colour, kind = list(COLOURS)[combo // len(KINDS)], KINDS[combo % len(KINDS)]
        size = list(SIZES)[size_i]
        r = round(SIZES[size] * image_size, 1)
        lo, hi = r + PAD * image_size, image_size - r - PAD * image_size
        for _ in range(50):
            cx, cy = (round(float(v), 1) for v in rng.uniform(lo, hi, size=2))
            if all(math.dist((cx, cy), (s.cx, s.cy)) >= r + s.r + GAP * image_size for s in shapes):
                shapes.append(Shape(kind, colour, size, cx, cy, r))
                break
        else:
            return None
    return shapes


def relation(a: Shape, b: Shape) -> str:
    """Where a lies relative to b, along the axis where their centres differ most."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def position(s: Shape, image_size: int) -> str:
    """Which third of the image (row, column) holds the shape's centre, as a phrase."""
    row = min(int(3 * s.cy / image_size), 2)
    col = min(int(3 * s.cx / image_size), 2)
    return POSITIONS[row][col]


def describe(shapes: list[Shape], image_size: int, rng: np.random.Generator,
             count: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """`count` distinct captions from distinct templates, each with its own shape order."""
    templates = TEMPLATES[len(shapes)]
    if count > len(templates):
        raise ValueError(f"describe: at most {len(templates)} captions for {len(shapes)} shapes")
    captions: list[str] = []
    for t in rng.permutation(len(templates))[:count]:
        order = [shapes[i] for i in rng.permutation(len(shapes))]
        text = templates[t].format(**_fields(order, image_size))
        captions.append(text[0].upper() + text[1:] + ".")
    if len(set(captions)) != count:  # templates differ in fixed words, so this means a template bug
        raise RuntimeError(f"describe: duplicate captions {captions}")
    return captions


def _fields(order: list[Shape], image_size: int) -> dict[str, str]:
    """Template fields for shapes in the given order (letters a, b, c)."""
    fields: dict[str, str] = {}
    for letter, s in zip("abc", order, strict=False):
        fields[letter.upper()] = f"a {s.size} {s.colour} {s.kind}"
        fields[letter] = f"{s.colour} {s.kind}"
        fields.update({f"size_{letter}": s.size, f"colour_{letter}": s.colour,
                       f"kind_{letter}": s.kind, f"pos_{letter}": position(s, image_size)})
    for x, sx in zip("abc", order, strict=False):
        for y, sy in zip("abc", order, strict=False):
            if x != y:
                fields[f"R{x}{y}"] = relation(sx, sy)
    return fields


def draw(shapes: list[Shape], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Render shapes over a pale background with light grey noise texture."""
    base = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], dtype=np.int16)
    noise = rng.integers(-NOISE, NOISE + 1, size=(image_size, image_size, 1), dtype=np.int16)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)  # (H, W, 3)
    img = Image.fromarray(pixels, "RGB")
    pen = ImageDraw.Draw(img)
    for s in shapes:
        _draw_shape(pen, s)
    return img


def _polygon(s: Shape, radii: tuple[float, ...], offset: float) -> list[tuple[float, float]]:
    """Vertices at angles offset + 2*pi*k/len(radii) (clockwise from up), radius r*radii[k]."""
    n = len(radii)
    return [(s.cx + s.r * f * math.sin(offset + 2 * math.pi * k / n),
             s.cy - s.r * f * math.cos(offset + 2 * math.pi * k / n)) for k, f in enumerate(radii)]


def _draw_shape(pen: ImageDraw.ImageDraw, s: Shape) -> None:
    """Fill one shape inside its bounding circle; every kind covers its centre pixel."""
    fill = COLOURS[s.colour]
    if s.kind == "circle":
        r = 0.85 * s.r  # looks as big as the other kinds of the same size
        pen.ellipse((s.cx - r, s.cy - r, s.cx + r, s.cy + r), fill=fill)
    elif s.kind == "square":
        pen.polygon(_polygon(s, (1.0,) * 4, math.pi / 4), fill=fill)
    elif s.kind == "triangle":
        pen.polygon(_polygon(s, (1.0,) * 3, 0.0), fill=fill)
    elif s.kind == "diamond":
        pen.polygon(_polygon(s, (1.0, 0.6, 1.0, 0.6), 0.0), fill=fill)
    elif s.kind == "star":
        pen.polygon(_polygon(s, (1.0, 0.45) * 5, 0.0), fill=fill)
    elif s.kind == "cross":
        arm, half = 0.3 * s.r, 0.9 * s.r
        pen.rectangle((s.cx - half, s.cy - arm, s.cx + half, s.cy + arm), fill=fill)
        pen.rectangle((s.cx - arm, s.cy - half, s.cx + arm, s.cy + half), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {s.kind!r}; expected one of {KINDS}")


def _check_args(images: int, image_size: int, jpeg_quality: int, min_shapes: int, max_shapes: int) -> None:
    """Reject arguments the generator cannot honour, naming the argument."""
    checks = [("images", images >= 1, ">= 1"), ("image_size", 32 <= image_size <= 4096, "32..4096"),
              ("jpeg_quality", 1 <= jpeg_quality <= 100, "1..100"),
              ("min_shapes", 1 <= min_shapes <= 3, "1..3"), ("max_shapes", 1 <= max_shapes <= 3, "1..3"),
              ("min_shapes", min_shapes <= max_shapes, f"<= max_shapes ({max_shapes})")]
    values = {"images": images, "image_size": image_size, "jpeg_quality": jpeg_quality,
              "min_shapes": min_shapes, "max_shapes": max_shapes}
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"generate_sample: {name} must be {expected} (got {values[name]})")


def generate_sample(out_dir: str | Path, *, seed: int, images: int, image_size: int,
                    jpeg_quality: int, min_shapes: int, max_shapes: int) -> dict[str, Any]:
    """Write out_dir/annotations/captions.json and out_dir/images/*.jpg atomically; return stats."""
    _check_args(images, image_size, jpeg_quality, min_shapes, max_shapes)
    info = {"description": "capline generated shapes captions", "version": "1.0", "year": 2025,
            "contributor": "capline", "url": "", "date_created": "",
            "seed": seed, "image_size": image_size, "min_shapes": min_shapes, "max_shapes": max_shapes}
    coco: dict[str, Any] = {"info": info, "licenses": [{"id": 1, "name": "CC0 1.0 (generated)", "url": ""}],
                            "images": [], "annotations": []}
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for index in range(images):
            rng = np.random.default_rng([seed, index])  # image i depends only on (seed, i)
            shapes = layout_shapes(rng, image_size, int(rng.integers(min_shapes, max_shapes + 1)))
            captions = describe(shapes, image_size, rng)
            image_id = index + 1
            file_name = f"{image_id:012d}.jpg"
            draw(shapes, image_size, rng).save(tmp / "images" / file_name, "JPEG", quality=jpeg_quality,
                                               subsampling=0)  # 4:4:4 keeps small shapes' colours crisp
            coco["images"].append({"id": image_id, "file_name": file_name, "width": image_size,
                                   "height": image_size, "license": 1,
                                   "shapes": [s.to_json() for s in shapes]})
            for caption in captions:
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                            "caption": caption})
        write_json(tmp / "annotations" / "captions.json", coco)
    stats = sample_stats(coco, min_shapes, max_shapes)
    log.info("sample: %d images, %d captions, %d words -> %s",
             stats["images"], stats["captions"], stats["words"], out_dir)
    return stats


def sample_stats(coco: dict[str, Any], min_shapes: int = 1, max_shapes: int = 3) -> dict[str, Any]:
    """Counts for metrics: images, captions, shapes by kind/colour/size, shapes-per-image histogram."""
    shapes = [s for img in coco["images"] for s in img["shapes"]]
    per_image = Counter(len(img["shapes"]) for img in coco["images"])
    per_caption = Counter(a["image_id"] for a in coco["annotations"])
    words = {tok for a in coco["annotations"] for tok in tokenize(a["caption"])}
    n_images = len(coco["images"])
    return {
        "images": n_images,
        "captions": len(coco["annotations"]),
        "captions_per_image": len(coco["annotations"]) / n_images if n_images else 0.0,
        "min_captions_per_image": min(per_caption.values(), default=0),
        "shapes": len(shapes),
        "words": len(words),
        "kinds": {k: sum(s["kind"] == k for s in shapes) for k in KINDS},
        "colours": {c: sum(s["colour"] == c for s in shapes) for c in COLOURS},
        "sizes": {z: sum(s["size"] == z for s in shapes) for z in SIZES},
        "shapes_per_image": {str(n): per_image.get(n, 0) for n in range(min_shapes, max_shapes + 1)},
    }
