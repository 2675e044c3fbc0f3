"""Recommendations for customers (by id) and prospects (by profile)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from finrec.serving.auth import Principal
from finrec.serving.logs import request_id_var
from finrec.serving.recommender import MAX_K, Answer
from finrec.serving.routes.deps import RecommendCaller, ServiceDep
from finrec.serving.schemas import Problem, ProspectRequest, RecommendationResponse
from finrec.serving.service import Service

router = APIRouter(tags=["recommendations"])

_ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "Unknown customer."},
           422: {"model": Problem, "description": "Invalid request (e.g. k out of range)."}}  # fmt: skip
_WHO = {"x-scopes": ["recommend"]}


def _record(request: Request, service: Service, answer: Answer, caller: Principal) -> JSONResponse:
    body = answer.body
    service.metrics.answer(len(body["items"]), body["k"], body["excluded"], answer.violations)
    if not caller.may("recommend:explain"):
        # What the guardrails removed, and which rules an item passed, say things about the customer (credit,
        # income, age, consent): only for callers allowed to see them.
        body = {**body, "excluded": None,
                "items": [{**it, "reasons": [r for r in it["reasons"] if r["kind"] != "rule"]} for it in body["items"]]}
    # The answer's id (signed, see request_ids.py) names it in the logs and the response header from here on.
    request.scope["state"]["request_id"] = body["request_id"]
    request_id_var.set(body["request_id"])
    # The body is built from plain values by the Recommender, which tests hold to RecommendationResponse;
    # returning it directly skips FastAPI's re-validation and re-encoding (a third of the HTTP layer's time).
    return JSONResponse(body)


@router.get("/recommend/{user_id}", response_model=RecommendationResponse, responses=_ERRORS, openapi_extra=_WHO)
async def recommend(
    request: Request,
    caller: RecommendCaller,
    service: ServiceDep,
    user_id: Annotated[str, Path(min_length=1, max_length=128, description="Customer id.", examples=["42"])],
    k: Annotated[int, Query(ge=1, le=MAX_K, description=f"How many products (1-{MAX_K}).")] = 10,
) -> JSONResponse:
    """The best `k` products for a customer, each with its reasons; fewer when fewer pass the guardrails.

    `excluded` and rule-based reasons are given to keys with the `recommend:explain` scope only (else null / left
    out). Send the answer's `request_id` with the events it leads to.
    """
    args = (user_id.strip(), k, request.scope["state"]["request_id"])
    if service.blocking:  # stores that may wait on a disk or a network: never on the event loop
        answer = await run_in_threadpool(service.recommender.recommend, *args)
    else:
        answer = service.recommender.recommend(*args)
    return _record(request, service, answer, caller)


@router.post("/recommend", response_model=RecommendationResponse, responses=_ERRORS, openapi_extra=_WHO)
async def recommend_prospect(request: Request, caller: RecommendCaller, service: ServiceDep,
                             body: ProspectRequest) -> JSONResponse:  # fmt: skip
    """The best `k` products for someone who is not a customer yet, from the profile they give.

    The same guardrails apply; a rule that needs a field the profile leaves out is failed.
    """
    profile = body.profile.model_dump()
    if profile.get("marketing_consent") is not None:
        profile["marketing_consent"] = float(profile["marketing_consent"])
    args = (profile, body.k, request.scope["state"]["request_id"])
    if service.blocking:
        answer = await run_in_threadpool(service.recommender.recommend_prospect, *args)
    else:
        answer = service.recommender.recommend_prospect(*args)
    return _record(request, service, answer, caller)
