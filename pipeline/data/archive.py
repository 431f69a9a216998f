"""Safe extraction of zip and tar(.gz) archives: every member is checked before any is written.

Accepted members are plain files and directories with relative names that stay inside the
destination. Links of every kind, device files, fifos, absolute names and `..` are refused, so
a hostile archive can neither write outside the destination nor plant a link that a later
member (or a later program) follows out of it.
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


class UnsafeArchiveError(ValueError):
    """An archive member that could escape the destination, or is not a plain file or folder."""


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


def _check_zip(archive: Path, zf: zipfile.ZipFile, root: Path) -> int:
    """Check every zip member; return how many there are."""
    infos = zf.infolist()
    for info in infos:
        _check_name(archive, info.filename, root)
        mode = info.external_attr >> 16  # Unix st_mode when the zip was made on Unix, else 0
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            _refuse(archive, info.filename, "a symbolic link")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            _refuse(archive, info.filename, f"a special file (mode {oct(mode)})")
    return len(infos)


def _check_tar(archive: Path, tf: tarfile.TarFile, root: Path) -> list[tarfile.TarInfo]:
    """Check every tar member; return them."""
    members = tf.getmembers()
    for member in members:
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


def safe_extract(archive: str | Path, dest_dir: str | Path) -> list[Path]:
    """Check all members, extract into a temp folder in `dest_dir`, move in; return top-level paths."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    root = Path(os.path.abspath(dest_dir))
    # In both branches every member is checked before _staged creates anything.
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            count = _check_zip(archive, zf, root)
            tops = _staged(archive, dest_dir, zf.extractall)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tf:
            members = _check_tar(archive, tf, root)
            count = len(members)
            tops = _staged(archive, dest_dir, lambda tmp: _write_tar(tf, members, tmp))
    else:
        raise ValueError(f"{archive}: not a zip or tar archive")
    log.info("%s: extracted %d members into %s", archive, count, dest_dir)
    return tops
