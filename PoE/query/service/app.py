"""The FastAPI app: routes, error handlers and middleware over one ``Service``."""

from __future__ import annotations

import copy
import logging
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from PoE import __version__
from PoE.core.errors import PoEError
from PoE.query.pool import Pool
from PoE.query.service.answers import Answer
from PoE.query.service.batching import Arrivals
from PoE.query.service.core import Batching, Service
from PoE.query.service.images import decode_base64
from PoE.query.service.limits import (
    DEFAULT_TOP,
    MAX_BODY_BYTES,
    MAX_IMAGES,
    BodyLimit,
    ClientError,
    check_count,
    memory,
    one_line,
)
from PoE.query.service.raw import RAW_PATH, FastRaw, answer_raw, content_kind, error_of, task_names
from PoE.query.service.schemas import RAW_BODY, USAGE, PredictBody, QueryBody, refusals

log = logging.getLogger("PoE.query.service")

WEB = Path(__file__).resolve().parents[2] / "web"
MODEL_ID = re.compile(r"[0-9a-f]{16}-[0-9a-f]{2,}\.pt2")  # View.tasks_of checks the task codes


def create_app(
    pool: Pool,
    data_root: str | Path | None = None,
    *,
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    batching: Batching | None = None,
    engine: str = "torch",
) -> FastAPI:
    """The FastAPI app over ``pool`` (already opened and checked). ``data_root``: where the test split is,
    for ``evaluate``; None disables accuracy. ``max_batch`` images / ``max_wait_ms``: the batching window
    (refused with PoEError unless finite, 0-1000 ms). ``batching``: another batcher (Ray Serve's). ``engine``: how
    the batcher runs the modules (``PoE.query.service.engine``: torch, onnx, or auto)."""
    service = Service(pool, data_root, max_batch, max_wait_ms, batching, engine=engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPIOffline(  # FastAPI whose /docs and /redoc serve their scripts from the package: no CDN needed
        title="Pool of Experts",
        version=__version__,
        description="Query a pool of experts in real time: pick primitive tasks, get a consolidated model "
        "(its accuracy, size, cost and a torch.export or ONNX download) and predictions, without training.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(FastRaw, service=service)  # inside the two below: counted as arriving, its body limited
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(Arrivals, batcher=service.batcher)

    add_error_handlers(app, service)
    add_query_routes(app, service, data_root)
    add_predict_routes(app, service)
    add_download_routes(app, service)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html")

    app.mount("/web", StaticFiles(directory=WEB), name="web")
    app.openapi = lambda: describe_tasks(copy.deepcopy(FastAPI.openapi(app)), list(service.cfg.tasks))
    return app


def add_error_handlers(app: FastAPI, service: Service) -> None:
    """Every refusal as ``{"error": one line}`` with its 4xx; anything else a logged 500 that says so."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc, ClientError) else one_line(exc.detail)
        if exc.status_code == 404 and not isinstance(exc, ClientError):
            message = f"not found: {request.url.path}; the API is under /api (see /docs), the web page at /"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}; see /docs"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            why = first.get("ctx", {}).get("error", "cannot parse")
            what = f"malformed JSON ({why} at character {first['loc'][-1]})"
        else:
            loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
            what = f"bad request: {loc}: {first.get('msg', 'invalid')}"
        usage = USAGE.get(request.url.path, "see /docs")
        known = ", ".join(service.cfg.tasks)
        return JSONResponse({"error": one_line(f"{what}; {usage}; known tasks: {known}")}, status_code=400)

    @app.exception_handler(PoEError)
    @app.exception_handler(ClientDisconnect)  # here, not with Exception: a 500 handler's exception is raised again
    @app.exception_handler(Exception)
    async def refused(request: Request, exc: Exception) -> JSONResponse:
        status, line = error_of(exc, request.url.path)  # PoEError: 400; anything else: a logged 500
        return JSONResponse({"error": line}, status_code=status)


def add_query_routes(app: FastAPI, service: Service, data_root: str | Path | None) -> None:
    """Liveness, the pool and a query."""

    @app.get("/healthz", summary="Liveness: the pool is loaded and the batcher runs", responses=refusals(503))
    async def healthz() -> dict[str, Any]:
        view = await service.current()
        if not service.batcher.alive():
            raise ClientError(503, "the prediction worker has stopped")
        mem = memory()
        return {
            "status": "ok",
            "dataset": view.cfg.name,
            "experts": len(view.pool.experts),
            "pid": mem["pid"],
            "rss_bytes": mem["rss_bytes"],
            "pool_digest": view.pool.digest,
        }

    @app.get("/api/pool", summary="The pool: dataset and, per task, its classes, its expert's presence and accuracy")
    async def pool_info() -> dict[str, Any]:
        current = (await service.current()).pool
        info = current.describe()
        info.update(
            image_size=current.cfg.image_size,
            precision=current.precision,
            max_images=MAX_IMAGES,
            max_body_bytes=MAX_BODY_BYTES,
            accuracy_available=data_root is not None,
        )
        return info

    @app.post(
        "/api/query",
        summary="Consolidate a model for a set of tasks: classes, FLOPs, params, build time, "
        "accuracy (evaluate: true) and a download URL",
        responses=refusals(400, 413, 422, 503),
    )
    async def query(body: QueryBody) -> JSONResponse:
        view = await service.current()
        model = view.build(body.tasks)
        key = view.model_id(model.tasks)
        macs, params = view.cost(model)
        out: dict[str, Any] = {
            "tasks": model.tasks,
            "classes": view.classes_of(model),
            "flops": macs,
            "params": params,
            "build_ms": round(model.build_ms, 3),
            "model": f"/api/models/{key}.pt2",
            "onnx": f"/api/models/{key}.onnx",
            "precision": view.pool.precision,
            "pool_digest": view.pool.digest,
        }
        if body.evaluate:
            out["accuracy"], out["n_test"] = await service.run_slow(service.accuracy, view, model, key)
        return JSONResponse(out)


def add_predict_routes(app: FastAPI, service: Service) -> None:
    """Predictions: images as base64 in JSON, as multipart files, or as the body itself (no JSON, no base64)."""

    @app.post(
        "/api/predict",
        summary="Top classes of base64 PNG/JPEG images under the queried tasks' model",
        responses=refusals(400, 413, 503),
    )
    async def predict(body: PredictBody, request: Request) -> JSONResponse:
        model = (await service.current()).model(body.tasks)  # task errors first
        check_count(len(body.images))
        images = [decode_base64(s, i) for i, s in enumerate(body.images)]
        return Answer(await service.predict(model, images, body.top, request.scope.get("poe.arrival")))

    @app.post(
        "/api/predict/upload",
        summary="As /api/predict, from a multipart form (tasks fields, image files)",
        responses=refusals(400, 413, 503),
    )
    async def predict_upload(
        request: Request,
        tasks: Annotated[
            list[str], Form(min_length=1, description="task names: repeat the field, or separate with commas")
        ],
        images: Annotated[list[UploadFile], File(min_length=1, description="PNG or JPEG files")],
        top: Annotated[int, Form(ge=1)] = DEFAULT_TOP,
    ) -> JSONResponse:
        model = (await service.current()).model(task_names(tasks))
        check_count(len(images))
        data = [await f.read() for f in images]
        return Answer(await service.predict(model, data, top, request.scope.get("poe.arrival")))

    @app.post(
        "/api/predict/raw",
        summary="As /api/predict, from a binary body (one PNG/JPEG file, or uint8 RGB pixels); tasks and top in "
        "the query string",
        responses=refusals(400, 413, 415, 503),
        openapi_extra=RAW_BODY,
    )
    async def predict_raw(
        request: Request,
        tasks: Annotated[
            list[str], Query(min_length=1, description="task names: repeat the parameter, or separate with commas")
        ],
        top: Annotated[int, Query(ge=1, description="classes shown per image, most probable first")] = DEFAULT_TOP,
    ) -> JSONResponse:
        """Answers what ``FastRaw`` passed on: well-formed requests are answered there, by the same ``answer_raw``."""
        unknown = sorted(set(request.query_params) - {"tasks", "top"})
        if unknown:
            raise ClientError(400, f"unknown query parameter {unknown[0][:80]!r}; {USAGE[RAW_PATH]}")
        kind, arrival = content_kind(request.headers), request.scope.get("poe.arrival")
        return Answer(await answer_raw(service, tasks, top, kind, request.body, arrival))


def add_download_routes(app: FastAPI, service: Service) -> None:
    """A queried model as ONNX or ``.pt2``, and the statistics."""

    @app.get(
        "/api/models/{key}.onnx",
        summary="Download a queried model as an ONNX file (fp32; for onnxruntime and other runtimes)",
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}, **refusals(404, 503, 507)},
    )
    async def download_onnx(key: str) -> Response:
        view = await service.current()
        tasks = view.tasks_of(key) if MODEL_ID.fullmatch(f"{key}.pt2") else None  # the same ids as the .pt2's
        if tasks is None:
            raise ClientError(404, f"unknown model {key[:80] + '.onnx'!r}; POST /api/query gives a model URL")
        data = await service.run_slow(service.export, view, key, tasks, "onnx")
        filename = f"poe_{'__'.join(tasks)[:120]}.onnx"
        return Response(
            data,
            media_type="application/octet-stream",
            headers={"content-disposition": f'attachment; filename="{filename}"'},
        )

    @app.get(
        "/api/models/{name}",
        summary="Download a queried model as a torch.export program (.pt2)",
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}, **refusals(404, 503, 507)},
    )
    async def download(name: str) -> Response:
        view = await service.current()
        key = name.removesuffix(".pt2")
        tasks = view.tasks_of(key) if MODEL_ID.fullmatch(name) else None
        if tasks is None:
            raise ClientError(404, f"unknown model {name[:80]!r}; POST /api/query gives a model URL")
        data = await service.run_slow(service.export, view, key, tasks)
        filename = f"poe_{'__'.join(tasks)[:120]}.pt2"
        return Response(
            data,
            media_type="application/octet-stream",
            headers={"content-disposition": f'attachment; filename="{filename}"'},
        )

    @app.get("/api/stats", summary="Batching statistics and the memory of this worker and of every worker")
    async def stats() -> dict[str, Any]:
        return {
            **service.batcher.stats.as_dict(),
            "engine": service.engine,  # torch, or onnx: onnxruntime sessions, made once a module ran 16 forwards
            "engine_sessions": service.batcher.engine.made if service.batcher.engine is not None else 0,
            **memory(),
            "uptime_s": round(time.time() - service.started, 1),
            "models_exported": len(service.view.exports),
            "accuracies_cached": len(service.view.accuracies),
            "caches": service.view.caches(),
            "pool_digest": service.view.pool.digest,
        }


def describe_tasks(schema: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """The schema's task lists name this pool's tasks, each once (the API refuses others with a 400)."""
    for body in ("QueryBody", "PredictBody"):
        prop = schema.get("components", {}).get("schemas", {}).get(body, {}).get("properties", {}).get("tasks")
        if prop is not None:
            prop["items"] = {**prop.get("items", {}), "enum": tasks}
            prop["uniqueItems"] = True
    for param in schema.get("paths", {}).get(RAW_PATH, {}).get("post", {}).get("parameters", []):
        if param.get("name") == "tasks":
            param["schema"]["items"] = {**param["schema"].get("items", {}), "enum": tasks}
            param["schema"]["uniqueItems"] = True
    return schema
