"""Request-time logic of the service, as a plain class testable without HTTP.

:class:`Recommender` answers "what should this customer see?" and takes
feedback events. Every answer goes through the same steps:

1. guardrails (:mod:`finrec.serving.guardrails`) decide which products the customer
   may be shown at all, and count what each one removed;
2. the model (:class:`~finrec.serving.scoring.ServingModel`) retrieves and ranks
   among those products only; fewer than k survivors give a shorter answer, never a back-fill;
3. a final check re-verifies every returned product against the guardrails (it cannot
   fail unless the code above is broken; if it does, the product is dropped and counted);
4. reasons: what drove each item's score plus the rules it passed;
5. the answer is appended to the audit log, keyed by a pseudonym of the customer.

The model is held in one attribute and replaced in one assignment
(:meth:`swap`), so a request started on the old model finishes on it and no
request ever sees a half-loaded one.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from finrec.errors import FinrecError
from finrec.events.schema import parse_events
from finrec.events.store import EventStore
from finrec.serving.audit import AuditLog
from finrec.serving.guardrails import DAY, GUARDRAILS, GuardrailResult, LiveState, apply_guardrails
from finrec.serving.reasons import ReasonMapper, describe, rule_reasons
from finrec.serving.scoring import CustomerInputs, Ranked, ServingModel

log = logging.getLogger("finrec.serving")

MAX_K = 50


class UnknownCustomerError(FinrecError):
    """The customer id is not in the service's data."""


@dataclass
class Answer:
    """One recommendation answer (what the API returns) and what monitoring needs about it."""

    body: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    violations: int = 0


class Recommender:
    """Guarded recommendations and feedback for one service process.

    Parameters
    ----------
    model
        The model to serve; :meth:`swap` replaces it.
    live
        Recent declines, impressions and holdings (cooling-off, frequency caps, held).
    events
        Where accepted feedback events are stored.
    audit
        Where every answer is recorded (None: not recorded, for tests and benchmarks only).
    clock
        Current time as Unix seconds (the data's clock when replaying a synthetic world).
    """

    def __init__(
        self,
        model: ServingModel,
        live: LiveState,
        events: EventStore,
        audit: AuditLog | None,
        clock: Callable[[], float] = time.time,
        future_tolerance_seconds: int = 300,
        max_reasons: int = 3,
        max_events: int = 1000,
    ) -> None:
        self.live = live
        self.events = events
        self.audit = audit
        self.clock = clock
        self.future_tolerance_seconds = future_tolerance_seconds
        self.max_reasons = max_reasons
        self.max_events = max_events
        self._active: tuple[ServingModel, ReasonMapper] = (model, ReasonMapper(model.names))

    # -- model lifecycle ------------------------------------------------------------------------------
    @property
    def model(self) -> ServingModel:
        return self._active[0]

    def swap(self, model: ServingModel) -> str:
        """Serve ``model`` from the next request on; returns the version it replaced."""
        old = self._active[0].version
        self._active = (model, ReasonMapper(model.names))  # one assignment: requests see old or new, never a mix
        log.info("model swapped", extra={"old_version": old, "new_version": model.version})
        return old

    # -- recommendations ------------------------------------------------------------------------------
    def recommend(self, user_id: str, k: int = 10, request_id: str | None = None) -> Answer:
        """The top ``k`` (1-50) products for a known customer.

        Raises
        ------
        UnknownCustomerError
            The customer is not in the service's data.
        """
        model, mapper = self._active
        row = model.data.user_row(user_id)
        if row < 0:
            raise UnknownCustomerError(f"customer {user_id!r} is not known to this service",
                                       hint="check the id, or send the profile to POST /recommend")  # fmt: skip
        consent = float(model.data.consent[row]) if model.data.consent is not None else float("nan")
        now = self.clock()
        # One read of the online store per request: what the guardrails' windows need and what happened since
        # the data's cutoff (only the latter changes features: earlier events are in the snapshot already).
        cutoff = model.data.cutoff
        activity = self.live.activity(user_id, int(min(cutoff, now - self.live.horizon_days * DAY)))
        guard = apply_guardrails(model.data.rules, row, now, consent, model.data.held(row), self.live, user_id,
                                 activity, model.data.product_row, model.data.rule_presence)  # fmt: skip
        since_cutoff = [a for a in activity if a.ts >= cutoff]
        return self._answer(model, mapper, model.customer(row, since_cutoff, now), guard, k, request_id, user_id,
                            "customer")  # fmt: skip

    def recommend_prospect(self, profile: Mapping[str, Any], k: int = 10, request_id: str | None = None) -> Answer:
        """The top ``k`` products for someone who is not a customer yet, from their stated profile."""
        model, mapper = self._active
        rules = model.data.rules.with_users(model.data.prospect_users(profile))
        consent = profile.get("marketing_consent")
        consent_f = float("nan") if consent is None else float(consent)
        guard = apply_guardrails(rules, 0, self.clock(), consent_f, np.empty(0, np.int64), self.live, None,
                                 presence=model.data.rule_presence)  # fmt: skip
        return self._answer(model, mapper, model.prospect(dict(profile)), guard, k, request_id, None, "prospect")

    def _answer(self, model: ServingModel, mapper: ReasonMapper, who: CustomerInputs, guard: GuardrailResult,
                k: int, request_id: str | None, user_id: str | None, kind: str) -> Answer:  # fmt: skip
        if not 1 <= k <= MAX_K:
            raise FinrecError(f"k={k} is out of range", hint=f"ask for 1 to {MAX_K} products")
        request_id = request_id or uuid.uuid4().hex
        t0 = time.perf_counter()
        ranked = model.rank(who, guard.allowed, k) if guard.allowed.any() else _nothing(model)
        # Defence in depth: only allowed products can be retrieved, but check what leaves the building.
        ok = guard.allowed[ranked.items]
        violations = int((~ok).sum())
        if violations:
            log.error("guardrail violation: a removed product reached the answer; dropped",
                      extra={"request_id": request_id, "count": violations})  # fmt: skip
            ranked = Ranked(ranked.items[ok], ranked.scores[ok], ranked.approval[ok], ranked.features[ok],
                            ranked.n_candidates, ranked.timings,
                            None if ranked.leaves is None else ranked.leaves[ok])  # fmt: skip
        t1 = time.perf_counter()
        items = self._items(model, mapper, ranked, guard)
        t2 = time.perf_counter()
        body = {
            "request_id": request_id,
            "user_id": user_id,
            "model_version": model.version,
            "arm": None,
            "k": k,
            "items": items,
            "excluded": {g: guard.excluded[g] for g in GUARDRAILS if g in guard.excluded},
            "candidates": ranked.n_candidates,
        }
        if self.audit is not None:
            self.audit.append({**{key: body[key] for key in ("request_id", "model_version", "arm", "k", "excluded")},
                               "kind": kind, "items": [{key: it[key] for key in ("product_id", "rank", "score")}
                                                       | {"reasons": [r["code"] for r in it["reasons"]]}
                                                       for it in items]}, user_id)  # fmt: skip
        t3 = time.perf_counter()
        timings = {**ranked.timings, "guard_check": t1 - t0 - sum(ranked.timings.values()), "reasons": t2 - t1,
                   "audit": t3 - t2}  # fmt: skip
        return Answer(body, timings, violations)

    def _items(self, model: ServingModel, mapper: ReasonMapper, ranked: Ranked,
               guard: GuardrailResult) -> list[dict[str, Any]]:  # fmt: skip
        contrib = model.contributions(ranked.features, ranked.leaves)
        model_codes = (mapper.model_reasons(contrib, self.max_reasons, features=ranked.features)
                       if contrib is not None else [[] for _ in ranked.items])  # fmt: skip
        data = model.data
        out = []
        for rank, (p, score, odds, codes) in enumerate(
            zip(ranked.items.tolist(), ranked.scores.tolist(), ranked.approval.tolist(), model_codes, strict=True),
            start=1,
        ):
            passed = [r for r, has in guard.passed_rules.items() if has[p]]
            out.append({
                "product_id": data.product_ids[p],
                "name": data.names[p],
                "category": data.categories[p],
                "provider": data.providers[p],
                "rank": rank,
                "score": round(score, 6),
                "approval_odds": None if odds != odds else round(odds, 4),
                "reasons": describe([*codes, *rule_reasons(passed)]),
            })  # fmt: skip
        return out

    # -- feedback -------------------------------------------------------------------------------------
    def ingest(self, items: list[Any], max_batch: int | None = None) -> dict[str, Any]:
        """Validate and store a batch of feedback events; idempotent on ``event_id``.

        Returns how many were accepted, how many were already known (re-deliveries) and, for each
        rejected item, its index and what is wrong. Raises ``ValueError`` for a batch that is not a
        list or is too large (the HTTP layer answers 413/422).
        """
        model = self._active[0]
        batch = parse_events(items, model.data.product_row.__contains__, int(self.clock()),
                             self.future_tolerance_seconds, max_batch=max_batch or self.max_events)  # fmt: skip
        stored = self.events.append(batch.accepted) if batch.accepted else []
        new = [e for e, is_new in zip(batch.accepted, stored, strict=True) if is_new]
        if new:
            # Stored first, then applied: the event store is the record. A re-delivery is a duplicate and is
            # never applied twice; an in-process online store is rebuilt from the event store at start-up.
            self.live.record(new)
        return {
            "received": len(items),
            "accepted": len(new),
            "duplicates": len(batch.accepted) - len(new) + len(batch.duplicates),
            "rejected": [{"index": r.index, "event_id": r.event_id, "errors": r.errors} for r in batch.rejected],
        }


def _nothing(model: ServingModel) -> Ranked:
    return Ranked(np.empty(0, np.int64), np.empty(0), np.empty(0), np.empty((0, len(model.names)), np.float32), 0,
                  {})  # fmt: skip
