"""Safe extraction of zip and tar(.gz) archives: every member is checked before any is written.

Accepted members are plain files and directories with relative names that stay inside the
destination. Links of every kind, device files, fifos, absolute names and `..` are refused, so
a hostile archive can neither write outside the destination nor plant a link that a later
member (or a later program) follows out of it. Nor can it fill the disk: the members' declared
sizes are added up before anything is written and the archive is refused when the total is more
than `max_ratio` times its own size or more than the free space at the destination.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

# Largest unpacked/packed size ratio accepted. Measured with zipfile/tarfile (deflate): COCO's JPEG
# zips unpack to 1.00x their size, WikiText-2 text to 3.0x, tinyshakespeare 2.6x, COCO captions
# JSON 4.5x (the most compressible real member seen); a zip bomb of zeros is ~1000x. 20 leaves a 4x
# margin above real data while stopping a 1 MB archive at 20 MB instead of 1 GB.
MAX_RATIO = 20
# Small archives may exceed the ratio (headers dominate, a repetitive text fixture): up to this many
# unpacked bytes are always allowed, which no disk will miss.
MIN_BOUND = 16 << 20


class UnsafeArchiveError(ValueError):
    """A member that could escape the destination or is not a plain file or folder, or a bomb."""


def _check_name(archive: Path, name: str, root: Path) -> None:
    """Refuse absolute names, drive letters, `..` and anything that normalises outside `root`."""
    norm = name.replace("\\", "/")  # a zip made on Windows may use backslashes as separators
    if not norm or norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path")
    if ".." in PurePosixPath(norm).parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has a '..' component")
    # Lexical, not resolve(): a user may deliberately symlink a big folder into dest.
    target = os.path.normpath(root / norm)
    if os.path.commonpath([target, root]) != str(root):
        raise UnsafeArchiveError(f"{archive}: member {name!r} would land outside {root}")


def _refuse(archive: Path, name: str, what: str) -> None:
    raise UnsafeArchiveError(f"{archive}: member {name!r} is {what}; only plain files and folders "
                             "are allowed")


def _bound(archive: Path, dest_dir: Path, max_ratio: float) -> tuple[int, str]:
    """The most bytes `archive` may unpack to under `dest_dir`, and why that much."""
    packed = archive.stat().st_size  # the published size: download.fetch verified it before extraction
    bound, why = max(int(max_ratio * packed), MIN_BOUND), f"{max_ratio:g}x its {packed} bytes"
    folder = dest_dir
    while not folder.exists():  # dest_dir is created only once the archive is accepted
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < bound:
        bound, why = free, f"the free space under {folder}"
    return bound, why


class _Budget:
    """Adds up declared member sizes, refusing the archive as soon as the total passes the bound."""

    def __init__(self, archive: Path, dest_dir: Path, max_ratio: float) -> None:
        self.archive, self.total = archive, 0
        self.bound, self.why = _bound(archive, dest_dir, max_ratio)

    def add(self, name: str, size: int) -> None:
        self.total += size
        if self.total > self.bound:
            raise UnsafeArchiveError(
                f"{self.archive}: members unpack to at least {self.total} bytes (counted up to {name!r}), more "
                f"than the {self.bound} allowed ({self.why}); refusing to extract")


def _check_zip(archive: Path, zf: zipfile.ZipFile, root: Path, budget: _Budget) -> int:
    """Check every zip member; return how many there are."""
    infos = zf.infolist()
    for info in infos:
        # From the central directory, so no byte is inflated to learn it. A member whose data holds
        # more than it declares cannot write more: zipfile stops it there and fails its CRC.
        budget.add(info.filename, info.file_size)
        _check_name(archive, info.filename, root)
        mode = info.external_attr >> 16  # Unix st_mode when the zip was made on Unix, else 0
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            _refuse(archive, info.filename, "a symbolic link")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            _refuse(archive, info.filename, f"a special file (mode {oct(mode)})")
    return len(infos)


def _check_tar(archive: Path, tf: tarfile.TarFile, root: Path, budget: _Budget) -> list[tarfile.TarInfo]:
    """Check every tar member; return them."""
    members = []
    # Member by member, not getmembers(): a bomb is refused at its first big header, before the
    # gzip stream behind it is inflated. extractall copies exactly `size` bytes per member.
    for member in tf:
        members.append(member)
        budget.add(member.name, member.size)
        _check_name(archive, member.name, root)
        if member.issym() or member.islnk():
            _refuse(archive, member.name, f"a link (to {member.linkname!r})")
        if not (member.isfile() or member.isdir()):
            _refuse(archive, member.name, "a device, fifo or other special file")
    return members


def _merge(src: Path, dst: Path) -> None:
    """Move `src` onto `dst` by renames: folders merge, files replace files."""
    if src.is_dir() and dst.is_dir():
        for child in src.iterdir():
            _merge(child, dst / child.name)
        return
    if dst.exists() and (src.is_dir() or dst.is_dir()):
        kind = "folder" if src.is_dir() else "file"
        raise FileExistsError(f"{dst}: exists and the archive has a {kind} of that name")
    shutil.move(src, dst)  # a rename on one file system; copies when dst is a link elsewhere


def _clean_stale(archive: Path, dest_dir: Path) -> None:
    """Remove temp folders left by an extraction of this archive that was killed."""
    for stale in dest_dir.glob(f".{archive.name}.extracting-*"):
        log.warning("%s: removing %s left by an interrupted extraction", archive, stale)
        shutil.rmtree(stale, ignore_errors=True)


def _write_tar(tf: tarfile.TarFile, members: list[tarfile.TarInfo], tmp: Path) -> None:
    """Extract checked members; Python's `data` filter (3.11.4+) is a second guard."""
    if hasattr(tarfile, "data_filter"):
        tf.extractall(tmp, members=members, filter="data")
    else:  # pragma: no cover - Python 3.11.0-3.11.3
        tf.extractall(tmp, members=members)


def _staged(archive: Path, dest_dir: Path, write: Callable[[Path], object]) -> list[Path]:
    """Run `write(tmp)` into a temp folder inside `dest_dir`, then move its entries into place."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(archive, dest_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.extracting-", dir=dest_dir))
    try:
        write(tmp)
        tops = sorted(tmp.iterdir())
        for entry in tops:
            _merge(entry, dest_dir / entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [dest_dir / entry.name for entry in tops]


def safe_extract(archive: str | Path, dest_dir: str | Path, *, max_ratio: float = MAX_RATIO) -> list[Path]:
    """Check all members, extract into a temp folder in `dest_dir`, move in; return top-level paths."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    root = Path(os.path.abspath(dest_dir))
    # In both branches every member is checked before _staged creates anything.
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            count = _check_zip(archive, zf, root, _Budget(archive, dest_dir, max_ratio))
            tops = _staged(archive, dest_dir, zf.extractall)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tf:
            members = _check_tar(archive, tf, root, _Budget(archive, dest_dir, max_ratio))
            count = len(members)
            tops = _staged(archive, dest_dir, lambda tmp: _write_tar(tf, members, tmp))
    else:
        raise ValueError(f"{archive}: not a zip or tar archive")
    log.info("%s: extracted %d members into %s", archive, count, dest_dir)
    return tops
