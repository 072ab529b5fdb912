"""A request-body size limit that answers in the API's JSON error shape.

Starlette has a body limiter (FastAPI's `max_body_size`), but it answers "Content Too Large" as plain
text, overriding the app's own answer. This one checks Content-Length before the app runs, and counts
the bytes of a streamed (chunked) body as the app reads it.
"""

from __future__ import annotations

import json


class BodyTooLarge(Exception):
    """Raised from `receive` when a streamed body passes the limit; the app turns it into a 413."""


def too_large_message(limit: int) -> str:
    return f"request body larger than the limit of {limit} bytes: send fewer or shorter texts"


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 for a Content-Length over `limit`; BodyTooLarge while streaming past it."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            body = json.dumps({"error": too_large_message(self.limit), "error_type": "payload_too_large"}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message

        await self.app(scope, counted, send)
