"""Limits applied before a request reaches a route, as one ASGI middleware: the body size
(HOREN_MAX_BODY_BYTES, 413) and the requests one client may have in flight at once
(HOREN_MAX_CLIENT_CONCURRENCY, 429 with Retry-After). A client is its bearer token (by sha256), or
its IP address without one. The ops routes (/healthz, /readyz, /metrics) and the docs are exempt,
so that probes keep answering under load. Routes named in ``streamed`` (a codebook import) have a
limit of their own and get their body as it arrives, counted, instead of buffered in memory."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any

from service.api.errors import BodyTooLargeError, error_response

EXEMPT = ("/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json")


class LimitsMiddleware:
    def __init__(
        self,
        app: Any,
        max_body_bytes: int,
        max_client_concurrency: int,
        streamed: dict[str, tuple[int, str]] | None = None,
    ) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.max_inflight = max_client_concurrency
        self.streamed = dict(streamed or {})  # path -> (limit in bytes, the setting that sets it)
        self.inflight: defaultdict[str, int] = defaultdict(int)  # touched only on the event loop thread

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        client = _client(scope)
        if self.max_inflight and self.inflight[client] >= self.max_inflight:
            msg = f"this client has {self.max_inflight} requests in flight already (HOREN_MAX_CLIENT_CONCURRENCY)"
            await error_response(scope["path"], 429, "too_many_requests", msg)(scope, receive, send)
            return
        self.inflight[client] += 1
        try:
            if scope["path"] in self.streamed:
                await self._stream(scope, receive, send, *self.streamed[scope["path"]])
                return
            body = await self._read_body(scope, receive)
            if body is None:
                msg = f"the request body is larger than {self.max_body} bytes (HOREN_MAX_BODY_BYTES)"
                await error_response(scope["path"], 413, "body_too_large", msg)(scope, receive, send)
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.inflight[client] -= 1
            if not self.inflight[client]:
                del self.inflight[client]

    async def _stream(self, scope: dict, receive: Any, send: Any, limit: int, setting: str) -> None:
        """Pass the body on as it arrives; past ``limit`` (by its Content-Length: before the route
        runs; as it arrives: raised to the route as `BodyTooLargeError`) it is a 413."""
        msg = f"the request body is larger than {limit} bytes ({setting})"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await error_response(scope["path"], 413, "body_too_large", msg)(scope, receive, send)
            return
        size = 0

        async def counted() -> dict:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    raise BodyTooLargeError(msg)
            return message

        await self.app(scope, counted, send)

    async def _read_body(self, scope: dict, receive: Any) -> bytes | None:
        """The whole body, or None once it is over the limit (by its Content-Length or as it arrives)."""
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # the client went away; the route will see an empty body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _client(scope: dict) -> str:
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            return "key:" + hashlib.sha256(value).hexdigest()
    host = (scope.get("client") or ("unknown", 0))[0]
    return f"ip:{host}"


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the client's disconnect, as Starlette expects

    return replayed
