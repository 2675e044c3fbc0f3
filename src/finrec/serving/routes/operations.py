"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from finrec.serving.routes.deps import MonitorCaller

router = APIRouter(tags=["operations"])
_ANYONE: dict[str, Any] = {"x-scopes": []}


@router.get("/health", openapi_extra=_ANYONE)
async def health() -> dict:
    """The process is alive (says nothing about the model or the stores; see /ready)."""
    return {"status": "ok"}


@router.get("/ready", openapi_extra=_ANYONE)
async def ready(request: Request) -> Response:
    """200 once the models are loaded and every store answers: the default model's version and stages, every arm's
    version, the running experiment, the service clock and each store's state; 503 (with Retry-After) while the
    model loads or a store is unavailable."""
    service = request.app.state.service
    if service is None:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
    stores = await run_in_threadpool(service.check_stores) if service.blocking else service.check_stores()
    rec = service.recommender
    now = rec.clock()
    active = rec.assigner.active(now)
    ok = all(v == "ok" for v in stores.values())
    body = {"status": "ready" if ok else "unavailable", **rec.model.describe(), "clock": service.settings.serve.clock,
            "service_time": now, "source": service.source.kind, "models": service.versions(),
            "experiment": None if active is None else active.name, "stores": stores}  # fmt: skip
    retry = {} if ok else {"Retry-After": str(max(1, int(service.settings.serve.breaker_reset_seconds)))}
    return JSONResponse(body, status_code=200 if ok else 503, headers=retry)


@router.get("/metrics", response_class=PlainTextResponse, openapi_extra={"x-scopes": ["monitor"]})
async def metrics(request: Request, _: MonitorCaller) -> Response:
    """Prometheus metrics: requests and latency by route and status, model version, guardrail removals."""
    service = request.app.state.service
    body = service.metrics.render() if service is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
