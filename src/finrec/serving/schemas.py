"""Request and response shapes of the HTTP API (pydantic), with the examples Swagger UI shows."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from finrec.serving.recommender import MAX_K


class Reason(BaseModel):
    code: str = Field(description="Stable reason code (docs/reasons.md).", examples=["RISK_FIT"])
    text: str = Field(description="Plain-language reason for the customer.", examples=["Fits your risk tolerance"])
    kind: Literal["model", "rule"] = Field(description="`model`: drove the score; `rule`: a requirement met.")


class Item(BaseModel):
    product_id: str
    name: str | None
    category: str | None
    provider: str | None
    rank: int = Field(description="1 = best.")
    score: float = Field(description="Ranker score (higher is better; comparable within one answer only).")
    approval_odds: float | None = Field(description="Estimated chance an application is approved (null: not modelled).")
    reasons: list[Reason]


class RecommendationResponse(BaseModel):
    request_id: str = Field(description="Id of this answer; send it back with the events it leads to.")
    user_id: str | None = Field(description="The customer (null for a prospect).")
    model_version: str = Field(description="Version of the model that answered (a registry version).")
    experiment: str | None = Field(description="Experiment the customer is in (null: none running).")
    arm: str | None = Field(description="Experiment arm that served the answer (null: no experiment running).")
    served_at: float = Field(description="When the answer was made, Unix seconds on the service's clock.")
    k: int
    items: list[Item] = Field(description="Best first; fewer than k when fewer products pass the guardrails.")
    excluded: dict[str, int] | None = Field(
        description="Products each guardrail removed before scoring (each counted once, under the first "
        "guardrail that removed it). Only for keys with the `recommend:explain` scope (null for others, whose "
        "items also leave out rule-based reasons)."
    )
    candidates: int = Field(description="Products retrieved and ranked.")


class Profile(BaseModel):
    """What a prospect tells us about themselves; every field is optional, but a rule that needs a missing
    field is failed (so a sparse profile sees fewer products, never unsuitable ones)."""

    model_config = ConfigDict(extra="forbid")

    age: int | None = Field(None, ge=0, le=120, examples=[34])
    income: float | None = Field(None, ge=0, le=1e9, description="Annual income.", examples=[52000])
    credit_score: float | None = Field(None, ge=0, le=1000, examples=[710])
    risk_tolerance: int | None = Field(None, ge=1, le=5, description="1 (lowest) to 5.", examples=[3])
    region: str | None = Field(None, max_length=64, examples=["north"])
    employment_status: str | None = Field(None, max_length=64, examples=["employed"])
    dependants: int | None = Field(None, ge=0, le=30, examples=[1])
    marketing_consent: bool | None = Field(None, description="false: the prospect opted out; nothing is shown.")


class ProspectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: Profile
    k: int = Field(10, ge=1, le=MAX_K)


class Rejected(BaseModel):
    index: int = Field(description="Position of the event in the batch (0-based).")
    event_id: str | None
    errors: list[str] = Field(description="What is wrong, where and how to fix it (the first few problems).")
    error_count: int = Field(description="How many problems the event has in all.")


class EventsResponse(BaseModel):
    received: int
    accepted: int = Field(description="Events stored now.")
    duplicates: int = Field(description="Events whose event_id was already stored (re-deliveries are harmless).")
    rejected: list[Rejected]


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: str | None = Field(None, description="Bundle to load (default: reload the current folder).")


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field("challenger", min_length=1, max_length=128,
                         description="Version or alias to make champion.")  # fmt: skip
    force: bool = Field(False, description="Promote even if the gate finds it worse than the champion.")
    reason: str = Field("", max_length=500, description="Why (kept in the registry's history).")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str | None = Field(None, min_length=1, max_length=128,
                           description="Version to go back to (default: the previous champion).")  # fmt: skip
    reason: str = Field("", max_length=500, description="Why (kept in the registry's history).")


class Problem(BaseModel):
    error: str = Field(description="What is wrong.")
    hint: str | None = Field(None, description="How to fix it.")
    problems: list[dict[str, Any]] | None = Field(None, description="Invalid fields, where and why (the first 20).")
    problem_count: int | None = Field(None, description="How many invalid fields there were in all.")
    request_id: str | None = None


EVENTS_EXAMPLE = [
    {"event_id": "e-1001", "user_id": "42", "product_id": "7", "event_type": "click",
     "timestamp": "2026-11-25T10:15:00Z", "request_id": "9f1c...", "position": 2},  # fmt: skip
    {"event_id": "e-1002", "user_id": "42", "product_id": "7", "event_type": "apply"},
]
