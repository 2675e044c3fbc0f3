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
    """200 with the model's version and stages once a model is loaded; 503 before."""
    service = request.app.state.service
    if service is None:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
    model = service.recommender.model
    return JSONResponse({"status": "ready", **model.describe(), "clock": service.settings.serve.clock,
                         "service_time": service.recommender.clock()})  # fmt: skip


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests and latency by route and status, model version, guardrail removals."""
    service = request.app.state.service
    body = service.metrics.render() if service is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
