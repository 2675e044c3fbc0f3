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

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from finrec import __version__
from finrec.config import FinrecSettings, load_resolved_settings, load_settings
from finrec.errors import ArtifactError, ConfigError, FinrecError
from finrec.registry import PromotionRefused, UnknownVersionError
from finrec.serving.auth import KeyTable, is_loopback
from finrec.serving.logs import request_id_var
from finrec.serving.paths import register_paths, scrub_paths
from finrec.serving.recommender import UnknownCustomerError
from finrec.serving.service import ModelRefused, Service
from finrec.storage import StoreUnavailable, store_unavailable

log = logging.getLogger("finrec.serving")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

DESCRIPTION = """
Recommendations of financial products, guarded before any scoring: a customer is only ever shown products
they are eligible for and suited to, that they do not hold, have not just been declined for and have not
seen too often. Each item says why; every answer is audited.

* `GET /recommend/{user_id}`: a known customer.  `POST /recommend`: a prospect, from their profile.
* `POST /events`: feedback (impression, view, click, apply, approve, decline, hold, close); idempotent on `event_id`.
* `GET /health`, `GET /ready` (anyone), `GET /metrics` (Prometheus), `/dashboard`.

Every other route needs an API key in the `X-API-Key` header whose scopes allow it: `recommend`,
`recommend:explain` (what the guardrails removed and rule reasons), `events`, `events:trusted` (ownership
events: approve, decline, hold, close), `monitor`, `admin`. Each operation below says which.
"""


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body outgrows ``serve.max_body_bytes`` (FastAPI re-raises HTTP errors)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit:,} bytes, the most this service accepts")


class RequestContext:
    """Pure ASGI middleware: request id, body size limit, latency and status metrics by route template, optional
    access log, and the answer to an error no handler took: 503 with Retry-After when a store failed, else 500.

    It runs inside Starlette's outermost error middleware, so the answers it makes still carry the request id.
    """

    def __init__(self, app: ASGIApp, access_log: bool = False, max_body_bytes: int = 1_048_576) -> None:
        self.app = app
        self.access_log = access_log
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status = 500
        started = False
        t0 = time.perf_counter()
        limit = self.max_body_bytes

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", state["request_id"].encode()))
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await _send_problem(send_with_id, 413, str(BodyTooLarge(limit).detail), _HINTS[413])
            else:
                await self.app(scope, limited_receive, send_with_id)
        except Exception as exc:  # what no handler took: a store failure (503) or a bug (500)
            if started:
                raise
            unavailable = store_unavailable(exc)
            if unavailable is not None:
                log.warning("store unavailable", extra={"error": unavailable.message})
                await _send_problem(send_with_id, 503, unavailable.message, unavailable.hint,
                                    {"Retry-After": str(unavailable.retry_after)})  # fmt: skip
            else:
                log.error("unhandled error", exc_info=exc)
                await _send_problem(send_with_id, 500, "internal error",
                                    "this is a bug in finrec; quote the request_id when reporting it")  # fmt: skip
        finally:
            seconds = time.perf_counter() - t0
            route = getattr(scope.get("route"), "path", None) or "(unmatched)"  # template: no ids in labels or logs
            service: Service | None = getattr(scope["app"].state, "service", None)
            if service is not None:
                service.metrics.requests.labels(route, scope["method"], str(status)).inc()
                service.metrics.latency.labels(route).observe(seconds)
            if self.access_log:
                log.info("request", extra={"method": scope["method"], "route": route, "status": status,
                                           "caller": state.get("caller"), "ms": round(seconds * 1000, 3)})  # fmt: skip
            request_id_var.reset(token)


async def _send_problem(send: Send, status: int, error: str, hint: str | None,
                        headers: dict[str, str] | None = None) -> None:  # fmt: skip
    response = _problem(status, error, hint)
    for k, v in (headers or {}).items():
        response.headers[k] = v
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


_HINTS = {
    400: "send the body as JSON text in UTF-8 with `Content-Type: application/json`; see /docs for its shape",
    401: "send a valid key in the X-API-Key header; ask the service's operator for one",
    403: "ask the service's operator for a key with the scope this route needs (see /docs)",
    404: "see /docs for the routes",
    405: "see /docs for the methods of this route",
    413: "send less: split the batch, or ask the operator to raise serve.max_body_bytes",
    429: "slow down: wait for the seconds in Retry-After, then send again",
}
#: Problems listed per invalid request at most; the answer says how many there were in all.
MAX_PROBLEMS = 20


def _problem(status: int, error: str, hint: str | None = None, **extra: Any) -> JSONResponse:
    body = {"error": scrub_paths(error), "hint": None if hint is None else scrub_paths(hint),
            "request_id": request_id_var.get(), **extra}  # fmt: skip
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
        errors = exc.errors()
        problems = [_problem_of(e) for e in errors[:MAX_PROBLEMS]]
        first = problems[0] if problems else {"where": "request", "message": "invalid"}
        return _problem(422, f"invalid request: {first['where']}: {first['message']}",
                        "see /docs for the expected shape of this request", problems=problems,
                        problem_count=len(errors))  # fmt: skip

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

    @app.exception_handler(ModelRefused)
    async def model_refused(_: Request, exc: ModelRefused) -> JSONResponse:
        return _problem(409, exc.message, exc.hint)

    @app.exception_handler(StoreUnavailable)
    async def unavailable(_: Request, exc: StoreUnavailable) -> JSONResponse:
        response = _problem(503, exc.message, exc.hint)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(FinrecError)
    async def finrec_error(_: Request, exc: FinrecError) -> JSONResponse:
        return _problem(400, exc.message, exc.hint)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = "the request body cannot be read: it is not UTF-8 text, or not the JSON this route takes"
        response = _problem(exc.status_code, detail, _HINTS.get(exc.status_code))
        for k, v in (exc.headers or {}).items():
            response.headers[k] = v
        return response


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
               model_dir: Path | None = None, data_dir: Path | None = None,
               keys: KeyTable | None = None) -> FastAPI:  # fmt: skip
    """Build the API. Without ``service``, the lifespan loads one from ``settings`` (and the given folders).

    ``keys`` are the API keys it accepts (default: those of ``settings``, see :mod:`finrec.serving.auth`).

    Raises
    ------
    ConfigError
        A key is too short or cannot be read, or authentication is off on an address others can reach.
    """
    from finrec.serving.routes import admin, dashboard, events, operations, recommend

    settings = settings or load_settings()
    keys = keys if keys is not None else KeyTable.from_settings(settings)
    if keys.disabled:
        if not is_loopback(settings.serve.host):
            raise ConfigError(f"authentication cannot be turned off on {settings.serve.host}: every caller there "
                              "would have every scope", hint="use --no-auth only with --host 127.0.0.1; configure "
                              "API keys ([[auth.keys]]) for any other address")  # fmt: skip
        log.warning("AUTHENTICATION IS OFF (--no-auth): every caller on this machine has every scope, admin "
                    "included; for development only")  # fmt: skip
    elif not len(keys):
        log.warning("no API keys are configured: every route but /health and /ready answers 401")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = service is None
        app.state.service = service or Service.from_settings(settings, model_dir, data_dir)
        app.state.service.metrics.set_models(app.state.service.versions().values())
        register_paths(app.state.service.private_paths())
        try:
            yield
        finally:
            if own:
                app.state.service.close()

    app = FastAPI(title="finrec", version=__version__, description=DESCRIPTION, lifespan=lifespan, docs_url=None,
                  redoc_url=None)  # fmt: skip
    _install_docs(app)
    app.state.service = None
    app.state.keys = keys
    register_paths([settings.workspace, model_dir, data_dir, settings.serve.model_dir, settings.serve.data,
                    settings.serve.models_root, settings.registry.root])  # fmt: skip
    app.add_middleware(RequestContext, access_log=bool(os.environ.get("FINREC_ACCESS_LOG")),
                       max_body_bytes=settings.serve.max_body_bytes)  # fmt: skip
    _install_handlers(app)
    for module in (recommend, events, operations, admin, dashboard):
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


_ERROR_RESPONSES = {
    "400": "The body cannot be read: not UTF-8, or not JSON.",
    "401": "No key, or a key this service does not know (header X-API-Key).",
    "403": "The key lacks the scope this route needs.",
    "413": "The body is larger than serve.max_body_bytes.",
    "429": "The key's rate limit is reached; wait for Retry-After seconds.",
    "503": "A store (event log, online features) is unavailable, or the model is loading; retry after Retry-After "
    "seconds.",
}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus who may call each operation and the errors every operation can answer."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    problem = {"$ref": "#/components/schemas/Problem"}
    doc.setdefault("components", {}).setdefault("schemas", {}).setdefault("Problem", _problem_schema())
    for methods in doc.get("paths", {}).values():
        for op in methods.values():
            scopes = op.get("x-scopes")
            responses = op.setdefault("responses", {})
            codes = ["503"]
            if "requestBody" in op:
                codes += ["400", "413"]
            if scopes:
                codes += ["401", "403", "429"]
                op["description"] = (op.get("description", "") + "\n\n**Who may call:** a key with the scope "
                                     + " or ".join(f"`{s}`" for s in scopes) + " (header `X-API-Key`).").strip()
            elif scopes is not None:
                op["security"] = []
                op["description"] = (op.get("description", "") + "\n\n**Who may call:** anyone (no key).").strip()
            for code in codes:
                responses.setdefault(code, {"description": _ERROR_RESPONSES[code],
                                            "content": {"application/json": {"schema": problem}}})  # fmt: skip
    app.openapi_schema = doc
    return doc


def _problem_schema() -> dict[str, Any]:
    from finrec.serving.schemas import Problem

    return Problem.model_json_schema()


def app_from_environment() -> FastAPI:
    """Factory for uvicorn workers (``--workers N``): the settings ``finrec serve`` resolved (file, variables and
    flags), from the file ``$FINREC_RESOLVED_SETTINGS`` names; without it, resolved again here."""
    from finrec.serving.logs import configure_json_logging

    configure_json_logging()
    resolved = os.environ.get("FINREC_RESOLVED_SETTINGS")
    return create_app(load_resolved_settings(Path(resolved)) if resolved else load_settings())
