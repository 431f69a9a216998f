"""Resumable, checksum-verified downloads of the public data sets capline uses, safely extracted.

Files stream to `<file>.part` (continued by an HTTP Range request after an interruption) and are
renamed to their final name only once verified, so a final name always means a correct file.
With a published size, no more than that many bytes are ever read or written: a response that
announces another size is refused before its body is read, and one that runs past it is cut off.
Only a connection broken mid-body leaves a `.part` to resume; every other wrong answer deletes it.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NoReturn

from rich import progress as rp
from rich.console import Console

from pipeline.data.archive import UnsafeArchiveError, safe_extract
from pipeline.io import read_json, write_json

__all__ = ["DATASETS", "ChecksumError", "DownloadError", "RemoteFile", "UnsafeArchiveError",
           "download_dataset", "download_files", "fetch", "parse_checksum", "resolve_url",
           "safe_extract"]

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read: memory stays constant whatever the file size (COCO train: 19 GB)
HEX_LENGTH = {"md5": 32, "sha256": 64}
USER_AGENT = "capline-download/0.1"


class DownloadError(RuntimeError):
    """A file could not be fetched; the message names the URL or file and why."""


class ChecksumError(DownloadError):
    """A downloaded file does not match its expected checksum or size."""


def parse_checksum(checksum: str) -> tuple[str, str]:
    """Split "md5:<hex>" / "sha256:<hex>" into (algorithm, lower-case hex), checking both."""
    algo, sep, digest = checksum.partition(":")
    digest = digest.lower()
    if not sep or algo not in HEX_LENGTH:
        raise ValueError(f"checksum {checksum!r}: expected 'md5:<hex>' or 'sha256:<hex>'")
    if len(digest) != HEX_LENGTH[algo] or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"checksum {checksum!r}: expected {HEX_LENGTH[algo]} hex digits for {algo}")
    return algo, digest


@dataclass(frozen=True)
class RemoteFile:
    """One file of a data set: where it is, how to verify it and where it (or its contents) lands."""

    url: str
    checksum: str | None  # "md5:<hex>" or "sha256:<hex>"; None: not verified (logged instead)
    size: int | None = None  # bytes, when published
    extract: bool = False  # unpack (zip / tar) after verification
    target: str = "."  # folder under dest, relative: the file is saved and extracted there
    name: str = ""  # local file name; "" = the last part of the URL

    def __post_init__(self) -> None:
        if self.checksum is not None:
            parse_checksum(self.checksum)
        parts = PurePosixPath(self.target).parts
        if PurePosixPath(self.target).is_absolute() or ".." in parts:
            raise ValueError(f"{self.url}: target {self.target!r} must be a relative folder without '..'")

    @property
    def filename(self) -> str:
        return self.name or PurePosixPath(urllib.parse.urlparse(self.url).path).name


# COCO publishes MD5s only (no SHA-256); these MD5s and sizes are the values quoted identically by
# PaddleDetection (ppdet/utils/download.py), intel/neural-compressor and MLPerf's COCO download
# scripts (2017) and by Salesforce LAVIS and PaddleDetection (2014); sizes are the published
# Content-Length. The bucket is addressed path-style because https://images.cocodataset.org
# presents a certificate for *.s3.amazonaws.com that does not match the dotted host name.
_COCO = "https://s3.amazonaws.com/images.cocodataset.org"

DATASETS: dict[str, tuple[RemoteFile, ...]] = {
    "coco2017": (
        RemoteFile(f"{_COCO}/zips/train2017.zip", "md5:cced6f7f71b7629ddf16f17bbcfab6b2",
                   19_336_861_798, extract=True),
        RemoteFile(f"{_COCO}/zips/val2017.zip", "md5:442b8da7639aecaf257c1dceb8ba8c80",
                   815_585_330, extract=True),
        RemoteFile(f"{_COCO}/annotations/annotations_trainval2017.zip",
                   "md5:f4bbac642086de4f52a3fdda2de5fa2c", 252_907_541, extract=True),
    ),
    "coco2014": (
        RemoteFile(f"{_COCO}/zips/train2014.zip", "md5:0da8c0bd3d6becc4dcb32757491aca88",
                   13_510_573_713, extract=True),
        RemoteFile(f"{_COCO}/zips/val2014.zip", "md5:a3d79f5ed8d289b7a7554ce06a5782b3",
                   6_645_013_297, extract=True),
        RemoteFile(f"{_COCO}/annotations/annotations_trainval2014.zip",
                   "md5:0a379cfc70b0e71301e0f377548639bd", 252_872_794, extract=True),
    ),
    # SHA-256 computed here from ../shared/data/text/tinyshakespeare.txt, recorded in its
    # SOURCES.md as byte-identical to this file at this commit (pinned so the hash cannot drift).
    "tinyshakespeare": (
        RemoteFile("https://raw.githubusercontent.com/karpathy/char-rnn/"
                   "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt",
                   "sha256:86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                   1_115_394, name="tinyshakespeare.txt"),
    ),
    # SHA-256 and size from huggingface/datasets datasets/wikitext/dataset_infos.json (taken on the
    # original research.metamind.io S3 copy, which now answers 403); wikitext.smerity.com is the
    # author's current host of the same archive. Unpacks to wikitext-2-raw/wiki.{train,valid,test}.raw.
    "wikitext2": (
        RemoteFile("https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
                   "sha256:ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
                   4_721_645, extract=True),
    ),
}


def resolve_url(url: str, base_url: str | None) -> str:
    """`url`, or with a mirror its scheme, host and folder replaced by `base_url`."""
    if base_url is None:
        return url
    return f"{base_url.rstrip('/')}/{PurePosixPath(urllib.parse.urlparse(url).path).name}"


@contextmanager
def _bar(label: str, total: int | None, done: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yield an `advance(n_bytes)` callback driving a rich progress bar (or nothing)."""
    if not enabled:
        yield lambda n: None
        return
    columns = (rp.TextColumn("{task.description}"), rp.BarColumn(), rp.DownloadColumn(),
               rp.TransferSpeedColumn(), rp.TimeRemainingColumn())
    with rp.Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(label, total=total, completed=done)
        yield lambda n: progress.advance(task, n)


def _hash_file(path: Path, hasher: hashlib._Hash) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            hasher.update(chunk)


def _request(url: str, offset: int, timeout: float) -> http.client.HTTPResponse | None:
    """GET `url` from byte `offset`; None when the server says that range is not satisfiable."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            return None
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None


def _open_resumable(url: str, part: Path, timeout: float) -> tuple[http.client.HTTPResponse, int]:
    """Open `url` continuing after the bytes already in `part`; return (response, offset)."""
    offset = part.stat().st_size if part.exists() else 0
    resp = _request(url, offset, timeout)
    if offset and resp is not None and resp.status == 206 \
            and resp.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
        log.info("%s: resuming at byte %d", part.name, offset)
        return resp, offset
    if offset:
        log.warning("%s: server did not continue at byte %d; restarting from 0", url, offset)
        if resp is None or resp.status != 200:  # 416, or not the range we asked for
            if resp is not None:
                resp.close()
            resp = _request(url, 0, timeout)
    assert resp is not None  # only a Range request is answered None
    return resp, 0  # a 200 answer: the whole file is on its way


def _discard(url: str, part: Path, problem: str) -> NoReturn:
    """Delete `part` (what this server sent is not a prefix of the file) and raise naming `url`."""
    part.unlink(missing_ok=True)
    raise ChecksumError(f"{url}: {problem}; nothing kept")


def _check_length(url: str, part: Path, status: int, offset: int, length: int, size: int) -> None:
    """Refuse, before reading it, a body whose Content-Length cannot complete the published size."""
    total = offset + length
    # A 206 may legitimately cover less than the rest (then resume again); a 200 is the whole file.
    if total > size or (status == 200 and total < size):
        sends = f"{length} bytes after byte {offset}" if offset else f"{length} bytes"
        wanted = f"{size - offset} to complete the published {size}" if offset else f"the published {size}"
        _discard(url, part, f"server sends {sends} (Content-Length), expected {wanted}; refused before reading")


def _stream(url: str, part: Path, algo: str, size: int | None, progress: bool,
            timeout: float) -> str:
    """Download into `part` (appending when the server continues it); return the hex digest."""
    hasher = hashlib.new(algo)
    if size is not None and part.exists() and part.stat().st_size == size:
        _hash_file(part, hasher)  # finished before a crash stopped the rename: only verify
        return hasher.hexdigest()
    resp, offset = _open_resumable(url, part, timeout)
    with resp:
        length = resp.headers.get("Content-Length")
        if size is not None and length and length.isdigit():
            _check_length(url, part, resp.status, offset, int(length), size)
        if offset:
            _hash_file(part, hasher)
        total = offset + int(length) if length and length.isdigit() else size
        # Without a Content-Length the body ends when the server hangs up, which may be never.
        limit = None if size is None else size - offset
        received, overflow = 0, False
        with open(part, "ab" if offset else "wb") as out, \
                _bar(part.name[: -len(".part")], total, offset, progress) as advance:
            # Ask for one byte past the limit at most: getting it proves the server sends too much.
            while chunk := resp.read(CHUNK if limit is None else min(CHUNK, limit - received + 1)):
                if limit is not None and received + len(chunk) > limit:
                    overflow = True  # not written: .part never holds more than the published size
                    break
                out.write(chunk)
                hasher.update(chunk)
                received += len(chunk)
                advance(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    if overflow:
        _discard(url, part, f"server sent more than the published {size} bytes "
                            f"(stopped reading at {offset + received + len(chunk)})")
    # http.client ends a body cut short by the server quietly, without an error: detect it here.
    if length and length.isdigit() and received < int(length):
        raise DownloadError(f"{url}: connection closed after {received} of {length} bytes; "
                            f"{part} kept, run again to resume")
    return hasher.hexdigest()


def _verify(part: Path, url: str, checksum: str | None, size: int | None, actual: str) -> None:
    """Raise ChecksumError (deleting `part`) unless it has the expected size and checksum."""
    got = part.stat().st_size
    if size is not None and got < size:
        raise DownloadError(f"{url}: incomplete, {got} of {size} bytes; {part} kept, run again to resume")
    algo, digest = parse_checksum(checksum) if checksum else ("sha256", actual)
    problem = None
    if size is not None and got != size:
        problem = f"expected {size} bytes, got {got}"
    elif actual != digest:
        problem = f"expected {checksum}, got {algo}:{actual}"
    if problem:
        part.unlink()
        raise ChecksumError(f"{part.name[: -len('.part')]}: checksum mismatch: {problem} "
                            f"(from {url}); the partial file was deleted")


def _is_complete(path: Path, checksum: str | None, size: int | None) -> bool:
    """Whether an existing final file has the expected size and checksum."""
    if size is not None and path.stat().st_size != size:
        return False
    if checksum is None:
        return True
    algo, digest = parse_checksum(checksum)
    hasher = hashlib.new(algo)
    log.info("%s: verifying existing file", path)
    _hash_file(path, hasher)
    return hasher.hexdigest() == digest


def _check_space(folder: Path, needed: int | None) -> None:
    free = shutil.disk_usage(folder).free
    if needed is not None and needed > free:
        raise DownloadError(f"{folder}: {needed} bytes needed, only {free} free")


def fetch(url: str, dest_file: str | Path, *, checksum: str | None, size: int | None = None,
          progress: bool = False, timeout: float = 60.0) -> Path:
    """Download `url` to `dest_file` via `<dest_file>.part` (resumed), verify, rename into place."""
    dest_file = Path(dest_file)
    if dest_file.exists():
        if _is_complete(dest_file, checksum, size):
            log.info("%s: already downloaded", dest_file)
            return dest_file
        log.warning("%s: does not match %s; downloading it again", dest_file, checksum or size)
        dest_file.unlink()
    dest_file.parent.mkdir(parents=True, exist_ok=True)
    part = dest_file.with_name(dest_file.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()  # longer than the file can be: not a prefix of it
        have = 0
    _check_space(dest_file.parent, None if size is None else size - have)
    algo = parse_checksum(checksum)[0] if checksum else "sha256"
    try:
        actual = _stream(url, part, algo, size, progress, timeout)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        kept = f"; {part} kept, run again to resume" if part.exists() else ""
        raise DownloadError(f"{url}: download failed: {err!r}{kept}") from err
    _verify(part, url, checksum, size, actual)
    if checksum is None:
        log.warning("%s: no checksum to verify against; sha256 is %s", dest_file.name, actual)
    os.replace(part, dest_file)
    log.info("%s: downloaded and verified", dest_file)
    return dest_file


def _fetch_and_extract(spec: RemoteFile, url: str, file: Path, progress: bool, timeout: float,
                       keep_archive: bool) -> list[Path]:
    """Download and unpack one archive unless its marker says that was done for this checksum."""
    marker = file.parent / f".{file.name}.extracted"
    try:
        done = read_json(marker)
    except (FileNotFoundError, ValueError):
        done = None
    if isinstance(done, dict) and done.get("checksum") == spec.checksum and "entries" in done:
        log.info("%s: already extracted", file)
        return [file.parent / name for name in done["entries"]]
    fetch(url, file, checksum=spec.checksum, size=spec.size, progress=progress, timeout=timeout)
    entries = safe_extract(file, file.parent)
    write_json(marker, {"archive": file.name, "checksum": spec.checksum,
                        "entries": [entry.name for entry in entries]})
    if not keep_archive:
        file.unlink()
    return entries


def download_files(specs: Sequence[RemoteFile], dest: str | Path, *, base_url: str | None = None,
                   progress: bool = True, keep_archives: bool = True,
                   timeout: float = 60.0) -> list[Path]:
    """Fetch, verify and (when asked) extract each file under `dest`; return what landed.

    A plain file contributes its own path; an archive contributes the top-level entries it unpacked.
    """
    dest = Path(dest)
    landed: list[Path] = []
    for spec in specs:
        url = resolve_url(spec.url, base_url)
        file = dest / spec.target / spec.filename
        if spec.extract:
            landed += _fetch_and_extract(spec, url, file, progress, timeout, keep_archives)
        else:
            landed.append(fetch(url, file, checksum=spec.checksum, size=spec.size,
                                progress=progress, timeout=timeout))
    return landed


def download_dataset(name: str, dest: str | Path, *, base_url: str | None = None,
                     progress: bool = True, keep_archives: bool = True, timeout: float = 60.0,
                     registry: Mapping[str, Sequence[RemoteFile]] | None = None) -> list[Path]:
    """Download the registered data set `name` into `dest` (see `download_files`)."""
    registry = DATASETS if registry is None else registry
    if name not in registry:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(sorted(registry))}")
    log.info("downloading %s into %s", name, dest)
    return download_files(registry[name], dest, base_url=base_url, progress=progress,
                          keep_archives=keep_archives, timeout=timeout)
