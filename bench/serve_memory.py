"""`python -m bench.serve_memory`: the served captioner's memory under concurrent worst-case requests.

Run after `make demo` (it serves the demo's capline-captioner@champion from params.yaml's tracking store).
Starts `capline serve captioner` on 127.0.0.1, then sends REQUESTS concurrent requests, each of
serve.max_records records of one image at serve.max_image_pixels (a square of random-noise JPEG, the
costliest to decode and to send, at the best JPEG quality whose body stays under serve.max_request_bytes),
and samples the RSS of the server's whole process tree every 50 ms.
Prints the idle and peak RSS and the body size; nothing is written.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from pipeline.params import load_params

REQUESTS = 3


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def worst_image(pixels: int, max_bytes: int, seed: int = 0) -> tuple[bytes, int]:
    """A square JPEG of random noise of at most `pixels` pixels and at most max_bytes once in base64 (noise: the
    most to send and to decode), at the highest quality that fits; (its bytes, the quality)."""
    side = math.isqrt(pixels)
    noise = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))
    for quality in (95, 90, 75, 50, 25, 10, 5, 1):
        out = io.BytesIO()
        noise.save(out, format="JPEG", quality=quality)
        if len(out.getvalue()) * 4 // 3 <= max_bytes:
            return out.getvalue(), quality
    sys.exit(f"no {side}x{side} noise JPEG fits in {max_bytes:,} bytes of base64")


def flat_png(pixels: int) -> bytes:
    """A square PNG of one colour at `pixels` pixels: tiny to send, the full image to decode (no JPEG draft)."""
    side = math.isqrt(pixels)
    out = io.BytesIO()
    Image.new("RGB", (side, side), (90, 160, 30)).save(out, format="PNG")
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"capline serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=5):
                return
        except OSError:
            time.sleep(1)
    sys.exit(f"no answer on {url}/ping after {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--image", choices=("noise-jpeg", "flat-png"), default="noise-jpeg",
                        help="noise-jpeg: the largest body; flat-png: a full decode of every image")
    args = parser.parse_args()
    p = load_params()
    records, pixels = p.serve.max_records, p.serve.max_image_pixels
    room = (p.serve.max_request_bytes - 1024) // records  # each record's share of the body cap (JSON around it)
    raw, quality = worst_image(pixels, room) if args.image == "noise-jpeg" else (flat_png(pixels), None)
    image = base64.b64encode(raw).decode("ascii")
    body = json.dumps({"dataframe_records": [{"image": image}] * records}).encode()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="capline-serve-", suffix=".log", delete=False)
    server = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "captioner", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        wait_up(url, server)
        proc = psutil.Process(server.pid)
        time.sleep(2)
        idle = tree_rss(proc)
        peak, statuses = idle, []

        def send() -> None:
            request = urllib.request.Request(url + "/invocations", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=1800) as resp:
                    statuses.append(resp.status)
            except urllib.error.HTTPError as err:
                statuses.append(err.code)

        threads = [threading.Thread(target=send) for _ in range(args.requests)]
        start = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, tree_rss(proc))
            time.sleep(0.05)
        seconds = time.monotonic() - start
    finally:
        os.killpg(server.pid, 9)
        server.wait()
    side = math.isqrt(pixels)
    print(f"served captioner: {args.requests} concurrent requests x {records} records of a {side}x{side} "
          f"{args.image} (JPEG quality {quality}); {len(body) / 2**20:.1f} MiB body each (cap "
          f"{p.serve.max_request_bytes / 2**20:.0f} MiB); statuses {statuses}; {seconds:.0f} s")
    print(f"RSS of the server's process tree: idle {idle / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB "
          f"(+{(peak - idle) / 2**20:.0f} MiB); log {Path(log.name)}")


if __name__ == "__main__":
    main()
