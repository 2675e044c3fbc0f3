"""Feedback events."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException
from fastapi.responses import JSONResponse

from finrec.serving.logs import request_id_var
from finrec.serving.routes.deps import EventsCaller, ServiceDep
from finrec.serving.schemas import EVENTS_EXAMPLE, EventsResponse, Problem

router = APIRouter(tags=["events"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": Problem, "description": "Too many events in one request."},
    422: {"model": EventsResponse | Problem, "description": "Not one event of the batch could be stored: each "
          "rejection says what is wrong, where and how to fix it (or the body is not an array of objects)."},
}


@router.post("/events", response_model=EventsResponse, responses=_ERRORS,
             openapi_extra={"x-scopes": ["events", "events:trusted"]})  # fmt: skip
def post_events(
    caller: EventsCaller,
    service: ServiceDep,
    events: Annotated[list[Any], Body(description="A JSON array of event objects.", examples=[EVENTS_EXAMPLE])],
) -> Any:
    """Store a batch of feedback events; idempotent on `event_id`.

    Each event is checked on its own: valid ones are stored (durably) even when others in the batch are
    rejected, and each rejection says which field is wrong and how to fix it (its first few problems, and
    `error_count`). Re-sending an event (same `event_id`) is harmless: it counts as a duplicate. A batch of
    which nothing could be stored is answered 422 (same body).

    Fields: `event_id`, `user_id`, `product_id`, `event_type` (required); `timestamp` (ISO 8601 or Unix
    seconds; default now; not in the future), `position`, `request_id`, `channel`, `arm`, `model_version`.

    Trust: the customer must be known to the service. Ownership events (`approve`, `decline`, `hold`, `close`)
    need a key with `events:trusted`. Customer-side events (`impression`, `view`, `click`, `apply`) from other
    keys must carry the `request_id` of an answer this service gave the same customer, at most
    `serve.request_id_max_age_days` ago.
    """
    limit = service.settings.serve.max_events_per_request
    if len(events) > limit:
        raise HTTPException(413, f"{len(events)} events in one request; at most {limit} are accepted, "
                                 "split the batch")  # fmt: skip
    try:
        result = service.recommender.ingest(events, max_batch=limit, trusted=caller.may("events:trusted"))
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    m = service.metrics.events
    m.labels("accepted").inc(result["accepted"])
    m.labels("duplicate").inc(result["duplicates"])
    m.labels("rejected").inc(len(result["rejected"]))
    if result["rejected"] and not result["accepted"] and not result["duplicates"]:
        n = len(result["rejected"])
        return JSONResponse({"error": f"none of the {n} events could be stored", "request_id": request_id_var.get(),
                             "hint": "each entry of `rejected` says what is wrong with one event and how to fix it",
                             **result}, status_code=422)  # fmt: skip
    return result
