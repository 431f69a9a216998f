"""Downloads and archives are bounded: hostile servers and archive bombs cost neither disk nor a resumable mess.

A real HTTP server on 127.0.0.1 misbehaves on purpose (streams forever, announces the wrong length, hangs up
mid-body); real 1 GiB zip and tar.gz bombs of about 1 MB are refused before a byte is written. Where a test must
show that no file grew past a size, the kernel says so: RLIMIT_FSIZE fails any write past it with EFBIG (as in
test_disk_full.py). Traversal and link attacks on archives are covered by tests/data/test_download.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import struct
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from pipeline.data.archive import UnsafeArchiveError, safe_extract
from pipeline.data.download import ChecksumError, DownloadError, RemoteFile, download_files, fetch
from tests.conftest import http_server
from tests.reliability.test_disk_full import disk_full_after

MiB, GiB = 1 << 20, 1 << 30
CAP = 64 * MiB  # a "forever" server gives up here, so a client that never stops still ends the test


@dataclass
class Hostile:
    """What the server answers to GET /f: `body` with Content-Length `length` (None: no such header)."""

    body: bytes = b""
    length: int | None = None
    forever: bool = False  # after the body, send zeros until the client hangs up (or CAP bytes)
    cut_after: int | None = None  # send this many body bytes, then hang up
    ranges: bool = False  # answer "Range: bytes=N-" with 206 and the rest of `body`
    url: str = ""
    requests: list[str | None] = field(default_factory=list)  # the Range header of each request
    sent: list[int] = field(default_factory=list)  # body bytes the socket accepted, per response
    finished: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        srv: Hostile = self.server.hostile  # type: ignore[attr-defined]
        rng = self.headers.get("Range")
        srv.requests.append(rng)
        body, length = srv.body, srv.length
        if rng and srv.ranges:
            start = int(rng.removeprefix("bytes=").partition("-")[0])
            body, length = body[start:], len(body) - start
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(srv.body) - 1}/{len(srv.body)}")
        else:
            self.send_response(200)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        sent = 0
        try:
            self.wfile.write(body[: srv.cut_after])
            sent += len(body[: srv.cut_after])
            while srv.forever and sent < CAP:
                self.wfile.write(bytes(64 << 10))
                sent += 64 << 10
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up: what a well-behaved client does to a server like this
        finally:
            srv.sent.append(sent)
            srv.finished.set()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    """A misbehaving server on 127.0.0.1 at a free port; each test sets what it answers."""
    served = Hostile()
    with http_server(_Handler) as httpd:
        httpd.hostile = served  # type: ignore[attr-defined]
        served.url = f"http://127.0.0.1:{httpd.server_address[1]}/f"
        yield served


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


# -- downloads ---------------------------------------------------------------------------------------------------


def test_a_server_that_streams_forever_is_cut_off_at_the_published_size(hostile: Hostile, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    hostile.body, hostile.forever = data, True  # no Content-Length: the body ends when the server stops
    dest = tmp_path / "f.bin"
    # .part may hold the published size, never a byte more (before: it grew until the disk was full).
    with pytest.raises(ChecksumError) as err, disk_full_after(len(data)):
        fetch(hostile.url, dest, checksum=sha256(data), size=len(data))
    msg = str(err.value)
    assert msg.startswith(f"{hostile.url}: server sent more than the published 200000 bytes (stopped reading at ")
    assert "nothing kept" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # no .part to resume from
    assert hostile.finished.wait(timeout=60)
    assert hostile.sent[0] < CAP  # the client hung up; it did not read until the server gave up


@pytest.mark.parametrize("resume", [False, True], ids=["200", "206"])
def test_a_content_length_beyond_the_published_size_is_refused_before_reading(
        hostile: Hostile, tmp_path: Path, resume: bool) -> None:
    data = os.urandom(100_000)
    hostile.body, hostile.length, hostile.ranges = data + os.urandom(900_000), 1_000_000, True
    dest, part = tmp_path / "f.bin", tmp_path / "f.bin.part"
    if resume:
        part.write_bytes(data[:10_000])
    with pytest.raises(ChecksumError) as err:
        fetch(hostile.url, dest, checksum=sha256(data), size=len(data))
    sends = "990000 bytes after byte 10000" if resume else "1000000 bytes"
    wanted = "90000 to complete the published 100000" if resume else "the published 100000"
    assert str(err.value) == (f"{hostile.url}: server sends {sends} (Content-Length), expected {wanted}; "
                              "refused before reading; nothing kept")
    assert hostile.requests == ["bytes=10000-" if resume else None]
    assert list(tmp_path.iterdir()) == []  # the prefix from this server is not trusted either


def test_a_complete_but_short_answer_is_discarded_not_kept_to_resume(hostile: Hostile, tmp_path: Path) -> None:
    data = os.urandom(3000)
    hostile.body, hostile.length, hostile.ranges = data[:1000], 1000, True  # a whole, well-formed 200 answer
    dest = tmp_path / "f.bin"
    with pytest.raises(ChecksumError) as err:
        fetch(hostile.url, dest, checksum=sha256(data), size=len(data))
    assert str(err.value) == (f"{hostile.url}: server sends 1000 bytes (Content-Length), expected the published "
                              "3000; refused before reading; nothing kept")
    assert list(tmp_path.iterdir()) == []
    hostile.body, hostile.length = data, len(data)  # the server is fixed
    assert fetch(hostile.url, dest, checksum=sha256(data), size=len(data)).read_bytes() == data
    assert hostile.requests == [None, None]  # the second run started over instead of resuming a wrong prefix


def test_only_a_connection_broken_mid_body_leaves_a_part_to_resume(hostile: Hostile, tmp_path: Path) -> None:
    data = os.urandom(3000)
    hostile.body, hostile.length, hostile.ranges, hostile.cut_after = data, len(data), True, 1000
    dest, part = tmp_path / "f.bin", tmp_path / "f.bin.part"
    with pytest.raises(DownloadError) as err:
        fetch(hostile.url, dest, checksum=sha256(data), size=len(data))
    assert str(err.value) == (f"{hostile.url}: connection closed after 1000 of 3000 bytes; {part} kept, "
                              "run again to resume")
    assert part.read_bytes() == data[:1000]
    hostile.cut_after = None
    assert fetch(hostile.url, dest, checksum=sha256(data), size=len(data)).read_bytes() == data
    assert hostile.requests == [None, "bytes=1000-"]


# -- archive bombs -----------------------------------------------------------------------------------------------


def deflated_zeros(n_mib: int, prefix: bytes = b"", suffix: bytes = b"") -> tuple[bytes, int, int]:
    """Raw deflate data of prefix + n_mib MiB of zeros + suffix, with its CRC-32 and length, in ~0.2 s a GiB.

    One MiB of zeros is compressed once and its bytes repeated: after a full flush the compressor refers to
    nothing before it, so the copies decode one after another (about 1 KB a MiB, deflate's ~1:1000 limit).
    """
    comp, zeros = zlib.compressobj(9, zlib.DEFLATED, -15), bytes(MiB)
    head = comp.compress(prefix) + comp.flush(zlib.Z_FULL_FLUSH)
    block = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.compress(suffix) + comp.flush()
    crc = zlib.crc32(prefix)
    for _ in range(n_mib):
        crc = zlib.crc32(zeros, crc)
    return head + block * n_mib + tail, zlib.crc32(suffix, crc), len(prefix) + n_mib * MiB + len(suffix)


def zip_of(name: str, data: bytes, crc: int, size: int) -> bytes:
    """A one-member zip of already deflated `data` (zipfile can only write what it compresses itself)."""
    fields = (20, 0, zipfile.ZIP_DEFLATED, 0, 0, crc, len(data), size, len(name))
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields, 0) + name.encode() + data
    central = struct.pack("<IH", 0x02014B50, 20) + struct.pack("<HHHHHIIIHHHHHII", *fields, 0, 0, 0, 0, 0, 0)
    central += name.encode()
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local), 0)
    return local + central + end


@cache
def zip_bomb(n_mib: int) -> bytes:
    return zip_of("zeros.bin", *deflated_zeros(n_mib))


@cache
def tar_gz_bomb(n_mib: int) -> bytes:
    info = tarfile.TarInfo("zeros.bin")
    info.size = n_mib * MiB
    # header, the member's zeros, the two zero blocks that end a tar
    data, crc, size = deflated_zeros(n_mib, prefix=info.tobuf(), suffix=bytes(1024))
    return struct.pack("<BBBBIBB", 0x1F, 0x8B, 8, 0, 0, 0, 255) + data + struct.pack("<II", crc, size % (1 << 32))


BOMBS = {"zip": zip_bomb, "tar.gz": tar_gz_bomb}


def test_the_bombs_are_real_archives_of_zeros() -> None:
    with zipfile.ZipFile(io.BytesIO(zip_bomb(1024))) as zf, zf.open("zeros.bin") as member:
        assert zf.getinfo("zeros.bin").file_size == GiB and member.read(4 * MiB) == bytes(4 * MiB)
    with tarfile.open(fileobj=io.BytesIO(tar_gz_bomb(1024)), mode="r:gz") as tf:
        info = tf.next()
        assert info is not None and info.size == GiB
        assert tf.extractfile(info).read(4 * MiB) == bytes(4 * MiB)  # type: ignore[union-attr]
    assert len(gzip.decompress(tar_gz_bomb(4))) == 512 + 4 * MiB + 1024  # the whole stream decodes
    assert len(zip_bomb(1024)) < 1_100_000 and len(tar_gz_bomb(1024)) < 1_100_000


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_an_archive_bomb_is_refused_before_anything_is_written(tmp_path: Path, kind: str) -> None:
    archive = tmp_path / f"bomb.{kind}"
    archive.write_bytes(BOMBS[kind](1024))  # ~1 MB that unpacks to 1 GiB
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(archive, dest)
    packed = archive.stat().st_size
    assert str(err.value) == (f"{archive}: members unpack to at least {GiB} bytes (counted up to 'zeros.bin'), "
                              f"more than the {20 * packed} allowed (20x its {packed} bytes); refusing to extract")
    assert list(dest.iterdir()) == []
    assert sorted(tmp_path.iterdir()) == [archive, dest]  # no temp folder beside it either


def test_a_downloaded_bomb_is_refused_and_leaves_only_the_verified_archive(hostile: Hostile, tmp_path: Path) -> None:
    bomb = zip_bomb(1024)
    hostile.body, hostile.length = bomb, len(bomb)
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError, match=r"bomb\.zip: members unpack to at least 1073741824 bytes"):
        download_files([RemoteFile("https://example.invalid/bomb.zip", sha256(bomb), len(bomb), extract=True)],
                       dest, base_url=hostile.url.removesuffix("/f"), progress=False)
    assert sorted(p.name for p in dest.iterdir()) == ["bomb.zip"]  # no marker: a rerun refuses it again


def test_an_archive_larger_than_the_free_disk_is_refused(tmp_path: Path) -> None:
    declared = 2 * shutil.disk_usage(tmp_path).free + GiB  # twice the free space, whatever else is written
    info = tarfile.TarInfo("huge.bin")
    info.size = declared  # only the header: the data need not exist for the refusal
    archive = tmp_path / "huge.tar.gz"
    archive.write_bytes(gzip.compress(info.tobuf(format=tarfile.PAX_FORMAT)))
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError, match=rf"unpack to at least {declared} bytes .*\(the free space under "
                                                 rf"{tmp_path}\); refusing to extract"):
        safe_extract(archive, dest, max_ratio=1e15)  # the ratio alone would let it through
    assert sorted(tmp_path.iterdir()) == [archive]  # dest was not even created


def test_a_zip_member_holding_more_than_it_declares_writes_no_more(tmp_path: Path) -> None:
    data, crc, size = deflated_zeros(1)
    raw = bytearray(zip_of("liar.bin", data, crc, size))
    for header, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local and central "uncompressed size"
        struct.pack_into("<I", raw, raw.index(header) + offset, 1000)
    archive = tmp_path / "liar.zip"
    archive.write_bytes(bytes(raw))
    dest = tmp_path / "dest"
    # Were more than the declared 1000 bytes written, the kernel would stop it with EFBIG (an OSError).
    with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32 for file 'liar.bin'"), disk_full_after(1000):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []
