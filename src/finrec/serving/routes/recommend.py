"""Recommendations for customers (by id) and prospects (by profile)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse

from finrec.serving.recommender import MAX_K, Answer
from finrec.serving.routes.deps import ServiceDep
from finrec.serving.schemas import Problem, ProspectRequest, RecommendationResponse
from finrec.serving.service import Service

router = APIRouter(tags=["recommendations"])

_ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "Unknown customer."},
           422: {"model": Problem, "description": "Invalid request (e.g. k out of range)."}}  # fmt: skip


def _record(service: Service, answer: Answer) -> JSONResponse:
    body = answer.body
    service.metrics.answer(len(body["items"]), body["k"], body["excluded"], answer.violations)
    # The body is built from plain values by the Recommender, which tests hold to RecommendationResponse;
    # returning it directly skips FastAPI's re-validation and re-encoding (a third of the HTTP layer's time).
    return JSONResponse(body)


@router.get("/recommend/{user_id}", response_model=RecommendationResponse, responses=_ERRORS)
async def recommend(
    request: Request,
    service: ServiceDep,
    user_id: Annotated[str, Path(min_length=1, max_length=128, description="Customer id.", examples=["42"])],
    k: Annotated[int, Query(ge=1, le=MAX_K, description=f"How many products (1-{MAX_K}).")] = 10,
) -> JSONResponse:
    """The best `k` products for a customer, each with its reasons; fewer when fewer pass the guardrails."""
    answer = service.recommender.recommend(user_id.strip(), k, request.scope["state"]["request_id"])
    return _record(service, answer)


@router.post("/recommend", response_model=RecommendationResponse, responses=_ERRORS)
async def recommend_prospect(request: Request, service: ServiceDep, body: ProspectRequest) -> JSONResponse:
    """The best `k` products for someone who is not a customer yet, from the profile they give.

    The same guardrails apply; a rule that needs a field the profile leaves out is failed.
    """
    profile = body.profile.model_dump()
    if profile.get("marketing_consent") is not None:
        profile["marketing_consent"] = float(profile["marketing_consent"])
    answer = service.recommender.recommend_prospect(profile, body.k, request.scope["state"]["request_id"])
    return _record(service, answer)
