"""The ASGI app: API key and body-size checks in front, the page, health, metrics, progress, both APIs.

Middleware is plain ASGI so that a request without the key, or with a body over the cap, is answered
before its body is read. Every error is JSON in the shape of the API the path belongs to; no route reads
or writes a file named by a request (the page's three files are read once, from the package).
"""
from __future__ import annotations

import asyncio
import hmac
import re
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from .errors import ApiError, error_body, error_bytes
from .worker import Task, timeout_error

OPEN_PATHS = ("/", "/app.js", "/style.css", "/health", "/favicon.ico")  # no data in them: no key needed
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript"),
              "/style.css": ("style.css", "text/css")}
TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
POLL_SECONDS = 0.25
DRAIN = 4  # an oversized body is read up to DRAIN x the cap before the 413, then the connection closed


class Server:
    """What the routes share."""

    def __init__(self, engine, worker, limits, api_key: str | None):
        self.engine, self.worker, self.limits, self.api_key = engine, worker, limits, api_key
        self.started = time.time()


def create_app(server: Server) -> FastAPI:
    from . import a1111, a1111_controlnet, openai_api

    app = FastAPI(title="flashsd3-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    _error_handlers(app)
    _common_routes(app, server)
    openai_api.add_routes(app, server)
    a1111.add_routes(app, server)
    a1111_controlnet.add_routes(app, server)
    outer = BodyLimit(app, server.limits.max_body)
    return ApiKey(outer, server.api_key) if server.api_key else outer


async def generate(request: Request, server: Server, spec, task_id: str | None) -> Task:
    """Queue `spec`, wait for it (cancelling it if the client goes away or the time cap passes)."""
    if task_id is not None and not TASK_ID.match(task_id):
        raise ApiError(400, "task id must be 1-64 characters of A-Z a-z 0-9 _ -", param="task_id")
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    task = Task(task_id or uuid.uuid4().hex, spec, time.monotonic() + server.limits.timeout)
    task.on_done = lambda: loop.call_soon_threadsafe(done.set)
    server.worker.submit(task)
    while not done.is_set():
        remaining = task.deadline - time.monotonic()
        if remaining <= 0:
            server.worker.cancel(task, timeout_error(server.limits))
            if task.state in ("queued", "running"):
                raise timeout_error(server.limits)
            break
        try:
            await asyncio.wait_for(done.wait(), min(POLL_SECONDS, remaining))
        except TimeoutError:
            if await request.is_disconnected():
                server.worker.cancel(task, ApiError(499, "client disconnected", code="cancelled"))
                raise ApiError(499, "client disconnected", code="cancelled") from None
    task.wanted = False
    if task.error is not None:
        raise task.error
    return task


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(request.url.path, e.status, e.message, e.param, e.code), e.status,
                            headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return JSONResponse(error_body(request.url.path, e.status_code, message.get(e.status_code, str(e.detail))),
                            e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(error_body(request.url.path, 422, f"{where}: {first.get('msg', 'invalid')}"), 422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):  # the console has the traceback, the client a line
        return JSONResponse(error_body(request.url.path, 500, f"internal error ({type(e).__name__})",
                                       code="internal_error"), 500)


def _common_routes(app: FastAPI, server: Server) -> None:
    page = {path: (resources.files(__package__).joinpath("static", name).read_bytes(), kind)
            for path, (name, kind) in PAGE_FILES.items()}

    for path in PAGE_FILES:
        def serve_file(path=path):
            body, kind = page[path]
            return Response(body, media_type=kind, headers={"Cache-Control": "no-cache"})
        app.get(path, include_in_schema=False)(serve_file)

    @app.get("/health")
    def health():
        status = server.worker.status()
        return {"status": "shutting_down" if status["closing"] else "ok", "queue_length": status["queue_length"],
                "uptime_s": round(time.time() - server.started, 1)}

    @app.get("/metrics")
    def metrics():
        m, status = server.worker.metrics, server.worker.status()
        rows = [("queue_length", "gauge", status["queue_length"], "requests waiting"),
                ("running_requests", "gauge", status["running"], "requests in the running batch"),
                ("requests_total", "counter", m.requests, "requests accepted into the queue"),
                ("images_served_total", "counter", m.images, "images generated and answered"),
                ("requests_failed_total", "counter", m.failed, "accepted requests that got an error"),
                ("requests_cancelled_total", "counter", m.cancelled, "requests dropped: client gone or timeout"),
                ("requests_rejected_total", "counter", m.rejected, "requests refused with 429 (queue full)"),
                ("batches_total", "counter", m.batches, "model calls run to the end"),
                ("step_seconds_mean", "gauge", m.step_seconds / m.steps if m.steps else 0.0,
                 "mean wall time of a sampler step of the running batches")]
        text = "".join(f"# HELP flashsd3_{name} {what}\n# TYPE flashsd3_{name} {kind}\nflashsd3_{name} {value}\n"
                       for name, kind, value, what in rows)
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.get("/api/config")
    def config():
        return page_config(server)

    @app.get("/api/progress/{task_id}")
    def progress(task_id: str):
        task = server.worker.task(task_id) if TASK_ID.match(task_id) else None
        if task is None:
            raise ApiError(404, f"no task {task_id[:64]!r} (unknown, or finished long ago)", param="task_id",
                           code="unknown_task")
        return {"task_id": task.id, "state": task.state, "queue_position": server.worker.position(task),
                "step": task.step, "steps": task.steps, "images": task.spec.n, "model_batch": task.model_batch}


def page_config(server: Server) -> dict:
    """What the page offers: recipes, samplers, adapters, limits, the model's defaults."""
    from ..recipes import RECIPES
    from ..sampling.table import SAMPLERS
    from .controls import MODULES
    from .spec import build_spec

    engine, limits = server.engine, server.limits
    default = build_spec({"prompt": "", "seed": 0}, engine, limits, status=400).recipe
    return {"model": engine.model_label, "default_size": engine.default_size, "size_step": engine.image_factor,
            "default_recipe": default.name, "samplers": list(SAMPLERS),
            "recipes": {name: {"sampler": r.sampler, "steps": r.steps, "guidance": r.guidance, "shift": r.shift}
                        for name, r in RECIPES.items()},
            "loras": [{"name": n, "scale": s} for n, _, s in engine.loras],
            "controlnets": [{"name": c.name, "scale": c.scale, "control_type": c.net.config.control_type,
                             "inpainting": bool(c.net.config.extra_channels)} for c in engine.controlnets],
            "modules": list(MODULES),
            "limits": {"max_pixels": limits.max_pixels, "max_images": limits.max_images,
                       "max_steps": limits.max_steps, "max_prompt_chars": limits.max_prompt,
                       "max_upload_pixels": limits.max_upload_pixels, "max_body_bytes": limits.max_body,
                       "max_controlnets": limits.max_controlnets},
            "auth": server.api_key is not None}


class ApiKey:
    """Bearer token on every path but the page and /health; compared in constant time."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                             "(the server's --api-key)", code="invalid_api_key")
            return await _send_error(send, scope["path"], error, {"WWW-Authenticate": "Bearer"})
        return await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over `limit` bytes: from Content-Length before reading, else while reading."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        too_big = ApiError(413, f"request body over this server's cap of {self.limit} bytes (--max-body-mb)",
                           code="body_too_large")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_error(send, scope["path"], too_big, {"Connection": "close"})
        chunks, size, more = [], 0, True
        while more:  # read the body here (at most `limit` bytes), then hand it on
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:  # read on (up to a bound) so the client is not reset before it reads the 413
                while more and size <= DRAIN * self.limit:
                    message = await receive()
                    size += len(message.get("body", b""))
                    more = message.get("more_body", False)
                return await _send_error(send, scope["path"], too_big, {"Connection": "close"})
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the client's disconnect, when it comes
        return await self.app(scope, replay, send)


async def _send_error(send, path: str, error: ApiError, headers: dict[str, str]) -> None:
    body = error_bytes(path, error)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
