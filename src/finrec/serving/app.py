"""The HTTP API: an app factory, a lifespan that loads the model, error handlers, metrics and request ids.

Routes live in :mod:`finrec.serving.routes`; request-time logic in
:class:`~finrec.serving.recommender.Recommender`. Every client mistake is a
4xx with a JSON body that says what is wrong, where and how to fix it; a 5xx
means a bug, is logged with the request id, and never shows a traceback.

Run it with ``finrec serve`` (uvicorn with uvloop and httptools), or build it in
code::

    app = create_app(settings)                 # loads the model in the lifespan
    app = create_app(settings, service=svc)    # serve an already loaded Service (tests)
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from finrec import __version__
from finrec.config import FinrecSettings, load_settings
from finrec.errors import ArtifactError, FinrecError
from finrec.registry import PromotionRefused, UnknownVersionError
from finrec.serving.logs import request_id_var
from finrec.serving.recommender import UnknownCustomerError
from finrec.serving.service import Service

log = logging.getLogger("finrec.serving")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

DESCRIPTION = """
Recommendations of financial products, guarded before any scoring: a customer is only ever shown products
they are eligible for and suited to, that they do not hold, have not just been declined for and have not
seen too often. Each item says why; every answer is audited.

* `GET /recommend/{user_id}`: a known customer.  `POST /recommend`: a prospect, from their profile.
* `POST /events`: feedback (impression, view, click, apply, approve, decline, hold, close); idempotent on `event_id`.
* `GET /health`, `GET /ready`, `GET /metrics` (Prometheus).  Admin endpoints need the `X-API-Key` header.
"""


class RequestContext:
    """Pure ASGI middleware: request id, latency and status metrics by route template, optional access log."""

    def __init__(self, app: ASGIApp, access_log: bool = False) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - t0
            route = getattr(scope.get("route"), "path", None) or "(unmatched)"  # template: no ids in labels or logs
            service: Service | None = getattr(scope["app"].state, "service", None)
            if service is not None:
                service.metrics.requests.labels(route, scope["method"], str(status)).inc()
                service.metrics.latency.labels(route).observe(seconds)
            if self.access_log:
                log.info("request", extra={"method": scope["method"], "route": route, "status": status,
                                           "ms": round(seconds * 1000, 3)})  # fmt: skip
            request_id_var.reset(token)


def _problem(status: int, error: str, hint: str | None = None, **extra: Any) -> JSONResponse:
    body = {"error": error, "hint": hint, "request_id": request_id_var.get(), **extra}
    return JSONResponse(body, status_code=status)


def _where(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("query", "path", "header", "body"):
        return f"{parts[0]}: {'.'.join(parts[1:]) or '(whole body)'}"
    return ".".join(parts)


def _problem_of(e: Any) -> dict[str, str]:
    if e.get("type") == "json_invalid":
        return {"where": "body", "message": f"not valid JSON (at character {e['loc'][-1]}): "
                                            f"{e.get('ctx', {}).get('error', 'decode error')}"}  # fmt: skip
    return {"where": _where(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")}


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [_problem_of(e) for e in exc.errors()]
        first = problems[0] if problems else {"where": "request", "message": "invalid"}
        return _problem(422, f"invalid request: {first['where']}: {first['message']}",
                        "see /docs for the expected shape of this request", problems=problems)  # fmt: skip

    @app.exception_handler(UnknownCustomerError)
    async def unknown(_: Request, exc: UnknownCustomerError) -> JSONResponse:
        return _problem(404, exc.message, exc.hint)

    @app.exception_handler(ArtifactError)
    async def refused(_: Request, exc: ArtifactError) -> JSONResponse:
        return _problem(422, f"refused: {exc.message}", exc.hint)

    @app.exception_handler(PromotionRefused)
    async def gate_refused(_: Request, exc: PromotionRefused) -> JSONResponse:
        return _problem(409, exc.message, exc.hint, gate=exc.gate.to_dict())

    @app.exception_handler(UnknownVersionError)
    async def unknown_version(_: Request, exc: UnknownVersionError) -> JSONResponse:
        return _problem(404, exc.message, exc.hint)

    @app.exception_handler(FinrecError)
    async def finrec_error(_: Request, exc: FinrecError) -> JSONResponse:
        return _problem(400, exc.message, exc.hint)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        hints = {404: "see /docs for the routes", 405: "see /docs for the methods of this route"}
        response = _problem(exc.status_code, detail, hints.get(exc.status_code))
        for k, v in (exc.headers or {}).items():
            response.headers[k] = v
        return response

    @app.exception_handler(Exception)
    async def bug(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return _problem(500, "internal error", "this is a bug in finrec; quote the request_id when reporting it")


def _install_docs(app: FastAPI) -> None:
    """Swagger UI and ReDoc from files shipped with the package: FastAPI's defaults load them from a public CDN,
    which a bank's network (or this project's CI) cannot reach, leaving /docs blank."""
    import fastapi_offline
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    static = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/docs-assets", StaticFiles(directory=static), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="finrec API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png")  # fmt: skip

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="finrec API",
                              redoc_js_url="/docs-assets/redoc.standalone.js",
                              redoc_favicon_url="/docs-assets/favicon.png", with_google_fonts=False)  # fmt: skip


def create_app(settings: FinrecSettings | None = None, *, service: Service | None = None,
               model_dir: Path | None = None, data_dir: Path | None = None) -> FastAPI:  # fmt: skip
    """Build the API. Without ``service``, the lifespan loads one from ``settings`` (and the given folders)."""
    from finrec.serving.routes import admin, dashboard, events, operations, recommend

    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = service is None
        app.state.service = service or Service.from_settings(settings, model_dir, data_dir)
        app.state.service.metrics.set_models(app.state.service.versions().values())
        try:
            yield
        finally:
            if own:
                app.state.service.close()

    app = FastAPI(title="finrec", version=__version__, description=DESCRIPTION, lifespan=lifespan, docs_url=None,
                  redoc_url=None)  # fmt: skip
    _install_docs(app)
    app.state.service = None
    app.add_middleware(RequestContext, access_log=bool(os.environ.get("FINREC_ACCESS_LOG")))
    _install_handlers(app)
    for module in (recommend, events, operations, admin, dashboard):
        app.include_router(module.router)
    return app


def app_from_environment() -> FastAPI:
    """Factory for uvicorn workers (``--workers N``): settings come from ``FINREC_*`` variables set by the CLI."""
    from finrec.serving.logs import configure_json_logging

    configure_json_logging()
    return create_app(load_settings())
