"""Feedback events."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException

from finrec.serving.routes.deps import ServiceDep
from finrec.serving.schemas import EVENTS_EXAMPLE, EventsResponse, Problem

router = APIRouter(tags=["events"])


@router.post("/events", response_model=EventsResponse,
             responses={413: {"model": Problem, "description": "Too many events in one request."}})  # fmt: skip
def post_events(
    service: ServiceDep,
    events: Annotated[list[Any], Body(description="A JSON array of event objects.", examples=[EVENTS_EXAMPLE])],
) -> dict:
    """Store a batch of feedback events; idempotent on `event_id`.

    Each event is checked on its own: valid ones are stored (durably) even when others in the batch are
    rejected, and each rejection says which field is wrong and how to fix it. Re-sending an event
    (same `event_id`) is harmless: it counts as a duplicate.
    Fields: `event_id`, `user_id`, `product_id`, `event_type` (required); `timestamp` (ISO 8601 or Unix
    seconds; default now; not in the future), `position`, `request_id`, `channel`, `arm`, `model_version`.
    """
    limit = service.settings.serve.max_events_per_request
    if len(events) > limit:
        raise HTTPException(413, f"{len(events)} events in one request; at most {limit} are accepted, "
                                 "split the batch")  # fmt: skip
    try:
        result = service.recommender.ingest(events, max_batch=limit)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    m = service.metrics.events
    m.labels("accepted").inc(result["accepted"])
    m.labels("duplicate").inc(result["duplicates"])
    m.labels("rejected").inc(len(result["rejected"]))
    return result
