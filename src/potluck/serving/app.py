"""The FastAPI app: one predict route per model folder, health and readiness, /info, /metrics, the page.

    potluck serve models/urgency models/intent --port 8080 [--api-key-file keys.txt]

    from potluck.serving.app import create_app
    app = create_app(["models/urgency"])                 # then: uvicorn.run(app) or TestClient(app)

Routes: POST /v1/models/{name}/predict (and POST /predict when one model is loaded), GET /health,
/ready, /info, /metrics (Prometheus), /docs (OpenAPI), and / (the web page). Errors are JSON
`{"error": one line, "error_type": ...}` with a 4xx status for the client's mistakes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from potluck import __version__
from potluck.serving.auth import KeyRing
from potluck.serving.batcher import MicroBatcher, in_thread
from potluck.serving.limits import BodyLimitMiddleware, BodyTooLarge, too_large_message
from potluck.serving.metrics import Metrics, MetricsMiddleware
from potluck.serving.models import ServedModel, load_models
from potluck.serving.predict import UNAUTHORIZED, ApiError, PredictRoutes, classify, error_body, one_line
from potluck.serving.schemas import ErrorResponse, Info, Limits, PredictRequest, PredictResponse
from potluck.serving.settings import ServeSettings
from potluck.serving.workers import ModelProcesses

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


async def start_processes(models: dict[str, ServedModel], settings: ServeSettings) -> ModelProcesses | None:
    """The worker processes that run the models (one per worker of the predictors), or None where the
    models run on threads of this process: --no-processes, or a model that was not loaded from a folder."""
    predictors = [m.predictor for m in models.values()]
    if not settings.processes or any(p.folder is None for p in predictors):
        return None
    import torch

    count = predictors[0].workers
    processes = ModelProcesses([p.folder for p in predictors], precision=settings.precision,
                               backend=settings.backend, count=count,
                               threads=max(1, torch.get_num_threads() // count))
    await processes.start()
    return processes


def create_app(folders: Sequence[str | os.PathLike] = (), settings: ServeSettings | None = None, *,
               keys: KeyRing | None = None, models: dict[str, ServedModel] | None = None) -> FastAPI:
    """Build the app for model folders (or already loaded `models`); batchers start with the app."""
    settings = settings or ServeSettings()
    models = models if models is not None else load_models(folders, settings.precision, settings.backend)
    metrics = Metrics()
    state = {"ready": False}
    # FastAPIOffline: /docs and /redoc from files in the package, not a CDN (they work without network)
    app = FastAPIOffline(title="Potluck", version=__version__, lifespan=lifespan(models, settings, metrics, state),
                         description="Text classification with calibrated probabilities. Request and response "
                                     "shapes follow text-embeddings-inference's /predict.")
    routes: dict = {}  # path -> (model, its FastAPI route): PredictRoutes answers them (see potluck.serving.predict)
    app.add_middleware(PredictRoutes, routes=routes, settings=settings, keys=keys, state=app.state)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    add_error_handlers(app, models, settings)

    async def require_key(request: Request) -> None:  # async: a sync dependency would cost a thread hop
        if keys is not None and not keys.check(request.headers.get("authorization")):
            raise ApiError(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(require_key)] if keys is not None else []  # no keys: nothing to run per request
    add_predict_routes(app, models, settings, guarded, routes)
    add_service_routes(app, models, settings, guarded, metrics, state, auth=keys is not None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.models = models
    app.state.metrics = metrics
    return app


def lifespan(models: dict[str, ServedModel], settings: ServeSettings, metrics: Metrics, state: dict):
    """Start: the model processes (or threads), a batcher per model, a warm-up run each; stop: the
    requests in flight finish first."""
    @asynccontextmanager
    async def run(app: FastAPI):
        app.state.tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="potluck-tokenize")
        processes = await start_processes(models, settings)
        for index, m in enumerate(models.values()):  # each batch runs whole in one model process (or thread)
            run_batch = (functools.partial(processes.run, index) if processes is not None else
                         in_thread(functools.partial(m.predictor.logits_from_ids, here=True), m.predictor.pool))
            m.batcher = MicroBatcher(run_batch, max_wait_ms=settings.max_wait_ms,
                                     max_batch_texts=settings.max_batch_texts,
                                     max_batch_tokens=settings.max_batch_tokens, max_in_flight=m.predictor.workers,
                                     on_batch=lambda n, t, s, name=m.name: metrics.observe_batch(name, n, t, s))
            m.batcher.start()
        for m in models.values():  # the first run of a model pays one-off costs: not a user's request
            await m.batcher.submit(m.predictor.encode(["warm up"]))
        app.state.processes = processes
        state["ready"] = True
        logger.info("ready: %s", ", ".join(models))
        try:
            yield
        finally:
            state["ready"] = False
            await asyncio.gather(*(m.batcher.stop(settings.graceful_timeout) for m in models.values()))
            if processes is not None:
                await processes.stop()
            app.state.tokenizer_thread.shutdown(wait=True)
    return run


def add_predict_routes(app: FastAPI, models: dict[str, ServedModel], settings: ServeSettings, guarded: list,
                       routes: dict) -> None:
    """/v1/models/<name>/predict per model (and /predict when there is one): FastAPI routes for /docs, whose
    requests PredictRoutes answers first, with the same answers."""
    predict_doc = dict(
        response_model=PredictResponse, dependencies=guarded,
        responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422)},
        openapi_extra={"requestBody": {"required": True,
                                       "content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}})

    def route(model: ServedModel):
        async def predict_route(request: Request) -> Response:  # the same answers as PredictRoutes gives
            body = await request.body()  # a body over the limit raises BodyTooLarge (413)
            answer = await classify(body, model, settings, request.app.state.tokenizer_thread)
            return Response(answer, media_type="application/json")
        return predict_route

    def add(path: str, model: ServedModel, **doc) -> None:
        app.post(path, tags=["predict"], **doc, **predict_doc)(route(model))
        routes[path] = (model, app.routes[-1])

    for name, model in models.items():
        add(f"/v1/models/{name}/predict", model, summary=f"Classify texts with '{name}'", operation_id=f"predict_{name}")
    if len(models) == 1:
        only = next(iter(models.values()))
        add("/predict", only, summary=f"Classify texts with '{only.name}' (the only model loaded)",
            operation_id="predict")


def add_service_routes(app: FastAPI, models: dict[str, ServedModel], settings: ServeSettings, guarded: list,
                       metrics: Metrics, state: dict, *, auth: bool) -> None:
    """/health, /ready, /info, /metrics and the web page."""
    @app.get("/health", tags=["service"], summary="The process is up")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", tags=["service"], summary="Models are loaded and warm (503 while starting or stopping)")
    async def ready() -> JSONResponse:
        if not state["ready"]:
            return JSONResponse({"status": "unavailable", "models": list(models)}, status_code=503)
        return JSONResponse({"status": "ready", "models": list(models)})

    @app.get("/info", tags=["service"], response_model=Info, dependencies=guarded,
             summary="Loaded models, their labels, base and training metrics, and the request limits")
    async def info() -> Info:
        limits = Limits(max_texts=settings.max_texts, max_chars=settings.max_chars,
                        max_body_bytes=settings.max_body_bytes, auto_truncate=settings.auto_truncate)
        return Info(version=__version__, models=[m.info() for m in models.values()], limits=limits, auth=auth)

    @app.get("/metrics", tags=["service"], dependencies=guarded, summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


def add_error_handlers(app: FastAPI, models: dict[str, ServedModel], settings: ServeSettings) -> None:
    """Every error as {"error": one line, "error_type": ...}; a 404 names the models that exist."""

    def answer(status: int, message: str, headers: dict | None = None) -> Response:
        return Response(error_body(status, message), status_code=status, headers=headers,
                        media_type="application/json")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = str(exc.detail)
        if not isinstance(exc, ApiError):
            message = framework_message(request, exc, models)
        return answer(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge) -> Response:
        return answer(413, too_large_message(settings.max_body_bytes), {"Connection": "close"})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return answer(422, one_line(list(exc.errors())))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return answer(500, f"internal error ({exc.__class__.__name__}); the server log has the details")


def framework_message(request: Request, exc: HTTPException, models: dict[str, ServedModel]) -> str:
    """Turn Starlette's terse 404 and 405 into a line that says what to do."""
    path, names = request.url.path, ", ".join(models)
    if exc.status_code == 405:
        return f"{request.method} is not allowed on {path}: see /docs for the methods of each route"
    if exc.status_code == 404:
        found = re.fullmatch(r"/v1/models/([^/]+)/predict", path)
        if found:
            return f"unknown model '{found.group(1)}'; loaded: {names}"
        if path == "/predict":
            return f"several models are loaded ({names}): use /v1/models/<name>/predict"
        return f"no route {path}: see /docs"
    return str(exc.detail)
