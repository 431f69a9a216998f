"""Downloads against a local HTTP server (with Range support) and archives the tests build."""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import tarfile
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from pipeline.data.download import (
    DATASETS,
    HEX_LENGTH,
    ChecksumError,
    DownloadError,
    RemoteFile,
    UnsafeArchiveError,
    download_dataset,
    download_files,
    fetch,
    parse_checksum,
    resolve_url,
    safe_extract,
)
from tests.conftest import http_server

ELSEWHERE = "https://example.invalid/some/dir"  # every test URL is redirected with base_url


@dataclass
class Server:
    """A static file server over `root`; records each request's path, Range header and body size."""

    root: Path
    url: str = ""
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    ignore_range: bool = False  # answer 200 with the whole file, like a server without Range
    cut_after: int | None = None  # send only this many body bytes, then close the connection
    no_length: bool = False  # send no Content-Length: the body ends when the connection closes

    def clear(self) -> None:
        self.requests.clear()
        self.sent.clear()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        srv: Server = self.server.served  # type: ignore[attr-defined]
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        path = srv.root / urllib.parse.unquote(self.path.lstrip("/"))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if rng and not srv.ignore_range:
            start = int(rng.removeprefix("bytes=").partition("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if not srv.no_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:
            body = body[: srv.cut_after]
        self.wfile.write(body)
        srv.sent.append(len(body))

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """Serve tmp_path/remote on 127.0.0.1 at a free port from a thread; stopped at teardown."""
    served = Server(tmp_path / "remote")
    served.root.mkdir()
    with http_server(_Handler) as httpd:
        httpd.served = served  # type: ignore[attr-defined]
        served.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        yield served


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def md5(data: bytes) -> str:
    return f"md5:{hashlib.md5(data).hexdigest()}"


def zip_bytes(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A zip of files (name -> data) and Unix symlinks (name -> target)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # Unix, so external_attr holds st_mode
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], special: list[tarfile.TarInfo] | None = None) -> bytes:
    """A tar.gz of files (name -> data) followed by any special members given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in special or []:
            tf.addfile(info)
    return buf.getvalue()


def tar_member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def publish(srv: Server, name: str, data: bytes) -> None:
    (srv.root / name).write_bytes(data)


def files_under(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under root, hidden markers excluded."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def test_resolve_url_replaces_scheme_host_and_folder() -> None:
    assert resolve_url("https://a.org/x/y/f.zip", None) == "https://a.org/x/y/f.zip"
    assert resolve_url("https://a.org/x/y/f.zip", "http://127.0.0.1:9/m/") == "http://127.0.0.1:9/m/f.zip"


def test_download_files_verifies_and_extracts_zip_tar_and_plain(server: Server, tmp_path: Path) -> None:
    zdata = zip_bytes({"images/a.txt": b"alpha", "images/sub/b.txt": b"beta"})
    tdata = tar_bytes({"text/c.txt": b"gamma"})
    plain = os.urandom(5000)
    for name, data in [("z.zip", zdata), ("t.tar.gz", tdata), ("p.bin", plain)]:
        publish(server, name, data)
    specs = [RemoteFile(f"{ELSEWHERE}/z.zip", md5(zdata), len(zdata), extract=True),
             RemoteFile(f"{ELSEWHERE}/t.tar.gz", sha256(tdata), extract=True, target="corpus"),
             RemoteFile(f"{ELSEWHERE}/p.bin", sha256(plain), len(plain), name="plain.bin")]
    dest = tmp_path / "dest"
    landed = download_files(specs, dest, base_url=server.url, progress=True)
    assert landed == [dest / "images", dest / "corpus" / "text", dest / "plain.bin"]
    assert files_under(dest) == {"images/a.txt": b"alpha", "images/sub/b.txt": b"beta",
                                 "z.zip": zdata, "corpus/text/c.txt": b"gamma",
                                 "corpus/t.tar.gz": tdata, "plain.bin": plain}
    assert (dest / ".z.zip.extracted").is_file() and (dest / "corpus" / ".t.tar.gz.extracted").is_file()
    assert not list(dest.rglob("*.part")) and not list(dest.rglob("*.extracting-*"))
    assert sorted(p for p, _ in server.requests) == ["/p.bin", "/t.tar.gz", "/z.zip"]


def test_download_dataset_uses_the_registry_and_rejects_unknown_names(server: Server,
                                                                       tmp_path: Path) -> None:
    data = b"to be or not to be\n" * 50
    publish(server, "input.txt", data)
    registry = {"toy": (RemoteFile(f"{ELSEWHERE}/input.txt", sha256(data), len(data), name="toy.txt"),)}
    out = download_dataset("toy", tmp_path / "d", base_url=server.url, progress=False, registry=registry)
    assert out == [tmp_path / "d" / "toy.txt"] and out[0].read_bytes() == data
    with pytest.raises(ValueError, match="unknown data set 'nope'.*toy"):
        download_dataset("nope", tmp_path / "d", registry=registry)


def test_checksum_mismatch_raises_and_leaves_no_file(server: Server, tmp_path: Path) -> None:
    data = os.urandom(4000)
    publish(server, "f.bin", data)
    wrong = sha256(b"something else")
    dest = tmp_path / "f.bin"
    with pytest.raises(ChecksumError) as err:
        fetch(f"{server.url}/f.bin", dest, checksum=wrong)
    msg = str(err.value)
    assert "f.bin" in msg and wrong in msg and hashlib.sha256(data).hexdigest() in msg
    assert list(tmp_path.iterdir()) == [server.root]


def test_wrong_size_raises_and_leaves_no_file(server: Server, tmp_path: Path) -> None:
    data = os.urandom(4000)
    publish(server, "f.bin", data)
    with pytest.raises(ChecksumError, match="sends 4000 bytes .*, expected the published 3000"):
        fetch(f"{server.url}/f.bin", tmp_path / "f.bin", checksum=sha256(data), size=3000)
    assert list(tmp_path.iterdir()) == [server.root]


def test_a_file_without_content_length_larger_than_published_is_cut_off(server: Server, tmp_path: Path) -> None:
    data = os.urandom(4000)
    publish(server, "f.bin", data)
    server.no_length = True
    with pytest.raises(ChecksumError, match="sent more than the published 3000 bytes"):
        fetch(f"{server.url}/f.bin", tmp_path / "f.bin", checksum=sha256(data), size=3000)
    assert list(tmp_path.iterdir()) == [server.root]


def test_resume_requests_only_the_missing_bytes(server: Server, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    half = len(data) // 2
    publish(server, "big.bin", data)
    (tmp_path / "big.bin.part").write_bytes(data[:half])
    out = fetch(f"{server.url}/big.bin", tmp_path / "big.bin", checksum=sha256(data), size=len(data))
    assert out.read_bytes() == data
    assert server.requests == [("/big.bin", f"bytes={half}-")]
    assert server.sent == [len(data) - half]
    assert not (tmp_path / "big.bin.part").exists()


def test_server_ignoring_range_still_gives_the_right_file(server: Server, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    publish(server, "big.bin", data)
    server.ignore_range = True
    (tmp_path / "big.bin.part").write_bytes(data[:80_000])
    out = fetch(f"{server.url}/big.bin", tmp_path / "big.bin", checksum=md5(data))
    assert out.read_bytes() == data
    assert server.sent == [len(data)]


def test_part_holding_the_whole_file_without_known_size(server: Server, tmp_path: Path) -> None:
    data = os.urandom(10_000)
    publish(server, "f.bin", data)
    (tmp_path / "f.bin.part").write_bytes(data)  # the server answers 416 to bytes=10000-
    out = fetch(f"{server.url}/f.bin", tmp_path / "f.bin", checksum=sha256(data))
    assert out.read_bytes() == data
    assert server.requests == [("/f.bin", "bytes=10000-"), ("/f.bin", None)]


@pytest.mark.parametrize("known_size", [True, False])
def test_connection_cut_keeps_part_and_the_rerun_resumes(server: Server, tmp_path: Path,
                                                         known_size: bool) -> None:
    data = os.urandom(250_000)
    publish(server, "big.bin", data)
    server.cut_after = 100_000
    url, dest = f"{server.url}/big.bin", tmp_path / "big.bin"
    size = len(data) if known_size else None
    with pytest.raises(DownloadError, match="kept, run again to resume"):
        fetch(url, dest, checksum=sha256(data), size=size)
    assert not dest.exists() and (tmp_path / "big.bin.part").stat().st_size == 100_000
    server.cut_after = None
    server.clear()
    assert fetch(url, dest, checksum=sha256(data), size=size).read_bytes() == data
    assert server.requests == [("/big.bin", "bytes=100000-")] and server.sent == [150_000]


def test_http_error_names_the_url(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"/missing\.bin: HTTP 404"):
        fetch(f"{server.url}/missing.bin", tmp_path / "m.bin", checksum=None)
    assert not list(tmp_path.glob("m.bin*"))


def test_finished_files_and_extractions_are_skipped(server: Server, tmp_path: Path) -> None:
    zdata = zip_bytes({"a/x.txt": b"x"})
    plain = b"plain bytes"
    publish(server, "z.zip", zdata)
    publish(server, "p.txt", plain)
    specs = [RemoteFile(f"{ELSEWHERE}/z.zip", sha256(zdata), extract=True),
             RemoteFile(f"{ELSEWHERE}/p.txt", sha256(plain))]
    dest = tmp_path / "dest"
    first = download_files(specs, dest, base_url=server.url, progress=False)
    (dest / "a" / "x.txt").write_bytes(b"edited")  # a re-extraction would overwrite this
    server.clear()
    assert download_files(specs, dest, base_url=server.url, progress=False) == first
    assert server.requests == []
    assert (dest / "a" / "x.txt").read_bytes() == b"edited"


def test_corrupt_final_file_is_downloaded_again(server: Server, tmp_path: Path) -> None:
    data = os.urandom(3000)
    publish(server, "f.bin", data)
    (tmp_path / "f.bin").write_bytes(b"not it")
    assert fetch(f"{server.url}/f.bin", tmp_path / "f.bin", checksum=sha256(data)).read_bytes() == data
    assert server.requests == [("/f.bin", None)]


def test_dropped_archive_is_not_fetched_again_after_extraction(server: Server, tmp_path: Path) -> None:
    zdata = zip_bytes({"d/y.txt": b"y"})
    publish(server, "z.zip", zdata)
    specs = [RemoteFile(f"{ELSEWHERE}/z.zip", sha256(zdata), extract=True)]
    dest = tmp_path / "dest"
    download_files(specs, dest, base_url=server.url, progress=False, keep_archives=False)
    assert files_under(dest) == {"d/y.txt": b"y"}
    server.clear()
    download_files(specs, dest, base_url=server.url, progress=False, keep_archives=False)
    assert server.requests == []


def _evil_zip_dotdot() -> bytes:
    return zip_bytes({"ok.txt": b"fine", "../evil.txt": b"pwned"})


def _evil_zip_absolute() -> bytes:
    return zip_bytes({"ok.txt": b"fine", "/tmp/capline-evil.txt": b"pwned"})


def _evil_zip_backslash() -> bytes:
    return zip_bytes({"ok.txt": b"fine", "..\\evil.txt": b"pwned"})


def _evil_zip_symlink() -> bytes:
    return zip_bytes({"ok.txt": b"fine"}, links={"link": "../../etc"})


def _evil_tar_symlink() -> bytes:
    return tar_bytes({"ok.txt": b"fine"}, [tar_member("link", tarfile.SYMTYPE, "../../outside")])


def _evil_tar_dotdot() -> bytes:
    return tar_bytes({"ok.txt": b"fine", "sub/../../evil.txt": b"pwned"})


def _evil_tar_hardlink() -> bytes:
    return tar_bytes({"ok.txt": b"fine"}, [tar_member("hard", tarfile.LNKTYPE, "/etc/passwd")])


def _evil_tar_device() -> bytes:
    return tar_bytes({"ok.txt": b"fine"}, [tar_member("dev", tarfile.CHRTYPE)])


@pytest.mark.parametrize(("make", "suffix", "member"), [
    (_evil_zip_dotdot, "zip", "../evil.txt"),
    (_evil_zip_absolute, "zip", "/tmp/capline-evil.txt"),
    (_evil_zip_backslash, "zip", "..\\evil.txt"),
    (_evil_zip_symlink, "zip", "link"),
    (_evil_tar_symlink, "tar.gz", "link"),
    (_evil_tar_dotdot, "tar.gz", "sub/../../evil.txt"),
    (_evil_tar_hardlink, "tar.gz", "hard"),
    (_evil_tar_device, "tar.gz", "dev"),
])
def test_malicious_archive_is_refused_and_writes_nothing(make, suffix: str, member: str,
                                                         tmp_path: Path) -> None:
    archive = tmp_path / f"evil.{suffix}"
    archive.write_bytes(make())
    out = tmp_path / "out"
    dest = out / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(UnsafeArchiveError, match=re.escape(f"member {member!r}")):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []  # not even ok.txt, which came first
    assert list(out.iterdir()) == [dest]
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name, "out"]


def test_malicious_download_leaves_no_marker(server: Server, tmp_path: Path) -> None:
    zdata = _evil_zip_dotdot()
    publish(server, "evil.zip", zdata)
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError, match="'../evil.txt'"):
        download_files([RemoteFile(f"{ELSEWHERE}/evil.zip", sha256(zdata), extract=True)], dest,
                       base_url=server.url, progress=False)
    assert sorted(p.name for p in dest.iterdir()) == ["evil.zip"]


def test_corrupt_archive_fails_mid_extraction_without_leftovers(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("first.txt", b"A" * 1000)
        zf.writestr("second.txt", b"B" * 1000)
    raw = bytearray(buf.getvalue())
    raw[raw.index(b"B" * 1000) + 500] ^= 0xFF  # the central directory stays valid: CRC fails on read
    archive = tmp_path / "c.zip"
    archive.write_bytes(bytes(raw))
    dest = tmp_path / "dest"
    with pytest.raises(zipfile.BadZipFile):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []  # first.txt was written only inside the removed temp folder


def test_extraction_merges_into_existing_folders(tmp_path: Path) -> None:
    first, second = tmp_path / "one.zip", tmp_path / "two.tar.gz"
    first.write_bytes(zip_bytes({"shared/a.txt": b"a"}))
    second.write_bytes(tar_bytes({"shared/b.txt": b"b"}))
    dest = tmp_path / "dest"
    assert safe_extract(first, dest) == [dest / "shared"]
    assert safe_extract(second, dest) == [dest / "shared"]
    assert files_under(dest) == {"shared/a.txt": b"a", "shared/b.txt": b"b"}


def test_not_an_archive_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "x.zip"
    bogus.write_bytes(b"plain text, not an archive")
    with pytest.raises(ValueError, match="x.zip: not a zip or tar archive"):
        safe_extract(bogus, tmp_path / "dest")


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_registry_entries_are_https_with_well_formed_checksums(name: str) -> None:
    specs = DATASETS[name]
    assert specs, name
    assert len({s.filename for s in specs}) == len(specs)
    for spec in specs:
        assert urllib.parse.urlparse(spec.url).scheme == "https", spec.url
        assert spec.checksum is not None, spec.url
        algo, digest = parse_checksum(spec.checksum)
        assert len(digest) == HEX_LENGTH[algo] and int(digest, 16) >= 0
        assert spec.size is None or (isinstance(spec.size, int) and spec.size > 0)


def test_parse_checksum_rejects_malformed_values() -> None:
    assert parse_checksum("md5:" + "A" * 32) == ("md5", "a" * 32)
    for bad in ["abc", "sha1:" + "0" * 40, "md5:" + "0" * 31, "sha256:" + "g" * 64]:
        with pytest.raises(ValueError, match="checksum"):
            parse_checksum(bad)
    with pytest.raises(ValueError, match="checksum"):
        RemoteFile("https://x.org/f", "md5:123")
