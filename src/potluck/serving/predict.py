"""A predict request from body to answer, and the pure-ASGI route that serves it.

    answer = await classify(body, model, settings, tokenizer_thread)   # JSON bytes; ApiError for a mistake

`PredictRoutes` sits in front of FastAPI and answers POST to the predict routes itself; every other
request goes on to FastAPI, whose own predict routes give the same answers (they call `classify`
too) and document the API at /docs. Why: on this 2-core machine the server process and the model
processes share the CPU, so every bit of the server's own work per request is taken from the model.
Measured here with an instant model: FastAPI's routing, dependencies and exception middleware cost
~0.12 ms of CPU per request, a quarter of the server's ~0.5 ms (tokenizing is another ~0.13 ms).
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from pydantic import ValidationError
from starlette.exceptions import HTTPException

from potluck.calibration import softmax
from potluck.errors import NonFiniteOutput, UserError
from potluck.inference import check_finite_output, ranked
from potluck.serving.limits import BodyTooLarge, too_large_message
from potluck.serving.schemas import PredictRequest
from potluck.serving.settings import ServeSettings

if TYPE_CHECKING:
    from potluck.serving.auth import KeyRing
    from potluck.serving.models import ServedModel

logger = logging.getLogger(__name__)

INLINE_CHARS = 2000  # a request of at most this many characters is tokenized on the event loop
ERRORS = {400: "validation", 401: "unauthorized", 404: "not_found", 405: "not_found", 413: "payload_too_large",
          422: "validation", 503: "unavailable"}
UNAUTHORIZED = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"


class ApiError(HTTPException):
    """A 4xx answer with one line that says what is wrong and what to do."""


def error_body(status: int, message: str) -> bytes:
    """The API's error shape: {"error": one line, "error_type": ...}."""
    return json.dumps({"error": message, "error_type": ERRORS.get(status, "internal")}).encode()


async def classify(body: bytes, model: ServedModel, settings: ServeSettings, tokenizer_thread: Executor) -> bytes:
    """Parse and check the request, tokenize (a long request off the event loop), wait for the batch,
    rank the labels: the JSON answer."""
    req = parse_request(body)
    texts = req.texts()
    if not texts:
        raise ApiError(422, "'inputs' is empty: send a text or a list of texts")
    if len(texts) > settings.max_texts:
        raise ApiError(413, f"{len(texts)} texts in one request, more than the limit of {settings.max_texts}: "
                            "split them over several requests")
    for i, text in enumerate(texts):
        if len(text) > settings.max_chars:
            raise ApiError(413, f"text {i} has {len(text)} characters, more than the limit of "
                                f"{settings.max_chars}: shorten it")
    truncate = settings.auto_truncate if req.truncate is None else req.truncate
    try:
        if sum(map(len, texts)) <= INLINE_CHARS:  # ~0.13 ms a short text: less than a hop to the thread costs
            ids = model.predictor.encode(texts, truncate)
        else:
            ids = await asyncio.get_running_loop().run_in_executor(tokenizer_thread, model.predictor.encode,
                                                                   texts, truncate)
    except UserError as err:
        raise ApiError(422, str(err)) from err
    logits = await model.batcher.submit(ids)  # (N, C)
    try:
        check_finite_output(logits, model.predictor.folder)
    except NonFiniteOutput as err:  # the server's fault, not the client's: 500, counted in /metrics by code
        logger.error("%s", err)
        raise ApiError(500, err.message) from err
    scores = logits if req.raw_scores else softmax(logits)
    labels = model.predictor.labels
    answers = ranked(scores, labels)
    return json.dumps(answers[0] if isinstance(req.inputs, str) else answers, separators=(",", ":")).encode()


def parse_request(body: bytes) -> PredictRequest:
    """The JSON body as a PredictRequest (whatever the Content-Type, so `curl -d` works), or a 4xx."""
    if not body.strip():
        raise ApiError(400, 'empty request body: send JSON such as {"inputs": "a text"}')
    try:
        return PredictRequest.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"malformed JSON: {first['ctx']['error']}") from err
        raise ApiError(422, one_line(err.errors())) from err


def one_line(errors: list[dict]) -> str:
    """pydantic's errors as one line: 'inputs: Input should be a valid string; ...'."""
    parts: list[str] = []
    for e in errors:
        loc = [str(part) for part in e["loc"] if part != "body"]
        if e["type"] == "value_error":
            line = f"{loc[0]}: {e['msg'].removeprefix('Value error, ')}"
        elif e["type"] == "extra_forbidden":
            line = f"unknown field '{'.'.join(loc)}'"
        elif loc and loc[0] == "inputs" and e["type"] != "missing":  # a union's errors: say it plainly, once
            line = "inputs: must be a text or a list of texts"
        else:
            line = f"{'.'.join(loc) or 'body'}: {e['msg']}"
        if line not in parts:
            parts.append(line)
    return "; ".join(parts[:3]) + ' (expected {"inputs": "a text" or ["a text", ...]})'


class PredictRoutes:
    """Pure ASGI middleware: POST to a predict route is answered here, the rest goes on to `app`.

    `routes` maps a path to its model and the FastAPI route that documents it (set as scope["route"],
    so /metrics labels the request as FastAPI would). Sits inside the body limit and the metrics."""

    def __init__(self, app, routes: dict, settings: ServeSettings, keys: KeyRing | None, state):
        self.app = app
        self.routes = routes
        self.settings = settings
        self.keys = keys
        self.state = state  # the app's state: the tokenizer thread is made when the app starts

    async def __call__(self, scope, receive, send):
        hit = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if hit is None:
            return await self.app(scope, receive, send)
        model, scope["route"] = hit
        headers: list[tuple[bytes, bytes]] = []
        try:
            if self.keys is not None and not self.keys.check(_header(scope, b"authorization")):
                raise ApiError(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
            body = await _read_body(receive)
            if body is None:
                return  # the client went away
            status, payload = 200, await classify(body, model, self.settings, self.state.tokenizer_thread)
        except ApiError as err:
            status, payload = err.status_code, error_body(err.status_code, str(err.detail))
            headers = [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
        except BodyTooLarge:
            status, payload = 413, error_body(413, too_large_message(self.settings.max_body_bytes))
            headers = [(b"connection", b"close")]
        except Exception as err:
            logger.exception("internal error on POST %s", scope["path"])
            status, payload = 500, error_body(500, f"internal error ({err.__class__.__name__}); the server log "
                                                   "has the details")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()), *headers]})
        await send({"type": "http.response.body", "body": payload})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def _read_body(receive) -> bytes | None:
    """The whole request body, or None if the client disconnected."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
