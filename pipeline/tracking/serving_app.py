"""The ASGI app `capline serve` runs: MLflow's scoring app behind a cap on the request body.

MLflow's scoring server reads any body whole and parses it into a DataFrame (about 4x the body in memory), so
the records and pixel caps of the model alone do not bound the server's memory. A body over
`serve.max_request_bytes` is answered 413 before MLflow sees it. Like MLflow's own `scoring_server.app`, this
module is the server process's entry point and takes its settings from the environment `serve_command` sets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from pipeline.tracking.registry import MAX_BYTES_ENV

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: an HTTP request whose body is over max_bytes gets a 413 naming both sizes."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self.reject(send, f"{int(declared):,} bytes")
            return
        chunks, size, more = [], 0, True
        while more:  # a chunked body: read it up to the cap, then hand it on whole
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self.reject(send, f"more than {self.max_bytes:,} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, given = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def reject(self, send: Send, size: str) -> None:
        message = (f"request body of {size} is over this server's limit of {self.max_bytes:,} bytes "
                   f"(serve.max_request_bytes): send fewer or smaller images per request")
        body = json.dumps({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": message}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _app() -> BodyLimit:
    from mlflow.pyfunc.scoring_server.app import app as scoring_app  # loads the model named by MLflow's env

    return BodyLimit(scoring_app, int(os.environ[MAX_BYTES_ENV]))


app = _app()
