"""The commons service: a versioned HTTP API (/v1, OpenAPI at /docs) over the registry and the blob store.

    potluck commons serve --root commons/ --port 8700 [--db postgresql://…]
    uvicorn --factory potluck.commons.api:app_from_env     # with POTLUCK_COMMONS_ROOT (and _DB) set

Every route but /v1/health needs `Authorization: Bearer <token>`; readers pull and look, contributors
also create their own tasks, push, share and lend compute, admins also invite. JSON bodies are limited to
`max_json_kb`; uploads are streamed and limited separately (see `uploads.py`).
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field

from potluck import __version__
from potluck.commons import uploads
from potluck.commons.auth import NAME_PATTERN, InvalidName
from potluck.commons.deps import Admin, CommonsDep, Member, Name, Reader, Sha
from potluck.commons.errors import CommonsError, NotFound
from potluck.commons.models import view
from potluck.commons.rounds_api import round_routes  # fusion rounds and task serving
from potluck.commons.service import Commons
from potluck.commons.store import BlobCorrupted, BlobMissing

logger = logging.getLogger(__name__)




# -- request bodies -------------------------------------------------------------------------------

class Invite(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    role: str = Field(default="contributor", pattern="^(reader|contributor|admin)$")


class TaskBody(BaseModel):
    labels: list[str] = Field(min_length=2, max_length=1000)
    description: str = Field(default="", max_length=2000)


class LeaseBody(BaseModel):
    worker: str = Field(default="", max_length=128, description="a name for this worker, e.g. host-pid")


class LeaseRef(BaseModel):
    lease_id: str = Field(max_length=64)


class Failure(LeaseRef):
    error: str = Field(default="", max_length=4000)


# -- routes ---------------------------------------------------------------------------------------

def service_routes(max_body: int) -> APIRouter:
    """Health, who you are, contributors (admin) and the status of everything."""
    r = APIRouter(prefix="/v1", max_body_size=max_body)

    @r.get("/health", tags=["service"])
    def health(c: CommonsDep) -> dict:
        """No token needed: is the service up, and which version."""
        return {"status": "ok", "service": "potluck-commons", "version": __version__,
                "database": c.registry.engine.dialect.name}

    @r.get("/me", tags=["contributors"])
    def me(who: Reader) -> dict:
        return view(who)

    @r.post("/contributors", status_code=201, tags=["contributors"])
    def invite(body: Invite, who: Admin, c: CommonsDep) -> dict:
        """Admin: add a contributor; its token is in this answer and nowhere else."""
        record, token = c.registry.add_contributor(body.name, body.role, invited_by=who.id)
        return {**view(record), "token": token}

    @r.get("/contributors", tags=["contributors"])
    def contributors(who: Admin, c: CommonsDep) -> list[dict]:
        return [view(x) for x in c.registry.contributors()]

    @r.get("/status", tags=["service"])
    def status(who: Reader, c: CommonsDep) -> dict:
        """Bases, tasks, recent contributions, jobs and the leaderboard."""
        return c.registry.status()

    return r


def base_routes(max_body: int) -> APIRouter:
    """The base versions: their records, tensor specs and files."""
    r = APIRouter(prefix="/v1", max_body_size=max_body)

    @r.get("/bases", tags=["bases"])
    def bases(who: Reader, c: CommonsDep) -> list[dict]:
        return [{**{k: v for k, v in view(b).items() if k != "spec"}, **verdict(b)} for b in c.registry.bases()]

    @r.get("/bases/current", tags=["bases"])
    def current_base(who: Reader, c: CommonsDep) -> dict:
        return base_info(c, None)

    @r.get("/bases/{version}", tags=["bases"])
    def base(version: int, who: Reader, c: CommonsDep) -> dict:
        """A base version: its record, tensor spec and the files of its bundle (name -> sha256, size)."""
        return base_info(c, version)

    @r.get("/bases/{version}/files/{name}", tags=["bases"], response_class=FileResponse)
    def base_file(version: int, name: str, who: Reader, c: CommonsDep):
        """One file of a base bundle, re-hashed before it is sent."""
        files = c.manifest(version)["files"]
        if name not in files:
            raise NotFound(f"base version {version} has no file {name!r}")
        return FileResponse(c.store.verify(files[name]), media_type="application/octet-stream",
                            headers={"X-Content-SHA256": files[name]})

    return r


def task_routes(max_body: int) -> APIRouter:
    """Tasks and the contributions made to them."""
    r = APIRouter(prefix="/v1", max_body_size=max_body)

    @r.get("/tasks", tags=["tasks"])
    def tasks(who: Reader, c: CommonsDep) -> list[dict]:
        return c.registry.tasks()

    @r.get("/tasks/{task}", tags=["tasks"])
    def task(task: Name, who: Reader, c: CommonsDep) -> dict:
        return {**view(c.registry.task(task)), "heads": c.registry.task_heads(task)}

    @r.put("/tasks/{task}", tags=["tasks"])
    def put_task(task: Name, body: TaskBody, who: Member, c: CommonsDep) -> dict:
        """Create a task (you own it) or update one you own."""
        return view(c.registry.put_task(task, body.labels, who, body.description))

    @r.get("/contributions", tags=["contributions"])
    def contributions(who: Reader, c: CommonsDep, task: str | None = None, kind: str | None = None,
                      status: str | None = None, limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> list[dict]:
        return c.registry.contributions(task=task, kind=kind, status=status, limit=limit)

    return r


def job_routes(max_body: int) -> APIRouter:
    """Compute leases: lease a job, heartbeat, fetch its data, give it back."""
    r = APIRouter(prefix="/v1", max_body_size=max_body)

    @r.get("/jobs", tags=["jobs"])
    def jobs(who: Reader, c: CommonsDep, status: str | None = None) -> list[dict]:
        return [view(j) for j in c.registry.jobs(status)]

    @r.post("/jobs/lease", tags=["jobs"], responses={204: {"description": "no job is queued"}})
    def lease(body: LeaseBody, who: Member, c: CommonsDep):
        """Lease the oldest queued job: fine-tune base `base_version` on its data, send heartbeats."""
        job = c.registry.lease_job(who, body.worker, lease_seconds=c.settings.lease_seconds,
                                   max_attempts=c.settings.max_attempts)
        if job is None:
            return Response(status_code=204)
        task = c.registry.task(job.task)
        return {**view(job), "lease_id": job.lease_id, "task_name": task.name, "labels": task.labels,
                "lease_seconds": c.settings.lease_seconds}

    @r.post("/jobs/{job_id}/heartbeat", tags=["jobs"])
    def heartbeat(job_id: int, body: LeaseRef, who: Member, c: CommonsDep) -> dict:
        job = c.registry.heartbeat(job_id, body.lease_id, who, lease_seconds=c.settings.lease_seconds)
        return {"id": job.id, "lease_expires": view(job)["lease_expires"]}

    @r.get("/jobs/{job_id}/data", tags=["jobs"], response_class=FileResponse)
    def job_data(job_id: int, lease_id: str, who: Member, c: CommonsDep):
        """The training part of the job's dataset (JSONL), for the worker holding the lease only."""
        job = c.registry.check_lease(job_id, lease_id, who)
        sha = c.registry.contribution(job.dataset).blob_sha
        return FileResponse(c.store.verify(sha), media_type="application/jsonl", headers={"X-Content-SHA256": sha})

    @r.post("/jobs/{job_id}/fail", tags=["jobs"])
    def fail(job_id: int, body: Failure, who: Member, c: CommonsDep) -> dict:
        """Give a leased job back after a failure (queued again, or failed after too many attempts)."""
        job = c.registry.release_job(job_id, body.lease_id, who, error=body.error or "the worker gave up",
                                     max_attempts=c.settings.max_attempts)
        return view(job)

    return r


def upload_routes() -> APIRouter:
    """Streamed uploads: their own size limits (CommonsSettings), enforced while they arrive."""
    r = APIRouter(prefix="/v1", max_body_size=1 << 45)
    body = {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}

    @r.post("/tasks/{task}/weights", status_code=201, tags=["contributions"],
            openapi_extra={"requestBody": {"required": True, **body}})
    async def push_weights(task: Name, request: Request, who: Member, c: CommonsDep, sha256: Sha = None):
        """A weights contribution: one safetensors file, encoder body under the base's names, head under
        `head.`, metadata format=potluck.contribution/1. Checked on arrival; 4xx with the reason if rejected."""
        record = await run_in_threadpool(c.registry.task_for_write, task, who)
        return await uploads.accept_weights(c, request, who, record, expected_sha=sha256)

    @r.post("/tasks/{task}/datasets", status_code=201, tags=["contributions"],
            openapi_extra={"requestBody": {"required": True, **body}})
    async def share_dataset(task: Name, request: Request, who: Member, c: CommonsDep, sha256: Sha = None,
                            eval_only: bool = False, eval_fraction: Annotated[float | None, Query(ge=0.05, le=0.5)] = None):
        """A dataset (JSONL, one {"text", "label"} per line): checked like `potluck finetune`'s data, split into
        train and a held-back evaluation part; unless eval_only, it becomes a job."""
        record = await run_in_threadpool(c.registry.task_for_write, task, who)
        return await uploads.accept_dataset(c, request, who, record, eval_only=eval_only,
                                            eval_fraction=eval_fraction, expected_sha=sha256)

    @r.post("/jobs/{job_id}/result", status_code=201, tags=["jobs"],
            openapi_extra={"requestBody": {"required": True, **body}})
    async def job_result(job_id: int, lease_id: str, request: Request, who: Member, c: CommonsDep,
                         sha256: Sha = None):
        """The weights a leased job produced (same format and checks as a push); finishes the job."""
        job = await run_in_threadpool(c.registry.check_lease, job_id, lease_id, who)
        record = await run_in_threadpool(c.registry.task, job.task)
        return await uploads.accept_weights(c, request, who, record, expected_sha=sha256, job=job)

    return r


def base_info(c: Commons, version: int | None) -> dict:
    record = c.registry.base(version)
    manifest = c.manifest(record.version)
    files = {name: {"sha256": sha, "size": c.store.size(sha)} for name, sha in manifest["files"].items()}
    return {**view(record), "files": files, **verdict(record)}


def verdict(record) -> dict:
    """`rejected`, and a `warning` for a base that is not promoted: a rejected candidate stays pullable (for
    inspection) but must never pass for the commons' base."""
    if record.status == "promoted":
        return {"rejected": False}
    decision = str((record.lineage or {}).get("decision") or "no reason recorded")
    if record.status == "rejected":
        return {"rejected": True, "warning": f"base version {record.version} is a candidate the gate rejected "
                                             f"({decision[:300]}); it is not the commons' base"}
    return {"rejected": False, "warning": f"base version {record.version} is a candidate the gate has not "
                                          "judged yet; it is not the commons' base"}


# -- the app --------------------------------------------------------------------------------------

def create_app(commons: Commons) -> FastAPI:
    """The FastAPI app for one commons (the blob store's unfinished uploads are swept at start)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        commons.store.sweep()
        yield
        commons.registry.close()

    app = FastAPIOffline(title="Potluck commons", version=__version__, lifespan=lifespan,  # docs without a CDN
                  description="Organisations contribute datasets, compute and weights to a shared base encoder.")
    app.state.commons = commons
    for routes in (service_routes, base_routes, task_routes, job_routes):
        app.include_router(routes(commons.settings.max_json_kb << 10))
    app.include_router(upload_routes())
    app.include_router(round_routes(commons.settings.max_json_kb << 10))

    @app.exception_handler(CommonsError)
    async def commons_error(request: Request, err: CommonsError):
        body = {"detail": str(err)}
        if isinstance(err, uploads.RecordedRejection):
            body["contribution"] = err.contribution
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(body, status_code=err.status, headers=headers)

    @app.exception_handler(InvalidName)
    async def invalid_name(request: Request, err: InvalidName):
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.exception_handler(BlobMissing)
    async def blob_missing(request: Request, err: BlobMissing):
        return JSONResponse({"detail": str(err)}, status_code=404)

    @app.exception_handler(BlobCorrupted)
    async def blob_corrupted(request: Request, err: BlobCorrupted):
        logger.error("%s", err)
        return JSONResponse({"detail": f"{err}: the commons' admin must restore it"}, status_code=500)

    return app


def app_from_env() -> FastAPI:
    """For `uvicorn --factory`: the commons at $POTLUCK_COMMONS_ROOT (database from $POTLUCK_COMMONS_DB)."""
    return create_app(Commons.open(os.environ["POTLUCK_COMMONS_ROOT"]))
