"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict:
    """The process is alive (says nothing about the model; see /ready)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> Response:
    """200 once the models are loaded: the default model's version and stages, every arm's version, the running
    experiment and the service clock; 503 before."""
    service = request.app.state.service
    if service is None:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
    rec = service.recommender
    now = rec.clock()
    active = rec.assigner.active(now)
    return JSONResponse({"status": "ready", **rec.model.describe(), "clock": service.settings.serve.clock,
                         "service_time": now, "source": service.source.kind, "models": service.versions(),
                         "experiment": None if active is None else active.name})  # fmt: skip


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests and latency by route and status, model version, guardrail removals."""
    service = request.app.state.service
    body = service.metrics.render() if service is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
