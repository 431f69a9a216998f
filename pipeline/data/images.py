"""Decode, resize and centre-crop images, in parallel, into memory-mappable uint8 arrays per split.

Memory stays bounded by a few chunks whatever the data-set size: workers decode chunks of
`chunk_size` images straight into their slot of a shared memory-mapped staging file (two slots per
worker, so no pixels are pickled back); the parent takes the chunks in order and copies each slot's
rows into an `open_memmap` file at a running cursor. Bad images are
only found while decoding, so the cursor simply does not advance for them: no holes. Each file
is created with an upper bound on its rows; only when images were skipped is it compacted into a
correctly sized file, copying bounded blocks (a prefix copy, since the rows are already packed).

Files come from folders nobody vouched for: a file is opened only after `stat` shows a regular file
(a FIFO would block `open`, a device such as /dev/zero never ends), its read is capped, and an image's
size is checked from its header before any pixel is decoded. Workers die with the parent process.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import logging
import math
import multiprocessing
import os
import signal
import stat
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.lib.format import open_memmap
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger(__name__)

DECODE_REASONS = ("missing_file", "unreadable_file", "not_a_regular_file", "too_large", "empty_file",
                  "not_an_image", "too_many_pixels", "truncated_image", "corrupt_image")
COMPACT_BLOCK_BYTES = 64 << 20  # bytes copied per block when compacting an array
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white, as a viewer shows them
Route = tuple[str, int | None]  # (split, how many kept images it takes; None = all the rest)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ImageSkip(Exception):
    """An image that cannot be used; `reason` is one of DECODE_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ImageLimits(NamedTuple):
    """Reading an untrusted images folder: paths are opened without following links (the caller passes
    resolved paths it checked), files of more than max_bytes are not read, images of more than max_pixels
    (width x height, from the header) are not decoded; None: no cap (Pillow's bomb limit still applies)."""

    max_bytes: int | None
    max_pixels: int | None


def _check_stat(st: os.stat_result, max_bytes: int | None) -> None:
    """ImageSkip unless `st` is a regular file of at most max_bytes."""
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a link" if stat.S_ISLNK(st.st_mode) else \
            "a FIFO, socket or device"
        raise ImageSkip("not_a_regular_file", f"not a regular file ({kind}); not read")
    if max_bytes is not None and st.st_size > max_bytes:
        raise ImageSkip("too_large", f"{st.st_size:,} bytes, more than max_image_bytes {max_bytes:,}; not read")


def read_file(path: str | Path, max_bytes: int | None = None, follow_links: bool = True) -> bytes:
    """A regular file's bytes (at most max_bytes); ImageSkip for anything else, before reading it.

    The type and size are checked with stat before open (open would block on a FIFO), then again on
    the open descriptor, which must be the same file (it may have been swapped in between).
    """
    try:
        st = os.stat(path) if follow_links else os.lstat(path)
    except FileNotFoundError:
        raise ImageSkip("missing_file", "file not found") from None
    except OSError as err:
        raise ImageSkip("unreadable_file", f"cannot read the file: {err.strerror or err}") from None
    _check_stat(st, max_bytes)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageSkip("missing_file", "file not found") from None
    except OSError as err:  # permissions, ELOOP (a link swapped in), an I/O error
        raise ImageSkip("unreadable_file", f"cannot read the file: {err.strerror or err}") from None
    with open(fd, "rb") as fh:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise ImageSkip("unreadable_file", "the file was replaced while being read")
        _check_stat(now, max_bytes)
        try:
            data = fh.read(-1 if max_bytes is None else max_bytes + 1)  # +1: a file that grew shows up
        except OSError as err:
            raise ImageSkip("unreadable_file", f"cannot read the file: {err.strerror or err}") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageSkip("too_large", f"more than max_image_bytes {max_bytes:,} bytes; not read further")
    if not data:
        raise ImageSkip("empty_file", "file is empty (0 bytes)")
    return data


def _too_many_pixels(err: Exception) -> ImageSkip:
    """Pillow's own decompression-bomb limit, as a skip."""
    return ImageSkip("too_many_pixels", f"not decoded: {type(err).__name__}: {err}")


def decode(data: bytes, size: int, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode (a truncated file is an error); JPEGs decode at a reduced DCT scale.

    The header's size is checked against max_pixels before any pixel is decoded (images over twice Pillow's
    bomb limit are refused by Pillow itself, from the header too).
    """
    try:
        with warnings.catch_warnings():
            # with a cap of ours, it decides (checked below, naming the size); else Pillow's warning refuses
            warnings.simplefilter("ignore" if max_pixels is not None else "error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _too_many_pixels(err) from None
    except UnidentifiedImageError:
        raise ImageSkip("not_an_image", "not an image format Pillow can identify") from None
    except MemoryError:
        raise
    except Exception as err:  # Pillow's plugins raise many types for malformed headers
        raise _decode_skip("cannot open", err) from None
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageSkip("too_many_pixels", f"{w}x{h} = {w * h:,} pixels, more than max_image_pixels "
                                           f"{max_pixels:,}; not decoded")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if im.format == "JPEG":
                _draft(im, size)
            im.load()  # the full decode: this is where truncated and broken data streams show up
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _too_many_pixels(err) from None
    except MemoryError:
        raise
    except Exception as err:
        raise _decode_skip("cannot decode", err) from None
    return im


def _decode_skip(what: str, err: Exception) -> ImageSkip:
    """truncated_image when Pillow ran out of data (in the header or the pixels), else corrupt_image."""
    truncated = isinstance(err, OSError) and "truncated" in str(err).lower()
    reason = "truncated_image" if truncated else "corrupt_image"
    return ImageSkip(reason, f"{what}: {type(err).__name__}: {err}")


def _draft(im: Image.Image, size: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the shorter side stays >= size."""
    w, h = im.size
    short = min(w, h)
    if short >= 2 * size:
        # Ask for the size whose shorter side is exactly `size`: Pillow picks the largest DCT
        # scale that still gives at least the requested size in both dimensions.
        im.draft("RGB", (math.ceil(w * size / short), math.ceil(h * size / short)))


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB whatever the mode: alpha composited onto white, 16-bit scaled down, CMYK/palette/grey converted."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: Pillow's convert would clip to 255, so scale 0..65535 to 0..255
        im = Image.fromarray((np.asarray(im, dtype=np.uint32) // 257).clip(0, 255).astype(np.uint8))
    if "transparency" in im.info or im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba)
    return im if im.mode == "RGB" else im.convert("RGB")


def resize_crop(im: Image.Image, size: int) -> Image.Image:
    """Shorter side -> size, then the centre square: one antialiased bicubic resample of the crop box."""
    w, h = im.size
    short = min(w, h)
    box = ((w - short) / 2, (h - short) / 2, (w + short) / 2, (h + short) / 2)
    return im.resize((size, size), Image.Resampling.BICUBIC, box=box)


def load_image(path: str | Path, size: int, limits: ImageLimits | None = None) -> np.ndarray:
    """One image file as a (3, size, size) uint8 RGB array, EXIF orientation applied; ImageSkip if bad.

    Without `limits` (a file the user named) links are followed and only Pillow's bomb limit applies.
    """
    if limits is None:
        im = decode(read_file(path), size)
    else:
        im = decode(read_file(path, limits.max_bytes, follow_links=False), size, limits.max_pixels)
    try:
        ImageOps.exif_transpose(im, in_place=True)
        im = resize_crop(to_rgb(im), size)
    except MemoryError:
        raise
    except Exception as err:  # an unsupported mode or broken EXIF block
        raise ImageSkip("corrupt_image", f"cannot convert: {type(err).__name__}: {err}") from None
    return np.asarray(im).transpose(2, 0, 1)  # (S, S, 3) -> (3, S, S)


class Chunk(NamedTuple):
    """Decoded images of one chunk: kept positions, their rows, and (position, reason, message) failures."""

    kept: list[int]
    rows: np.ndarray  # (len(kept), 3, S, S) uint8
    failures: list[tuple[int, str, str]]


def decode_chunk(paths: Sequence[str], size: int, start: int = 0, out: np.ndarray | None = None,
                 limits: ImageLimits | None = None) -> Chunk:
    """Decode a list of files (runs in a worker); positions are offset by `start`.

    With `out` (len(paths), 3, S, S), kept images are packed into it and the chunk carries no rows.
    """
    rows = np.empty((len(paths), 3, size, size), dtype=np.uint8) if out is None else out
    kept: list[int] = []
    failures = []
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG must fail, not decode as grey
    try:
        for i, path in enumerate(paths):
            try:
                rows[len(kept)] = load_image(path, size, limits)
                kept.append(start + i)
            except ImageSkip as skip:
                failures.append((start + i, skip.reason, str(skip)))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    if out is not None:
        return Chunk(kept, np.empty((0, 3, size, size), dtype=np.uint8), failures)
    return Chunk(kept, rows[: len(kept)].copy(), failures)  # copy: don't ship the unused tail


def decode_into(paths: Sequence[str], size: int, start: int, staging: str, shape: tuple[int, ...],
                first_row: int, limits: ImageLimits | None) -> Chunk:
    """decode_chunk into rows [first_row, first_row + len(paths)) of the shared staging file (in a worker)."""
    slots = np.memmap(staging, dtype=np.uint8, mode="r+", shape=shape)
    try:
        return decode_chunk(paths, size, start, out=slots[first_row: first_row + len(paths)], limits=limits)
    finally:
        del slots  # unmap; the parent reads the same pages through its own map


def die_with_parent(parent: int) -> None:
    """Pool initializer: end this worker when its parent dies, even by SIGKILL (it would idle forever).

    Linux: the kernel sends SIGKILL when the thread that started the worker exits (the parent's main
    thread here); elsewhere a daemon thread watches the parent id. A parent already gone: exit now.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # died before prctl took effect
        os._exit(1)


def _watch_parent(parent: int) -> None:
    """Exit the process once its parent is gone (re-parented), checking every second."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def resolve_workers(workers: int) -> int:
    """0 means one process per CPU core."""
    return workers if workers > 0 else (os.cpu_count() or 1)


class Decoder:
    """Decodes paths chunk by chunk, in order: in-process for one worker, else in a process pool whose
    workers write into slots of a staging file (2 per worker) that the parent reads back in place.

    The staging file goes in `staging_dir` (prepare_coco: its output's temporary folder, so that a killed
    run leaves it nowhere else), else in the system's temporary folder.
    """

    def __init__(self, workers: int, size: int, chunk_size: int, *, limits: ImageLimits | None = None,
                 staging_dir: str | Path | None = None):
        self.workers, self.size, self.chunk_size = resolve_workers(workers), size, chunk_size
        self.limits, self.staging_dir = limits, staging_dir
        self.pool: ProcessPoolExecutor | None = None
        self.slots = 2 * self.workers
        self.shape = (self.slots * chunk_size, 3, size, size)  # the staging file: every slot's rows
        self.staging: np.memmap | None = None
        self.staging_path = ""

    def __enter__(self) -> Decoder:
        if self.workers > 1:
            # spawn, not fork: the parent may run threads (rich's refresh, torch) that fork would copy
            ctx = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=die_with_parent,
                                            initargs=(os.getpid(),))
            fd, self.staging_path = tempfile.mkstemp(prefix=".capline-decode-", suffix=".u8", dir=self.staging_dir)
            os.close(fd)
            self.staging = np.memmap(self.staging_path, dtype=np.uint8, mode="w+", shape=self.shape)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)  # no worker writes into the staging any more
            self.staging = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.staging_path)

    def chunks(self, paths: Sequence[str]) -> Iterator[Chunk]:
        """Chunks in input order; at most two per worker are in flight, so memory stays bounded."""
        starts = iter(range(0, len(paths), self.chunk_size))
        if self.pool is None:
            for s in starts:
                yield decode_chunk(paths[s: s + self.chunk_size], self.size, s, limits=self.limits)
            return
        free = deque(range(self.slots))
        pending: deque[tuple[int, Future[Chunk]]] = deque()
        try:
            for s in starts:
                if not free:  # every slot in flight: hand out the oldest chunk, then reuse its slot
                    yield from self._hand_out(pending.popleft(), free)
                slot = free.popleft()
                pending.append((slot, self.pool.submit(decode_into, paths[s: s + self.chunk_size], self.size, s,
                                                       self.staging_path, self.shape, slot * self.chunk_size,
                                                       self.limits)))
            while pending:
                yield from self._hand_out(pending.popleft(), free)
        finally:
            for _, future in pending:
                future.cancel()

    def _hand_out(self, job: tuple[int, Future[Chunk]], free: deque[int]) -> Iterator[Chunk]:
        """Yield a finished chunk whose rows are its slot of the staging file; free the slot once consumed."""
        slot, future = job
        chunk = future.result()
        first = slot * self.chunk_size
        assert self.staging is not None
        yield chunk._replace(rows=self.staging[first: first + len(chunk.kept)])  # a view: consume before resuming
        free.append(slot)


class RowWriter:
    """Appends uint8 rows to a memory-mapped .npy at a cursor; finish() compacts and renames into place."""

    def __init__(self, path: Path, capacity: int, size: int):
        self.path, self.capacity, self.n = path, capacity, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f".{path.name}.partial")
        self.array = open_memmap(self.tmp, mode="w+", dtype=np.uint8, shape=(capacity, 3, size, size))

    def full(self) -> bool:
        """No room for another row."""
        return self.n >= self.capacity

    def write(self, rows: np.ndarray) -> None:
        """Append rows (k, 3, S, S) at the cursor."""
        self.array[self.n: self.n + len(rows)] = rows
        self.n += len(rows)

    def finish(self) -> int:
        """Flush, shrink to the rows written (block copy) if fewer than capacity, rename; return rows."""
        self.array.flush()
        if self.n < self.capacity:
            compact = self.path.with_name(f".{self.path.name}.compact")
            out = open_memmap(compact, mode="w+", dtype=np.uint8, shape=(self.n, *self.array.shape[1:]))
            block = max(1, COMPACT_BLOCK_BYTES // max(1, self.array[0:1].nbytes))
            for s in range(0, self.n, block):
                out[s: s + block] = self.array[s: min(s + block, self.n)]
            out.flush()
            del out
            os.replace(compact, self.tmp)
        del self.array  # close the map before the rename
        os.replace(self.tmp, self.path)
        return self.n


def route_bounds(routes: Sequence[Route], n: int) -> list[int]:
    """Upper bound on each split's rows: a capped split only starts once those before it are full."""
    bounds, used = [], 0
    for _, cap in routes:
        left = max(0, n - used)
        bounds.append(left if cap is None else min(cap, left))
        used += left if cap is None else cap
    return bounds


def write_stream(decoder: Decoder, paths: Sequence[str], routes: Sequence[Route], out_dir: Path,
                 on_skip: Callable[[int, str, str], None],
                 on_progress: Callable[[int], None]) -> dict[str, list[int]]:
    """Decode `paths` in order; kept images fill the routes' splits in turn (<out_dir>/<split>/images.npy).

    Returns, per split, the indices into `paths` of its rows in array order.
    """
    writers = [RowWriter(out_dir / name / "images.npy", bound, decoder.size)
               for (name, _), bound in zip(routes, route_bounds(routes, len(paths)), strict=True)]
    kept: dict[str, list[int]] = {name: [] for name, _ in routes}
    r = 0
    for chunk in decoder.chunks(paths):
        for pos, reason, message in chunk.failures:
            on_skip(pos, reason, message)
        j = 0
        while j < len(chunk.kept):
            while writers[r].full():
                r += 1  # route_bounds guarantees a later writer has room
            take = min(writers[r].capacity - writers[r].n, len(chunk.kept) - j)
            writers[r].write(chunk.rows[j: j + take])
            kept[routes[r][0]].extend(chunk.kept[j: j + take])
            j += take
        on_progress(len(chunk.kept) + len(chunk.failures))
    for w in writers:
        w.finish()
    return kept


@contextlib.contextmanager
def progress_bar(total: int, label: str = "decoding") -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr with images/s; yields advance(n)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn())
    start = time.perf_counter()
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(label, total=total, rate="")
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            rate = done / max(time.perf_counter() - start, 1e-9)
            progress.update(task, advance=n, rate=f"{rate:,.0f} img/s")

        yield advance


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
