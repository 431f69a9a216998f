"""Bad input to the served captioner: every bad record is answered 400 with a message naming the record and
its problem, and nothing of the server (no traceback, no path); the request caps hold; the server goes on.

One real `capline serve` on 127.0.0.1 for the whole module (starting it is the slow part), with small caps:
serve.max_records=4, serve.max_image_pixels=100000, serve.max_request_bytes=262144.
"""

from __future__ import annotations

import base64
import io
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from pipeline.inference import caption_bytes
from pipeline.training.checkpoints import load_module
from tests.conftest import params_under
from tests.test_serve import post, register_captioner, start_server, stop, wait_until_up

pytestmark = pytest.mark.slow

MAX_RECORDS, MAX_PIXELS, MAX_BYTES = 4, 100_000, 262_144
SERVER_TEXT = re.compile(r"Traceback|File \"|site-packages|/tmp/|/work/|\.py\b|stack_trace")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server(prepared_params, tmp_path_factory):
    """(url, good image bytes, captioning module, params) of a served tiny captioner with small caps."""
    root = tmp_path_factory.mktemp("serve_bad_input")
    p = params_under(prepared_params, root)
    trained = register_captioner(p)
    good = sorted(Path(p.data.coco.images).glob("*.jpg"))[0].read_bytes()
    proc, url, log = start_server(p, root, f"serve.max_records={MAX_RECORDS}", f"serve.max_image_pixels={MAX_PIXELS}",
                                  f"serve.max_request_bytes={MAX_BYTES}")
    try:
        wait_until_up(proc, url, log)
        yield url, good, load_module("captioner", trained["best_checkpoint"]), p
    finally:
        stop(proc)


def answer(url: str, payload: dict | bytes) -> tuple[int, dict]:
    """(HTTP status, JSON body) of POST /invocations; an error status is an answer, not an exception."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url + "/invocations", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def records(*images: object) -> dict:
    return {"dataframe_records": [{"image": i} for i in images]}


CASES = {
    "invalid base64": (lambda good: records(b64(good), b64(good), "not base64!!"),
                       r"record 2: 'image' is not valid base64"),
    "not an image": (lambda good: records(b64(b"hello, world")),
                     r"record 0: 'image' cannot be used \(not_an_image: not an image format Pillow can identify\)"),
    "truncated image": (lambda good: records(b64(good[: len(good) // 2])),
                        r"record 0: 'image' cannot be used \((truncated|corrupt)_image: .+\)"),
    "empty image": (lambda good: records(""), r"record 0: 'image' is empty"),
    "not text": (lambda good: records(5), r"record 0: 'image' must be base64 text, not int"),
    "no image column": (lambda good: {"dataframe_records": [{"picture": b64(good)}]},
                        r"no 'image' in the request; send e\.g\. "
                        r"\{\"dataframe_records\": \[\{\"image\": \"<base64 of an image file>\"\}\]\}"),
    "no records": (lambda good: {"dataframe_records": []}, r"no 'image' in the request; send e\.g\. .+"),
    "a record without an image": (lambda good: {"dataframe_records": [{"image": b64(good)}, {"other": 1}]},
                                  r"record 1: no 'image' \(send \{\"image\": \"<base64 of an image file>\"\}\)"),
    "over the pixel cap": (lambda good: records(b64(png(400, 300))),
                           r"record 0: 'image' cannot be used \(too_many_pixels: 400x300 = 120,000 pixels, more "
                           r"than max_image_pixels 100,000; not decoded\)"),
    "too many records": (lambda good: records(*[b64(good)] * (MAX_RECORDS + 1)),
                         rf"{MAX_RECORDS + 1} records in one request; this server takes at most {MAX_RECORDS} "
                         r"\(serve\.max_records\): split the request"),
    "several bad records": (lambda good: records("%%%", b64(good), b64(b"GIF89a broken")),
                            r"record 0: 'image' is not valid base64; record 2: 'image' cannot be used \(.+\)"),
}


@pytest.mark.parametrize("case", CASES)
def test_each_bad_record_is_a_400_naming_the_record_and_the_problem(server, case):
    url, good, _, _ = server
    make, message = CASES[case]
    status, body = answer(url, make(good))
    assert status == 400, body
    assert re.fullmatch(message, body["message"]), body["message"]
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "stack_trace" not in body and not SERVER_TEXT.search(body["message"]), body


def test_the_server_goes_on_answering_good_requests_as_evaluation_decodes(server):
    url, good, module, p = server
    small = png(300, 300)  # 90,000 pixels: under the cap
    body = post(url, records(b64(good), b64(small), b64(good)))
    e = p.evaluate
    expected = caption_bytes(module, [good, small, good], e.beam_size, e.alpha, no_repeat_ngram=e.no_repeat_ngram)
    assert body == {"predictions": expected}
    no_rows = {"dataframe_split": {"columns": ["image"], "data": []}}
    assert answer(url, no_rows) == (200, {"predictions": []})


def test_a_request_mlflow_cannot_parse_is_a_4xx_without_server_paths(server):
    url, good, _, _ = server
    for payload in (b"{not json", {"dataframe_records": "a string"}):
        status, body = answer(url, payload)
        assert 400 <= status < 500, body
        assert not SERVER_TEXT.search(json.dumps(body)), body


def test_a_body_over_the_byte_cap_is_a_413_before_it_is_parsed_whether_declared_or_chunked(server):
    import http.client
    from urllib.parse import urlparse

    url, good, _, _ = server
    big = json.dumps(records(b64(b"x" * MAX_BYTES))).encode()
    status, body = answer(url, big)
    assert status == 413, body
    assert body["message"] == (f"request body of {len(big):,} bytes is over this server's limit of {MAX_BYTES:,} "
                               f"bytes (serve.max_request_bytes): send fewer or smaller images per request")
    where = urlparse(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    conn.request("POST", "/invocations", body=iter([big[:100_000], big[100_000:]]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    reply = conn.getresponse()
    assert reply.status == 413 and "serve.max_request_bytes" in json.loads(reply.read())["message"]
    conn.close()
    _, _, module, p = server
    expected = caption_bytes(module, [good], p.evaluate.beam_size, p.evaluate.alpha,
                             no_repeat_ngram=p.evaluate.no_repeat_ngram)
    assert post(url, records(b64(good))) == {"predictions": expected}  # the server goes on
