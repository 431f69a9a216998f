"""Image decoding: RGB conversion, orientation, crop, draft decoding, bad files, chunked writing."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.data.images import (
    Decoder,
    ImageLimits,
    ImageSkip,
    RowWriter,
    decode_chunk,
    load_image,
    route_bounds,
    write_stream,
)

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 40), (30, 40, 210)


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def halves(size: tuple[int, int], first: tuple, second: tuple, vertical: bool) -> Image.Image:
    """Left/right (vertical=True: top/bottom) halves in two colours."""
    im = Image.new("RGB", size, first)
    w, h = size
    im.paste(second, (w // 2, 0, w, h) if not vertical else (0, h // 2, w, h))
    return im


def channel_means(a: np.ndarray) -> np.ndarray:
    return a.reshape(3, -1).mean(axis=1)


def test_solid_jpeg_is_uint8_chw_with_its_colour(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_bytes(Image.new("RGB", (50, 30), RED)))
    out = load_image(path, 16)
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8
    assert np.allclose(channel_means(out), RED, atol=4)


def test_centre_crop_keeps_the_middle_of_a_wide_image(tmp_path):
    im = Image.new("RGB", (90, 30), RED)
    im.paste(GREEN, (30, 0, 60, 30))  # the centre square is green, the sides red
    path = tmp_path / "wide.png"
    im.save(path)
    out = load_image(path, 12)
    assert np.allclose(channel_means(out[:, :, 2:-2]), GREEN, atol=3)


def test_exif_orientation_is_applied(tmp_path):
    # Stored left red / right blue; orientation 6 means "rotate 90 degrees clockwise to display",
    # which puts the left half on top: the displayed image is red above blue.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    path.write_bytes(jpeg_bytes(halves((64, 32), RED, BLUE, vertical=False), exif=exif))
    out = load_image(path, 16)
    assert np.allclose(channel_means(out[:, :6, :]), RED, atol=12)
    assert np.allclose(channel_means(out[:, -6:, :]), BLUE, atol=12)


def test_grayscale_cmyk_palette_alpha_and_16bit_come_out_rgb(tmp_path):
    Image.new("L", (20, 20), 128).save(tmp_path / "grey.jpg", quality=95)
    Image.new("RGB", (20, 20), RED).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.new("RGB", (20, 20), BLUE).convert("P").save(tmp_path / "palette.png")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(tmp_path / "clear.png")  # transparent -> white
    Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16)).save(tmp_path / "deep.png")
    expected = {"grey.jpg": (128,) * 3, "cmyk.jpg": RED, "palette.png": BLUE, "clear.png": (255,) * 3,
                "deep.png": (127.5,) * 3}
    for name, colour in expected.items():
        out = load_image(tmp_path / name, 8)
        assert out.shape == (3, 8, 8), name
        assert np.allclose(channel_means(out), colour, atol=6), name


def test_draft_decoding_matches_a_full_decode(tmp_path):
    # A large smooth image: the reduced-scale JPEG decode must match a full decode + resize.
    y, x = np.mgrid[0:480, 0:640]
    arr = np.stack([x * 255 // 639, y * 255 // 479, (x + y) * 255 // 1118], axis=-1).astype(np.uint8)
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(Image.fromarray(arr)))
    out = load_image(path, 32)
    with Image.open(path) as im:
        ref = im.resize((32, 32), Image.Resampling.BICUBIC, box=(80, 0, 560, 480))
    ref = np.asarray(ref).transpose(2, 0, 1).astype(int)
    assert np.abs(out.astype(int) - ref).mean() < 3


def test_no_draft_when_it_would_decode_below_the_target(tmp_path):
    # Shorter side 100 < 2 * 64: a 1/2-scale decode would be 50 px, so the full decode must be used
    # (exactly the reference). Noise makes any reduced-scale decode visibly different.
    noise = np.random.default_rng(3).integers(0, 255, (100, 120, 3), np.uint8)
    path = tmp_path / "noise.jpg"
    path.write_bytes(jpeg_bytes(Image.fromarray(noise)))
    with Image.open(path) as im:
        ref = im.resize((64, 64), Image.Resampling.BICUBIC, box=(10, 0, 110, 100))
    assert np.array_equal(load_image(path, 64), np.asarray(ref).transpose(2, 0, 1))


def bad_files(tmp_path):
    """One file per decode failure reason (plus a good JPEG and a PNG named .jpg)."""
    good = jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)))
    sos = good.find(b"\xff\xda") + 20
    files = {
        "good.jpg": good,
        "png.jpg": png_bytes(Image.new("RGB", (9, 9), GREEN)),
        "empty.jpg": b"",
        "text.jpg": b"this is not an image\n" * 20,
        "random.jpg": np.random.default_rng(1).bytes(3000),
        "truncated.jpg": good[: len(good) // 2],
        "corrupt.jpg": good[:sos] + bytes(255 - b for b in good[sos:-2]) + good[-2:],
        "short_header.jpg": good[:300],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.jpg").mkdir()
    return {**{n: tmp_path / n for n in files}, "missing.jpg": tmp_path / "missing.jpg",
            "folder.jpg": tmp_path / "folder.jpg"}


EXPECTED_REASONS = {"empty.jpg": "empty_file", "text.jpg": "not_an_image", "random.jpg": "not_an_image",
                    "truncated.jpg": "truncated_image", "corrupt.jpg": "corrupt_image",
                    "short_header.jpg": "truncated_image",
                    "missing.jpg": "missing_file", "folder.jpg": "not_a_regular_file"}


def test_each_bad_file_is_reported_with_its_reason(tmp_path):
    paths = bad_files(tmp_path)
    names = list(paths)
    chunk = decode_chunk([str(paths[n]) for n in names], 8, start=100)
    reasons = {names[pos - 100]: reason for pos, reason, _ in chunk.failures}
    assert reasons == EXPECTED_REASONS
    # A PNG named .jpg is a valid image: Pillow reads the content, not the extension.
    assert [names[pos - 100] for pos in chunk.kept] == ["good.jpg", "png.jpg"]
    assert chunk.rows.shape == (2, 3, 8, 8)
    assert np.allclose(channel_means(chunk.rows[1]), GREEN, atol=2)


def test_truncated_jpeg_fails_even_if_pillow_was_told_to_accept_truncation(tmp_path, monkeypatch):
    paths = bad_files(tmp_path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    chunk = decode_chunk([str(paths["truncated.jpg"])], 8)
    assert [r for _, r, _ in chunk.failures] == ["truncated_image"]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_load_image_raises_imageskip_with_reason(tmp_path):
    paths = bad_files(tmp_path)
    with pytest.raises(ImageSkip, match="truncated") as info:
        load_image(paths["truncated.jpg"], 8)
    assert info.value.reason == "truncated_image"


def test_route_bounds():
    assert route_bounds([("val", 3), ("test", 2), ("train", None)], 10) == [3, 2, 5]
    assert route_bounds([("val", 3), ("test", 2), ("train", None)], 4) == [3, 1, 0]
    assert route_bounds([("test", 5), ("val", None)], 3) == [3, 0]


def test_row_writer_compacts_to_the_rows_written(tmp_path):
    w = RowWriter(tmp_path / "s" / "images.npy", 5, 4)
    rows = np.arange(3 * 48, dtype=np.uint8).reshape(3, 3, 4, 4)
    w.write(rows[:2])
    w.write(rows[2:])
    assert w.finish() == 3
    out = np.load(tmp_path / "s" / "images.npy", mmap_mode="r")
    assert out.shape == (3, 3, 4, 4) and np.array_equal(out, rows)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["images.npy"]


def coloured_files(tmp_path, n, bad=()):
    paths = []
    for i in range(n):
        p = tmp_path / f"{i}.jpg"
        if i in bad:
            p.write_bytes(b"not an image")
        else:
            p.write_bytes(jpeg_bytes(Image.new("RGB", (24, 16), (i * 9, 255 - i * 9, 100))))
        paths.append(str(p))
    return paths


@pytest.mark.parametrize(("workers", "chunk_size"), [(1, 3), (2, 3), (2, 1)])  # (2, 1): 11 chunks reuse 4 slots
def test_write_stream_fills_routes_in_order_without_holes(tmp_path, workers, chunk_size):
    paths = coloured_files(tmp_path, 11, bad={1, 4})
    skipped, progress = [], []
    with Decoder(workers, 8, chunk_size=chunk_size) as decoder:
        kept = write_stream(decoder, paths, [("val", 3), ("test", 2), ("train", None)], tmp_path / "out",
                            lambda i, r, m: skipped.append((i, r)), progress.append)
    assert not decoder.staging_path or not Path(decoder.staging_path).exists()  # the staging file is gone
    assert skipped == [(1, "not_an_image"), (4, "not_an_image")]
    assert kept == {"val": [0, 2, 3], "test": [5, 6], "train": [7, 8, 9, 10]}
    assert sum(progress) == 11
    for split, idx in kept.items():
        arr = np.load(tmp_path / "out" / split / "images.npy")
        assert arr.shape == (len(idx), 3, 8, 8)
        for row, i in zip(arr, idx, strict=True):
            assert np.allclose(channel_means(row), (i * 9, 255 - i * 9, 100), atol=4)


def test_fifos_devices_links_and_folders_are_skipped_before_they_are_opened(tmp_path):
    os.mkfifo(tmp_path / "fifo.jpg")  # open() would block: it must never be opened
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # would be read until memory runs out
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "good.jpg").write_bytes(jpeg_bytes(Image.new("RGB", (20, 20), RED)))
    (tmp_path / "link.jpg").symlink_to("good.jpg")
    names = ["fifo.jpg", "zero.jpg", "folder.jpg", "good.jpg", "link.jpg"]
    paths = [str(tmp_path / n) for n in names]
    # a file the user names: links are followed (to a device: still refused)
    chunk = decode_chunk(paths, 8)
    assert {names[p]: r for p, r, _ in chunk.failures} == dict.fromkeys(names[:3], "not_a_regular_file")
    assert [names[p] for p in chunk.kept] == ["good.jpg", "link.jpg"]
    # an untrusted folder (limits): its caller resolved the paths, so a link found here is refused
    chunk = decode_chunk(paths, 8, limits=ImageLimits(1 << 20, 10_000))
    reasons = {names[p]: r for p, r, _ in chunk.failures}
    assert reasons == {**dict.fromkeys(names[:3], "not_a_regular_file"), "link.jpg": "not_a_regular_file"}
    assert "(a link)" in next(m for p, _, m in chunk.failures if names[p] == "link.jpg")


def test_files_over_max_bytes_are_not_read(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_bytes(Image.new("RGB", (20, 20), RED)))
    n = path.stat().st_size
    with pytest.raises(ImageSkip, match=f"{n:,} bytes, more than max_image_bytes {n - 1:,}") as info:
        load_image(path, 8, ImageLimits(n - 1, 10_000))
    assert info.value.reason == "too_large"
    assert load_image(path, 8, ImageLimits(n, 10_000)).shape == (3, 8, 8)


def test_images_over_max_pixels_are_not_decoded(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(Image.new("RGB", (100, 50), RED)))
    with pytest.raises(ImageSkip, match="100x50 = 5,000 pixels, more than max_image_pixels 4,999") as info:
        load_image(path, 8, ImageLimits(1 << 20, 4999))
    assert info.value.reason == "too_many_pixels"
    assert load_image(path, 8, ImageLimits(1 << 20, 5000)).shape == (3, 8, 8)


@pytest.mark.parametrize("side", [12, 16])  # 144 px: Pillow only warns; 256 px: it refuses (over 2 x 100)
def test_pillows_decompression_bomb_limit_is_a_skip_too(tmp_path, monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(Image.new("RGB", (side, side), RED)))
    with pytest.raises(ImageSkip, match="Decompression") as info:
        load_image(path, 8)  # no limits of ours: Pillow's still hold
    assert info.value.reason == "too_many_pixels"


def test_the_staging_file_lives_in_the_folder_it_is_given(tmp_path):
    paths = coloured_files(tmp_path, 6)
    staging = tmp_path / "staging"
    staging.mkdir()
    with Decoder(2, 8, chunk_size=2, staging_dir=staging) as decoder:
        assert Path(decoder.staging_path).parent == staging
        kept = write_stream(decoder, paths, [("train", None)], tmp_path / "out", lambda *a: None, lambda n: None)
    assert kept == {"train": list(range(6))}
    assert list(staging.iterdir()) == []  # removed on exit
