"""Render a report in headless Chromium (Debian's `chromium`): a screenshot, or the DOM after loading.

No driver: Chromium's own --screenshot and --dump-dom on a file:// URL. Every call uses a fresh
profile and turns off what would reach for the network (sync, updates, QUIC, first-run pages).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from pipeline.io import atomic_path

NAMES = ("chromium", "chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio")


def find_chromium() -> str | None:
    """The Chromium executable on PATH, or None."""
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(binary: str, page: Path, extra: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Chromium on a local page with a throw-away profile; an error names the page and Chromium's output."""
    if not page.is_file():
        raise FileNotFoundError(f"{page}: no such page to render")
    with tempfile.TemporaryDirectory(prefix="capline-chromium-") as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own group: helpers go with it on a timeout
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"{page}: Chromium did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{page}: Chromium exited {proc.returncode}: {err.strip()[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 2000, binary: str | None = None,
               timeout: float = 120.0) -> Path:
    """A PNG of the page's top `height` pixels at `width`, written to `out`."""
    binary = binary or find_chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="capline-shot-") as work:
        shot = Path(work) / "page.png"  # Chromium picks the format from the suffix
        _run(binary, Path(page), [f"--screenshot={shot}", f"--window-size={width},{height}"], timeout)
        if not shot.is_file():
            raise RuntimeError(f"{page}: Chromium wrote no screenshot")
        with atomic_path(out) as tmp:
            shutil.copyfile(shot, tmp)
    return out


def dump_dom(page: Path, binary: str | None = None, timeout: float = 120.0) -> str:
    """The page's DOM as Chromium serialises it after loading."""
    binary = binary or find_chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (Debian: apt-get install -y chromium)")
    return _run(binary, Path(page), ["--dump-dom"], timeout).stdout
