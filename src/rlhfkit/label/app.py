"""The labelling web app (FastAPI on uvicorn): a static page and the JSON API it and scripts use.

    GET  /                     the page (public: it holds no data; it asks for a token)
    GET  /static/...           its script and style (no build step, no CDN: works offline)
    GET  /api/whoami           {"name", "role"}
    GET  /api/next             {"item_id", "prompt", "responses"} leased to the caller, or 204 when none is left
    POST /api/labels           {"item_id", "ranks"} | {"item_id", "skip": true} | {"item_id", "none_acceptable":
                               true}, optional "comment" -> 200 and the stored label (a retry gets the same)
    GET  /api/labels           the caller's own labels
    GET  /api/progress         the caller's progress and the guidelines
    GET  /api/admin/progress   admin only: everyone's progress, per-annotator counts, agreement

Every /api request needs `Authorization: Bearer TOKEN`. A refused request gets a 4xx and `{"error": "..."}`;
an unexpected failure a 500 with `{"error": ...}` and no traceback (that goes to the server's log).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhfkit.label import assign
from rlhfkit.label.auth import authenticate, bearer_token
from rlhfkit.label.labels import Problem, parse_label
from rlhfkit.label.report import project_report
from rlhfkit.label.store import Annotator, Store

MAX_BODY_BYTES = 1 << 20  # 1 MiB
log = logging.getLogger("rlhfkit.label")

# The page runs only its own script and style: model output that slipped into the DOM as HTML could not run.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    """Pure ASGI middleware: the headers above on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_json(request: Request):
    """The request body as JSON, refusing a body over MAX_BODY_BYTES before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise Problem(413, f"request body over the limit of {MAX_BODY_BYTES} bytes (1 MiB)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Problem(413, f"request body over the limit of {MAX_BODY_BYTES} bytes (1 MiB)")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise Problem(400, "empty request body: send a JSON object")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise Problem(400, f"request body is not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise Problem(400, f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") \
            from None
    except (ValueError, RecursionError) as exc:
        raise Problem(400, f"request body is not valid JSON: {str(exc)[:100] or type(exc).__name__}") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def create_app(path, lease_seconds: int | None = None) -> FastAPI:
    """The app over the project at `path`; `lease_seconds` overrides the project's assignment timeout."""
    store = Store(path)
    lease = store.lease_seconds if lease_seconds is None else lease_seconds
    app = FastAPI(title="rlhfkit labelling", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.add_middleware(SecurityHeaders)
    static = resources.files("rlhfkit.label") / "static"

    @app.exception_handler(Problem)
    async def problem(_request, exc: Problem):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, exc.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_problem(request, exc: StarletteHTTPException):
        message = {404: f"not found: {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                          str(exc.detail))
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        return _error(400, f"invalid request: {exc.errors()[:1]}")

    @app.exception_handler(sqlite3.OperationalError)
    async def store_busy(_request, exc: sqlite3.OperationalError):
        log.error("label store error: %s", exc)
        return _error(503, "the label store could not be used just now (nothing was saved); retry")

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        log.exception("unexpected error", exc_info=exc)
        return _error(500, "internal error (nothing was saved); the server's log has the details")

    async def caller(request: Request, role: str = "annotator") -> Annotator:
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            raise Problem(401, "missing token: send the header 'Authorization: Bearer TOKEN'")
        who = await run_in_threadpool(authenticate, store, token)
        if who is None:
            raise Problem(401, "invalid token")
        if who.role != role:
            raise Problem(403, "this needs an admin token" if role == "admin" else
                          "an admin token does not label; add an annotator with `rlhfkit label add-annotator`")
        return who

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"), media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/api/whoami")
    async def whoami(request: Request):
        token = bearer_token(request.headers.get("authorization"))
        who = await run_in_threadpool(authenticate, store, token) if token else None
        if who is None:
            raise Problem(401, "missing token: send the header 'Authorization: Bearer TOKEN'" if token is None
                          else "invalid token")
        return {"name": who.name, "role": who.role}

    @app.get("/api/next")
    async def next_item(request: Request):
        who = await caller(request)
        item = await run_in_threadpool(assign.next_item, store, who.id, None, lease)
        if item is None:
            return Response(status_code=204)
        return item

    @app.post("/api/labels")
    async def post_label(request: Request):
        who = await caller(request)
        label = parse_label(await read_json(request))
        return await run_in_threadpool(assign.submit, store, who.id, label)

    @app.get("/api/labels")
    async def my_labels(request: Request):
        who = await caller(request)
        return {"labels": await run_in_threadpool(store.labels, who.id)}

    @app.get("/api/progress")
    async def progress(request: Request):
        who = await caller(request)
        done = await run_in_threadpool(assign.progress, store, who.id)
        return {"annotator": who.name, **done, "guidelines": store.guidelines}

    @app.get("/api/admin/progress")
    async def admin_progress(request: Request):
        await caller(request, role="admin")
        return await run_in_threadpool(project_report, store)

    return app

