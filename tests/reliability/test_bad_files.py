"""prepare_coco on files that are not what they claim, and killed mid-run.

Real files, links, FIFOs and processes: a link out of the images folder, a link to /dev/zero, a FIFO, a file over
the size cap, byte-identical twins, a 13000x13000 16-bit PNG of 328 KB (169 M pixels, never decoded), and a
SIGKILL of the stage while its two decode workers are busy.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import psutil
import pytest

from pipeline.data.images import ImageSkip, load_image
from pipeline.io import claimed, remove_stale_temporaries
from pipeline.params import load_params
from stages import prepare_coco, sample
from tests.conftest import ROOT, tiny_overrides

KILL_IMAGES = 96  # 3000x3000 palette PNGs, ~0.07 s each to decode: seconds of work for two workers
WAIT_S = 60  # upper bound on waiting for a process state (never reached when things work)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zero_idat(row_bytes: int, height: int) -> bytes:
    """Compressed PNG image data: `height` rows of zeros (filter byte 0), built without holding the pixels."""
    comp = zlib.compressobj(9)
    row = bytes(row_bytes + 1)
    return b"".join(comp.compress(row) for _ in range(height)) + comp.flush()


def png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes, plte: bytes = b"") -> bytes:
    """A PNG file from its parts (colour_type 0: grey, 3: palette)."""
    head = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", head) + (_chunk(b"PLTE", plte) if plte else b"")
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 13000x13000 16-bit grey PNG: 328 KB on disk, 169 M pixels (decoding it took 1.9 GB and 28 s)."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    path.write_bytes(png(13000, 13000, 16, 0, zero_idat(2 * 13000, 13000)))
    return path


def test_a_huge_png_is_refused_from_its_header_even_without_our_cap(huge_png):
    assert huge_png.stat().st_size < 400_000
    with pytest.raises(ImageSkip, match="DecompressionBombWarning") as info:
        load_image(huge_png, 8)  # a user's own file: Pillow's limit (89 M pixels) still holds, as a skip
    assert info.value.reason == "too_many_pixels"


def add_image(data: dict, image_id: int, file_name: str) -> None:
    data["images"].append({"id": image_id, "file_name": file_name})
    data["annotations"].append({"id": 10 * image_id, "image_id": image_id, "caption": f"a bad file {image_id}"})


def test_the_stage_skips_every_kind_of_bad_file_and_counts_it_in_its_metrics(tmp_path, huge_png, caplog):
    over = {**tiny_overrides(tmp_path), "prepare_coco.workers": 2, "prepare_coco.max_skipped_fraction": 0.5}
    sample.run(load_params(ROOT / "params.yaml", over))
    images, ann = Path(over["data.coco.images"]), Path(over["data.coco.annotations"])
    data = json.loads(ann.read_text())
    first, second = (images / data["images"][i]["file_name"] for i in (0, 1))
    biggest = max(huge_png.stat().st_size, *(p.stat().st_size for p in images.iterdir()))
    outside = tmp_path / "not-images" / "private.jpg"
    outside.parent.mkdir()
    outside.write_bytes(first.read_bytes())
    bad = {
        "outside.jpg": lambda p: p.symlink_to(outside),
        "zero.jpg": lambda p: p.symlink_to("/dev/zero"),
        "fifo.jpg": lambda p: os.mkfifo(p),
        "big.jpg": lambda p: p.write_bytes(first.read_bytes() + bytes(biggest)),
        "twin.jpg": lambda p: p.write_bytes(second.read_bytes()),
        "huge.png": lambda p: p.write_bytes(huge_png.read_bytes()),
    }
    for k, (name, make) in enumerate(bad.items()):
        make(images / name)
        add_image(data, 1001 + k, name)
    ann.write_text(json.dumps(data))
    p = load_params(ROOT / "params.yaml", {**over, "prepare_coco.max_image_bytes": biggest})
    stats = prepare_coco.run(p)
    on_disk = json.loads((Path(p.paths.metrics) / "prepare_coco.json").read_text())
    assert on_disk["skipped_images"] == stats["skipped_images"] and "seconds" not in on_disk
    assert on_disk["skipped"] == {r: n for r, n in stats["skipped"].items() if n} == {  # the DVC metric: reasons seen
        "outside_images_folder": 2, "not_a_regular_file": 1, "too_large": 1, "duplicate_content": 1,
        "too_many_pixels": 1, "unknown_image_id": 2}  # the captions of the two records refused before reading
    assert stats["images"] == 24 and stats["images_in"] == 30
    assert "huge.png: 13000x13000 = 169,000,000 pixels, more than max_image_pixels 40,000,000" in caplog.text


def test_only_stale_temporaries_of_the_output_itself_are_removed(tmp_path):
    out = tmp_path / "coco"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # a finished process: its set-aside copy is stale
    stale = [tmp_path / ".coco.k3j4h5g6.tmp", tmp_path / ".coco.abcdefgh.tmp", tmp_path / f".coco.old-{dead}"]
    stale[0].mkdir()
    (stale[0] / ".capline-decode-x.u8").write_bytes(b"x")
    stale[1].write_text("half a file")
    stale[2].mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    link = tmp_path / ".coco.linklink.tmp"
    link.symlink_to(target)  # the link goes, never what it points to
    held = tmp_path / ".coco.zzzzzzzz.tmp"  # a live run's temporary
    held.mkdir()
    live_old = tmp_path / f".coco.old-{os.getpid()}"
    live_old.mkdir()
    others = [".coco.tmp", "coco.abcdefgh.tmp", ".cocoa.abcdefgh.tmp", ".coco.v2.abcdefgh.tmp",
              ".coco.abcdefgh.tmp.keep", ".vocab.abcdefgh.tmp", ".coco.old-x"]
    for name in others:
        (tmp_path / name).write_text("not ours")
    with claimed(held):
        removed = remove_stale_temporaries(out)
    assert sorted(removed) == sorted([*stale, link])
    assert not any(p.exists() or p.is_symlink() for p in removed)
    assert (target / "keep.txt").read_text() == "keep"
    assert held.is_dir() and live_old.is_dir() and out.is_dir()
    assert all((tmp_path / name).exists() for name in others)
    assert remove_stale_temporaries(tmp_path / "missing" / "coco") == []


def heavy_coco(root: Path, n: int) -> tuple[Path, Path]:
    """n 3000x3000 single-colour palette PNGs (9 KB each, distinct colours) and their captions JSON."""
    images = root / "heavy"
    images.mkdir()
    idat = zero_idat(3000, 3000)
    data: dict = {"images": [], "annotations": []}
    for i in range(1, n + 1):
        (images / f"{i:04d}.png").write_bytes(png(3000, 3000, 8, 3, idat, bytes([i, 255 - i, 7])))
        add_image(data, i, f"{i:04d}.png")
    ann = root / "heavy.json"
    ann.write_text(json.dumps(data))
    return ann, images


def wait_for(what: str, check, proc: subprocess.Popen | None = None):
    """Poll `check` until it returns something truthy; fail naming `what` after WAIT_S (or if proc ended)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if (found := check()):
            return found
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the stage ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"gave up waiting for {what}")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def busy_workers(pid: int) -> list[psutil.Process]:
    """The stage's decode workers once both have started decoding (over a second of CPU each), else []."""
    try:
        workers = [c for c in psutil.Process(pid).children() if "spawn_main" in " ".join(c.cmdline())]
        return workers if len(workers) == 2 and all(sum(w.cpu_times()[:2]) > 1.0 for w in workers) else []
    except psutil.NoSuchProcess:
        return []


def test_a_killed_stage_leaves_no_worker_nor_staging_file_and_the_next_run_cleans_up(tmp_path, caplog):
    ann, images = heavy_coco(tmp_path, KILL_IMAGES)
    over = {**tiny_overrides(tmp_path), "data.coco.annotations": str(ann), "data.coco.images": str(images),
            "prepare_coco.workers": 2, "prepare_coco.chunk_size": 1}
    system_tmp = tmp_path / "system-tmp"  # where the staging file used to go (tempfile.gettempdir())
    system_tmp.mkdir()
    code = ("import json, sys; from pipeline.params import load_params; from stages import prepare_coco; "
            "prepare_coco.run(load_params('params.yaml', json.loads(sys.argv[1])))")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(over)], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "TMPDIR": str(system_tmp), "OMP_NUM_THREADS": "1"})
    family: list[psutil.Process] = []
    try:
        wait_for("both decode workers to be busy", lambda: busy_workers(proc.pid), proc)
        family = psutil.Process(proc.pid).children(recursive=True)  # workers and multiprocessing's helpers
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_for("every child of the killed stage to end", lambda: not any(alive(c.pid) for c in family))
    finally:
        for c in family:  # never leave a process behind, whatever happened above
            if alive(c.pid):
                c.kill()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    coco = Path(over["paths.coco"])
    assert not list(system_tmp.rglob("*capline-decode*"))
    temporaries = list(coco.parent.glob(".coco.*.tmp"))
    assert len(temporaries) == 1 and list(temporaries[0].glob(".capline-decode-*.u8"))  # the staging file: here
    assert not coco.exists()

    stats = prepare_coco.run(load_params(ROOT / "params.yaml", over))
    assert stats["images"] == KILL_IMAGES
    assert f"removed {temporaries[0]}, left by an interrupted prepare_coco run" in caplog.text
    assert sorted(p.name for p in coco.parent.iterdir()) == ["coco"]
