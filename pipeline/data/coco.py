"""COCO captions: strict loading, per-record validation, a seeded split by image, and the prepare driver.

Output under `out_dir` (written whole, atomically): <split>/images.npy (N, 3, S, S) uint8,
<split>/captions.jsonl (one line per array row) and manifest.json (counts and sha256 of every file).

Before splitting, every image file is checked and hashed: only regular files whose resolved path lies
inside their images folder are read (no links out, no FIFOs or devices), at most max_image_bytes each,
and an image whose bytes an earlier image (lower id, main file first) already has is skipped, so that one
picture never lands in two splits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import SPLITS
from pipeline.data.images import (
    DECODE_REASONS,
    Decoder,
    ImageLimits,
    ImageSkip,
    Route,
    progress_bar,
    read_file,
    resolve_workers,
    sha256_file,
    write_stream,
)
from pipeline.io import atomic_dir, claimed, remove_stale_temporaries, write_json

log = logging.getLogger(__name__)

RECORD_REASONS = ("bad_image_record", "outside_images_folder", "duplicate_image_id", "duplicate_file_name",
                  "duplicate_content", "no_valid_caption")
CAPTION_REASONS = ("bad_caption_record", "unknown_image_id", "non_string_caption", "empty_caption")
IMAGE_REASONS = RECORD_REASONS + DECODE_REASONS  # these count towards max_skipped_fraction
REASONS = IMAGE_REASONS + CAPTION_REASONS
EXAMPLES_PER_REASON = 3
PROGRESS_EVERY = 256  # files checked per progress-bar update


class CocoFormatError(ValueError):
    """A captions file that cannot be used at all; the message names the file and the key."""


class CocoDataError(ValueError):
    """Too many bad records, or split sizes the usable images cannot meet."""


@dataclass(frozen=True)
class ImageRecord:
    """One image with its valid captions (raw and tokenised)."""

    image_id: int
    file_name: str
    path: str
    raw: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]


class Skips:
    """Skipped records counted by reason, with a few examples of each for logs and errors."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(REASONS, 0)
        self.examples: dict[str, list[str]] = {r: [] for r in REASONS}

    def add(self, reason: str, example: str) -> None:
        """Count one skipped record; keep its description if few are kept yet."""
        self.counts[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(example)

    @property
    def images(self) -> int:
        """Skipped images (the numerator of the skipped fraction)."""
        return sum(self.counts[r] for r in IMAGE_REASONS)

    @property
    def captions(self) -> int:
        """Skipped caption records."""
        return sum(self.counts[r] for r in CAPTION_REASONS)

    def describe(self) -> str:
        """One line per reason that occurred: count and examples."""
        return "\n".join(f"  {r}: {n} (e.g. {'; '.join(self.examples[r])})"
                         for r, n in self.counts.items() if n)


class HugeInt:
    """A JSON integer with more digits than Python converts (sys.get_int_max_str_digits); never a valid id."""

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {self.digits:,} digits>"


def _parse_int(text: str) -> int | HugeInt:
    """json's parse_int: a too-long integer becomes a HugeInt (a record to skip), not a ValueError for the file."""
    try:
        return int(text)
    except ValueError:
        return HugeInt(len(text.lstrip("-")))


def load_annotations(path: str | Path) -> dict[str, Any]:
    """Parse a COCO captions JSON and check its top level; CocoFormatError names the file and key."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"), parse_int=_parse_int)
    except FileNotFoundError:
        raise CocoFormatError(f"{path}: captions file not found") from None
    except OSError as err:
        raise CocoFormatError(f"{path}: cannot read the captions file: {err}") from None
    except UnicodeDecodeError as err:
        raise CocoFormatError(f"{path}: not valid UTF-8 (byte {err.start}); expected UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise CocoFormatError(f"{path}: not valid JSON: {err.msg} at line {err.lineno} "
                              f"column {err.colno}") from None
    except RecursionError:
        raise CocoFormatError(f"{path}: JSON nested too deeply (limit: about {sys.getrecursionlimit():,} "
                              f"levels); expected COCO's flat lists of records") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: expected a JSON object with keys 'images' and 'annotations', "
                              f"got {type(data).__name__}")
    for key in ("images", "annotations"):
        if key not in data:
            raise CocoFormatError(f"{path}: missing key '{key}' (expected a list of records)")
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{path}: key '{key}': expected a list, got {type(data[key]).__name__}")
    return data


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_problem(field: str, value: object) -> str | None:
    """Why `value` is not a usable integer id, or None."""
    if isinstance(value, HugeInt):
        return f"field '{field}': expected an integer of at most {sys.get_int_max_str_digits():,} digits, " \
               f"got {value!r}"
    if not _is_int(value):
        return f"field '{field}': expected an integer, got {value!r}"
    return None


def _not_utf8(text: str) -> str | None:
    """Why `text` cannot be written as UTF-8 (a lone surrogate, e.g. from a JSON \\ud800 escape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"unpaired surrogate {text[err.start]!r} at position {err.start}"
    return None


def _image_problem(entry: object) -> str | None:
    """Why an `images` entry is unusable, or None."""
    if not isinstance(entry, dict):
        return f"expected an object, got {type(entry).__name__}"
    for key in ("id", "file_name"):
        if key not in entry:
            return f"missing field '{key}'"
    bad_id = _int_problem("id", entry["id"])
    if bad_id:
        return bad_id
    name = entry["file_name"]
    if not isinstance(name, str) or not name.strip():
        return f"field 'file_name': expected a non-empty string, got {name!r}"
    bad = "embedded NUL" if "\x00" in name else _not_utf8(name)
    if bad:
        return f"field 'file_name': not a usable file name ({bad}), got {name!r}"
    if os.path.isabs(name) or ".." in Path(name).parts:
        return f"field 'file_name': expected a path inside the images folder, got {name!r}"
    return None


def _caption_problem(ann: object, known: dict[int, Any]) -> tuple[str, str] | None:
    """(reason, message) for an unusable `annotations` entry (before tokenising), or None."""
    if not isinstance(ann, dict):
        return "bad_caption_record", f"expected an object, got {type(ann).__name__}"
    bad_id = _int_problem("image_id", ann.get("image_id"))
    if bad_id:
        return "bad_caption_record", bad_id
    if ann["image_id"] not in known:
        return "unknown_image_id", f"image_id {ann['image_id']} is not a valid image of this file"
    if "caption" not in ann:
        return "bad_caption_record", "missing field 'caption'"
    if not isinstance(ann["caption"], str):
        return "non_string_caption", f"field 'caption': expected a string, got {ann['caption']!r}"
    bad = _not_utf8(ann["caption"])
    if bad:
        return "bad_caption_record", f"field 'caption': not valid Unicode text ({bad})"
    return None


def _valid_images(data: dict, path: Path, images_dir: Path, skips: Skips,
                  seen_ids: dict[int, str], seen_files: set[str]) -> list[dict]:
    """Usable image entries ({id, file_name, path}); the first of a duplicated id or file wins.

    `path` is resolved (links followed): it must lie inside the resolved images folder.
    """
    root = os.path.realpath(images_dir)
    out = []
    for k, entry in enumerate(data["images"]):
        where = f"{path}: images[{k}]"
        problem = _image_problem(entry)
        if problem:
            skips.add("bad_image_record", f"{where}: {problem}")
            continue
        image_id, name = entry["id"], entry["file_name"]
        full = os.path.realpath(images_dir / name)
        if os.path.commonpath([root, full]) != root:
            skips.add("outside_images_folder", f"{where}: {images_dir / name} leads to {full}, outside the images "
                                               f"folder {root}; not read")
        elif image_id in seen_ids:
            skips.add("duplicate_image_id", f"{where}: id {image_id} already used by {seen_ids[image_id]}")
        elif full in seen_files:
            skips.add("duplicate_file_name", f"{where}: {name} already listed under another id")
        else:
            seen_ids[image_id] = name
            seen_files.add(full)
            out.append({"id": image_id, "file_name": name, "path": full})
    return out


def _valid_captions(data: dict, path: Path, known: dict[int, Any], skips: Skips,
                    max_tokens: int) -> list[dict]:
    """Usable caption records ({id, image_id, caption, tokens}); tokens lower-cased and truncated."""
    from pipeline.data.tokenize import tokenize  # lazy: nltk costs ~1 s in every spawned worker

    out = []
    for k, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{k}]"
        problem = _caption_problem(ann, known)
        if problem:
            skips.add(problem[0], f"{where}: {problem[1]}")
            continue
        tokens = tokenize(ann["caption"], lowercase=True)
        if not tokens:
            skips.add("empty_caption", f"{where}: caption {ann['caption']!r} has no words")
            continue
        out.append({"id": k, "image_id": ann["image_id"], "caption": ann["caption"],
                    "tokens": tuple(tokens[:max_tokens]), "truncated": len(tokens) > max_tokens})
    return out


def _coco_index(images: list[dict], anns: list[dict]) -> Any:
    """A pycocotools COCO index over the validated records (its prints go to the debug log)."""
    from pycocotools.coco import COCO  # lazy, like tokenize: spawned workers re-import this module

    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        coco.createIndex()
    log.debug("pycocotools: %s", out.getvalue().strip())
    return coco


def read_coco(path: str | Path, images_dir: str | Path, skips: Skips, max_tokens: int,
              seen_ids: dict[int, str], seen_files: set[str]) -> tuple[list[ImageRecord], int, int]:
    """Validated images of one captions file sorted by id, its image entry count, truncated captions."""
    path, images_dir = Path(path), Path(images_dir)
    data = load_annotations(path)
    images = _valid_images(data, path, images_dir, skips, seen_ids, seen_files)
    by_id = {im["id"]: im for im in images}
    coco = _coco_index(images, _valid_captions(data, path, by_id, skips, max_tokens))
    records, truncated = [], 0
    for image_id in sorted(coco.getImgIds()):
        im, anns = by_id[image_id], coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        if not anns:
            skips.add("no_valid_caption", f"{path}: image {image_id} ({im['file_name']}): no valid caption")
            continue
        truncated += sum(a["truncated"] for a in anns)
        records.append(ImageRecord(image_id, im["file_name"], im["path"],
                                   tuple(a["caption"] for a in anns), tuple(a["tokens"] for a in anns)))
    return records, len(data["images"]), truncated


def _digest(path: str, max_bytes: int | None) -> str | ImageSkip:
    """sha256 of a checked image file (see images.read_file), or why it cannot be read (in a thread)."""
    try:
        return hashlib.sha256(read_file(path, max_bytes, follow_links=False)).hexdigest()
    except ImageSkip as skip:
        return skip


def check_files(records: list[ImageRecord], skips: Skips, seen: dict[str, str], max_bytes: int | None,
                workers: int) -> list[ImageRecord]:
    """Records whose file is readable (a regular file of at most max_bytes) with content no earlier one has.

    `seen` maps content hashes to the record that kept them, across calls; a duplicate's captions go with it.
    """
    out = []
    paths = [r.path for r in records]
    with ThreadPoolExecutor(resolve_workers(workers)) as pool, \
            progress_bar(len(records), "checking files") as advance:
        # threads: reading and hashing release the GIL; map keeps the input order, so the first id wins
        for n, (rec, digest) in enumerate(zip(records, pool.map(_digest, paths, [max_bytes] * len(paths)),
                                              strict=True), 1):
            if n % PROGRESS_EVERY == 0:
                advance(PROGRESS_EVERY)
            if isinstance(digest, ImageSkip):
                skips.add(digest.reason, f"{rec.path}: {digest}")
            elif digest in seen:
                skips.add("duplicate_content", f"{rec.path} (image {rec.image_id}): the same bytes as {seen[digest]}")
            else:
                seen[digest] = f"{rec.path} (image {rec.image_id})"
                out.append(rec)
        advance(len(records) % PROGRESS_EVERY)
    return out


def plan_splits(records: list[ImageRecord], val_records: list[ImageRecord] | None, val: int, test: int,
                seed: int) -> list[tuple[list[ImageRecord], list[Route]]]:
    """Decode streams and their routes: a seeded permutation of the id-sorted records.

    Kept images fill the routes in order (val, then test, then train; with a val file: its images
    fill test then val, and every image of the main file is train), so val and test get exactly
    their sizes even when some images fail to decode.
    """
    rng = np.random.default_rng(seed)
    if val_records is None:
        if val + test >= len(records):
            raise CocoDataError(f"split sizes val {val} + test {test} leave no training images "
                                f"out of {len(records)} usable images")
        order = rng.permutation(len(records))
        return [([records[i] for i in order], [("val", val), ("test", test), ("train", None)])]
    if test > len(val_records):
        raise CocoDataError(f"split size test {test} exceeds the {len(val_records)} usable images "
                            "of the validation file")
    if not records:
        raise CocoDataError("no usable training images in the main captions file")
    order = rng.permutation(len(val_records))
    return [([val_records[i] for i in order], [("test", test), ("val", None)]), (records, [("train", None)])]


def check_skipped(skips: Skips, total: int, max_fraction: float) -> None:
    """Raise CocoDataError (counts by reason, examples) once too large a fraction of images is bad."""
    if skips.images > max_fraction * total:
        raise CocoDataError(f"too many bad images: {skips.images} of {total} "
                            f"({skips.images / max(total, 1):.1%}) skipped so far, more than "
                            f"max_skipped_fraction {max_fraction:.1%} allows; by reason:\n{skips.describe()}")


def _skipper(skips: Skips, items: list[ImageRecord], total: int,
             max_fraction: float) -> Callable[[int, str, str], None]:
    """The on_skip callback for one decode stream: count, then stop early past the limit."""
    def on_skip(i: int, reason: str, message: str) -> None:
        skips.add(reason, f"{items[i].path}: {message}")
        check_skipped(skips, total, max_fraction)
    return on_skip


def _write_captions(path: Path, records: list[ImageRecord]) -> int:
    """captions.jsonl: one line per array row; return the number of captions."""
    with open(path, "w", encoding="utf-8") as fh:
        for i, r in enumerate(records):
            line = {"image_index": i, "image_id": r.image_id, "file_name": r.file_name,
                    "captions": [list(t) for t in r.tokens], "raw": list(r.raw)}
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    return sum(len(r.tokens) for r in records)


def caption_lengths(records: list[ImageRecord]) -> dict[str, int]:
    """Percentiles of the captions' lengths in tokens, <end> included (what models.captioner.max_len counts)."""
    lengths = np.array([len(t) + 1 for r in records for t in r.tokens] or [1])
    p50, p95, p99 = (int(np.ceil(np.percentile(lengths, q))) for q in (50, 95, 99))
    return {"p50": p50, "p95": p95, "p99": p99, "max": int(lengths.max())}


def read_captions(path: Path, rows: int | None = None) -> list[dict[str, Any]]:
    """captions.jsonl records, checked: one per image row (`rows` of them when given), in row order."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
            if not isinstance(rec, dict) or rec.get("image_index") != n - 1:
                raise ValueError(f"{path}:{n}: field 'image_index' must be {n - 1} (records in row order)")
            caps = rec.get("captions")
            if not isinstance(caps, list) or not all(
                    isinstance(c, list) and all(isinstance(t, str) for t in c) for c in caps):
                raise ValueError(f"{path}:{n}: field 'captions' must be a list of token lists")
            if not isinstance(rec.get("image_id"), int):
                raise ValueError(f"{path}:{n}: field 'image_id' must be an integer")
            records.append(rec)
    if rows is not None and len(records) != rows:
        raise ValueError(f"{path}: {len(records)} records but images.npy has {rows} rows")
    return records


def prepare_coco(out_dir: str | Path, annotations: str | Path, images: str | Path, *,
                 val_annotations: str | Path | None, val_images: str | Path | None, image_size: int,
                 val: int, test: int, seed: int, max_skipped_fraction: float, workers: int,
                 chunk_size: int, max_caption_tokens: int, max_image_bytes: int | None = None,
                 max_image_pixels: int | None = None) -> dict[str, Any]:
    """Validate, check and hash, split, decode and write the prepared COCO directory; return the metrics.

    max_image_bytes / max_image_pixels: larger files are not read, larger images not decoded (None: no cap
    but Pillow's own decompression-bomb limit).
    """
    for stale in remove_stale_temporaries(out_dir):
        log.warning("removed %s, left by an interrupted prepare_coco run", stale)
    skips, seen_ids, seen_files, seen_content = Skips(), {}, set(), {}
    sources = [(annotations, images)] + ([(val_annotations, val_images)] if val_annotations else [])
    read = [read_coco(a, d, skips, max_caption_tokens, seen_ids, seen_files) for a, d in sources]
    total, truncated = sum(r[1] for r in read), sum(r[2] for r in read)
    check_skipped(skips, total, max_skipped_fraction)
    start = time.perf_counter()
    checked = [check_files(r[0], skips, seen_content, max_image_bytes, workers) for r in read]
    check_seconds = time.perf_counter() - start
    check_skipped(skips, total, max_skipped_fraction)
    streams = plan_splits(checked[0], checked[1] if len(checked) > 1 else None, val, test, seed)
    decoded = sum(len(items) for items, _ in streams)
    counts: dict[str, dict[str, int]] = {}
    train_lengths: dict[str, int] = {}
    limits = ImageLimits(max_image_bytes, max_image_pixels)
    start = time.perf_counter()
    # the staging file lives in the output's temporary folder: whatever kills this run, nothing is left elsewhere
    with atomic_dir(out_dir) as tmp, claimed(tmp), \
            Decoder(workers, image_size, chunk_size, limits=limits, staging_dir=tmp) as decoder, \
            progress_bar(decoded) as advance:
        for items, routes in streams:
            on_skip = _skipper(skips, items, total, max_skipped_fraction)
            kept = write_stream(decoder, [r.path for r in items], routes, tmp, on_skip, advance)
            for split, rows in kept.items():
                caps = _write_captions(tmp / split / "captions.jsonl", [items[i] for i in rows])
                counts[split] = {"images": len(rows), "captions": caps}
                if split == "train":
                    train_lengths = caption_lengths([items[i] for i in rows])
        seconds = time.perf_counter() - start
        if counts["train"]["images"] == 0:
            raise CocoDataError("no training images left after skipping bad ones")
        files = {f"{s}/{name}": sha256_file(tmp / s / name) for s in SPLITS
                 for name in ("images.npy", "captions.jsonl")}
        write_json(tmp / "manifest.json", {"image_size": image_size, "layout": "NCHW uint8 RGB",
                                           "seed": seed, "splits": {s: counts[s] for s in SPLITS},
                                           "train_caption_tokens": train_lengths, "sha256": files})
    if skips.images or skips.captions:
        log.warning("skipped %d images and %d captions:\n%s", skips.images, skips.captions, skips.describe())
    return {
        "images": sum(c["images"] for c in counts.values()),
        "captions": sum(c["captions"] for c in counts.values()),
        "skipped": dict(skips.counts), "skipped_images": skips.images, "skipped_captions": skips.captions,
        "skipped_fraction": skips.images / max(total, 1), "images_in": total, "captions_truncated": truncated,
        "splits": {s: counts[s]["images"] for s in SPLITS}, "train_caption_tokens": train_lengths,
        "split_captions": {s: counts[s]["captions"] for s in SPLITS},
        "image_size": image_size, "check_seconds": round(check_seconds, 3), "seconds": round(seconds, 3),
        "images_per_second": round(decoded / max(seconds, 1e-9), 2), "workers": decoder.workers,
    }
