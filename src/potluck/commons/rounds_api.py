"""The commons' routes for fusion rounds and task serving (included by `api.create_app`).

    POST /v1/rounds                  admin: run one fusion round now, synchronously; the answer says what
                                     happened: outcome "promoted" | "rejected" | "skipped" (200 in every
                                     case; "skipped" with the reason, e.g. too few contributions)
    POST /v1/tasks/{task}/predict    reader: {"inputs": str | [str]} -> [{label, score}] (or a list of them),
                                     as `potluck serve` answers; headers X-Potluck-Head, X-Potluck-Base-Version
"""

# No `from __future__ import annotations`: the routes' annotations must be live objects for FastAPI.
from dataclasses import MISSING, fields
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from pydantic import ConfigDict, Field, create_model

from potluck.commons.deps import Admin, CommonsDep, Name, Reader
from potluck.commons.errors import CommonsError
from potluck.commons.round_settings import RoundSettings
from potluck.serving.schemas import PredictRequest

_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


class RequestError(CommonsError):
    """A request body the route cannot read, with the status to answer."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status

RoundBody = create_model(
    "RoundBody", __config__=ConfigDict(extra="forbid"),
    **{f.name: (_TYPES[f.type] if isinstance(f.type, str) else f.type,
                Field(default=f.default if f.default is not MISSING else None, description=f.metadata.get("help")))
       for f in fields(RoundSettings)})


def round_routes(max_body: int) -> APIRouter:
    """The routes of rounds and task serving."""
    from potluck.commons.task_serving import TaskServer

    r = APIRouter(prefix="/v1", max_body_size=max_body)
    servers: dict[int, TaskServer] = {}

    def task_server(request: Request) -> TaskServer:
        commons = request.app.state.commons
        return servers.setdefault(id(commons), TaskServer(commons))

    @r.post("/rounds", tags=["rounds"])
    def run_round(who: Admin, c: CommonsDep, body: RoundBody | None = None) -> dict:  # type: ignore[valid-type]
        """Admin: fuse the unfused accepted weights on the current base, gate the candidate, promote or not.

        Runs in the request (minutes at most with MiniLM and the frozen-encoder gate). A round with too few
        contributions, or with no evaluation data to judge by, does nothing: outcome "skipped" and the reason.
        """
        from potluck.commons.rounds import run_round as round_
        from potluck.errors import UserError

        try:
            settings = RoundSettings(**(body.model_dump() if body is not None else {}))
            return round_(c, who, settings)
        except UserError as err:
            raise CommonsError(str(err)) from None

    @r.post("/tasks/{task}/predict", tags=["tasks"], openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}})
    async def predict(task: Name, request: Request, who: Reader, response: Response,
                      server: Annotated[TaskServer, Depends(task_server)]):
        """Labels with probabilities, highest first, for one text or a list of texts (TEI's /predict shape).
        The body is read as JSON whatever its Content-Type (`curl -d` sends a form type), as `potluck serve` does."""
        from fastapi.concurrency import run_in_threadpool

        from potluck.serving.predict import ApiError, parse_request

        try:
            body = parse_request(await request.body())
        except ApiError as err:  # one line, the status `potluck serve` gives (400 bad JSON, 422 a bad field)
            raise RequestError(str(err.detail), err.status_code) from None
        texts = body.texts()
        answers, head = await run_in_threadpool(server.predict, task, texts, raw_scores=body.raw_scores,
                                                truncate=body.truncate is not False)
        response.headers["X-Potluck-Head"] = head["kind"]
        response.headers["X-Potluck-Base-Version"] = str(head["base_version"])
        return answers[0] if isinstance(body.inputs, str) else answers

    return r
