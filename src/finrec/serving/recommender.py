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

Which model answers is decided per request: outside experiments the default
model (the registry's ``champion``), inside one the model of the customer's arm
(:mod:`finrec.experiments.assignment`, a salted hash of the customer id). The
models are held in one mapping, model reference -> model, replaced in one
assignment (:meth:`swap`), so a request started on an old model finishes on it
and no request ever sees a half-loaded one.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from finrec.errors import FinrecError
from finrec.events.schema import OWNERSHIP_EVENTS, Event, parse_events
from finrec.events.store import EventStore
from finrec.experiments.assignment import Assigner, Assignment
from finrec.features.online.follow import EventFollower
from finrec.serving.audit import AuditLog
from finrec.serving.guardrails import DAY, GUARDRAILS, GuardrailResult, LiveState, apply_guardrails
from finrec.serving.reasons import ReasonMapper, describe, rule_reasons
from finrec.serving.request_ids import RequestSigner
from finrec.serving.scoring import CustomerInputs, Ranked, ServingModel

log = logging.getLogger("finrec.serving")

MAX_K = 50
#: Answers remembered per process so that events naming their request_id get the answer's arm and model version.
RECENT_ANSWERS = 200_000


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
    assigner
        Experiments and the default model reference (default: no experiment, every answer from ``model``).
    models
        Further models by reference (registry alias or version) for the experiments' arms. An arm whose model
        is missing is answered by the default model, and its answers say so in ``model_version``.
    signer
        Signs the answers' request ids and checks those events cite (default: a key of this process only).
    request_max_age_seconds
        Oldest answer (service clock) a customer-side event may cite.
    follower
        Applies the event log to the online store (:class:`~finrec.features.online.follow.EventFollower`); without
        one, accepted events are recorded in the online store directly.
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
        assigner: Assigner | None = None,
        models: Mapping[str, ServingModel] | None = None,
        signer: RequestSigner | None = None,
        request_max_age_seconds: float = 7 * 86_400,
        follower: EventFollower | None = None,
    ) -> None:
        self.live = live
        self.events = events
        self.audit = audit
        self.clock = clock
        self.future_tolerance_seconds = future_tolerance_seconds
        self.max_reasons = max_reasons
        self.max_events = max_events
        self.assigner = assigner or Assigner([])
        default = self.assigner.default_model
        slots = {default: (model, ReasonMapper(model.names))}
        for ref, m in (models or {}).items():
            if ref != default:
                slots[ref] = (m, ReasonMapper(m.names))
        self._slots: dict[str, tuple[ServingModel, ReasonMapper]] = slots
        self._recent: OrderedDict[str, tuple[str | None, str]] = OrderedDict()
        self._recent_lock = threading.Lock()
        self.signer = signer or RequestSigner()
        self.request_max_age_seconds = request_max_age_seconds
        self.follower = follower

    # -- model lifecycle ------------------------------------------------------------------------------
    @property
    def model(self) -> ServingModel:
        """The default model (the champion): what answers outside experiments."""
        return self._slots[self.assigner.default_model][0]

    def models(self) -> dict[str, ServingModel]:
        """Every loaded model by reference."""
        return {ref: m for ref, (m, _) in self._slots.items()}

    def swap(self, model: ServingModel, ref: str | None = None) -> str | None:
        """Serve ``model`` for ``ref`` (default: the default model) from the next request on.

        Returns the version it replaced (None if ``ref`` had no model).
        """
        ref = ref or self.assigner.default_model
        old = self._slots.get(ref)
        mapper = old[1] if old is not None and old[0].names == model.names else ReasonMapper(model.names)
        # One assignment of a new mapping: a request sees the old or the new set of models, never a mix.
        self._slots = {**self._slots, ref: (model, mapper)}
        old_version = None if old is None else old[0].version
        log.info("model swapped", extra={"ref": ref, "old_version": old_version, "new_version": model.version})
        return old_version

    def _route(self, user_id: str | None, now: float) -> tuple[Assignment, ServingModel, ReasonMapper]:
        slots = self._slots
        a = self.assigner.assign(user_id, now)
        chosen = slots.get(a.model)
        if chosen is None:  # the arm's model is not loaded (e.g. no challenger registered yet)
            chosen = slots[self.assigner.default_model]
        return a, chosen[0], chosen[1]

    # -- recommendations ------------------------------------------------------------------------------
    def recommend(self, user_id: str, k: int = 10, request_id: str | None = None) -> Answer:
        """The top ``k`` (1-50) products for a known customer.

        Raises
        ------
        UnknownCustomerError
            The customer is not in the service's data.
        """
        now = self.clock()
        assignment, model, mapper = self._route(user_id, now)
        record = model.lookup(user_id)  # the data's, or one round trip to the materialised records
        if self.follower is not None:
            self.follower.ensure_current()  # after an outage of the online store: what it missed, first
        if record is None:
            raise UnknownCustomerError(f"customer {user_id!r} is not known to this service",
                                       hint="check the id, or send the profile to POST /recommend")  # fmt: skip
        data = model.data
        given = record.profile.get("marketing_consent")
        consent = float("nan") if given is None else float(given)
        row = data.user_row(user_id)
        # A service without the customers' rows reads the customer's rules from the record, as a prospect's.
        rules = data.rules if row >= 0 else data.rules.with_profile(record.profile)
        # One read of the online store per request: what the guardrails' windows need and what happened since
        # the data's cutoff (only the latter changes features: earlier events are in the snapshot already).
        cutoff = data.cutoff
        activity = self.live.activity(user_id, int(min(cutoff, now - self.live.horizon_days * DAY)))
        guard = apply_guardrails(rules, max(row, 0), now, consent, record.held, self.live, user_id, activity,
                                 data.product_row, data.rule_presence, record)  # fmt: skip
        since_cutoff = [a for a in activity if a.ts >= cutoff]
        return self._answer(model, mapper, model.customer(record, since_cutoff, now), guard, k, request_id, user_id,
                            "customer", assignment, now)  # fmt: skip

    def recommend_prospect(self, profile: Mapping[str, Any], k: int = 10, request_id: str | None = None) -> Answer:
        """The top ``k`` products for someone who is not a customer yet, from their stated profile.

        Prospects have no id to assign an arm by, so the default model answers them.
        """
        now = self.clock()
        assignment, model, mapper = self._route(None, now)
        rules = model.data.rules.with_users(model.data.prospect_users(profile))
        consent = profile.get("marketing_consent")
        consent_f = float("nan") if consent is None else float(consent)
        guard = apply_guardrails(rules, 0, now, consent_f, np.empty(0, np.int64), self.live, None,
                                 presence=model.data.rule_presence)  # fmt: skip
        return self._answer(model, mapper, model.prospect(dict(profile)), guard, k, request_id, None, "prospect",
                            assignment, now)  # fmt: skip

    def _answer(self, model: ServingModel, mapper: ReasonMapper, who: CustomerInputs, guard: GuardrailResult,
                k: int, request_id: str | None, user_id: str | None, kind: str, assignment: Assignment,
                now: float) -> Answer:  # fmt: skip
        if not 1 <= k <= MAX_K:
            raise FinrecError(f"k={k} is out of range", hint=f"ask for 1 to {MAX_K} products")
        request_id = self.signer.issue(request_id, user_id, now)
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
            "experiment": assignment.experiment,
            "arm": assignment.arm,
            "served_at": round(now, 3),
            "k": k,
            "items": items,
            "excluded": {g: guard.excluded[g] for g in GUARDRAILS if g in guard.excluded},
            "candidates": ranked.n_candidates,
        }
        if self.audit is not None:
            self.audit.append({**{key: body[key] for key in _AUDITED},
                               "kind": kind, "items": [{key: it[key] for key in ("product_id", "rank", "score")}
                                                       | {"reasons": [r["code"] for r in it["reasons"]]}
                                                       for it in items]}, user_id)  # fmt: skip
        self._remember(request_id, assignment.arm, model.version)
        t3 = time.perf_counter()
        timings = {**ranked.timings, "guard_check": t1 - t0 - sum(ranked.timings.values()), "reasons": t2 - t1,
                   "audit": t3 - t2}  # fmt: skip
        return Answer(body, timings, violations)

    def _items(self, model: ServingModel, mapper: ReasonMapper, ranked: Ranked,
               guard: GuardrailResult) -> list[dict[str, Any]]:  # fmt: skip
        totals = model.contributions(ranked.features, ranked.leaves, mapper.projection)
        model_codes = (mapper.reasons_from_totals(totals, self.max_reasons, features=ranked.features)
                       if totals is not None else [[] for _ in ranked.items])  # fmt: skip
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
    def ingest(self, items: list[Any], max_batch: int | None = None, trusted: bool = False) -> dict[str, Any]:
        """Validate and store a batch of feedback events; idempotent on ``event_id``.

        Returns how many were accepted, how many were already known (re-deliveries) and, for each
        rejected item, its index and what is wrong. Raises ``ValueError`` for a batch that is not a
        list or is too large (the HTTP layer answers 413/422).

        Besides the form of each event, the service checks that it can be trusted: the customer is known;
        ownership events (approve, decline, hold, close) come only from a ``trusted`` caller (the bank's core
        systems); customer-side events (impression, view, click, apply) from other callers cite the
        ``request_id`` of an answer this service gave the same customer, within ``request_max_age_seconds``.
        """
        model = self.model
        now = self.clock()
        data = model.data
        known = _KnownCustomers(model, items)
        batch = parse_events(items, data.product_row.__contains__, int(now), self.future_tolerance_seconds,
                             max_batch=max_batch or self.max_events, known_user=known,
                             trust=None if trusted else self._untrusted_problems(now))  # fmt: skip
        accepted = [self._attribute(e, now) for e in batch.accepted]
        stored = self.events.append(accepted) if accepted else []
        new = [e for e, is_new in zip(accepted, stored, strict=True) if is_new]
        if new:
            # Stored first, then applied: the event store is the record. A re-delivery is a duplicate and is
            # never applied twice. The follower applies the log from the online store's own position, so an
            # event stored while the online store is down is applied when it is back.
            if self.follower is not None:
                self.follower.after_append()
            else:
                self.live.record(new)
        return {
            "received": len(items),
            "accepted": len(new),
            "duplicates": len(batch.accepted) - len(new) + len(batch.duplicates),
            "rejected": [{"index": r.index, "event_id": r.event_id, "errors": r.errors, "error_count": r.error_count}
                         for r in batch.rejected],
        }

    def _untrusted_problems(self, now: float) -> Callable[[Event], list[str]]:
        """The checks of events from callers without ``events:trusted``: what is wrong with one, if anything."""
        signer, max_age = self.signer, self.request_max_age_seconds

        def problems(e: Event) -> list[str]:
            if e.event_type in OWNERSHIP_EVENTS:
                return [f"event_type: {e.event_type!r} changes what the customer holds or may be offered, so only "
                        "the bank's own systems may send it; send it with a key that has the events:trusted scope"]
            if e.request_id is None:
                return [f"request_id: is missing; a {e.event_type} event must name the request_id of the "
                        "recommendation answer it follows; send that answer's request_id"]
            wrong = signer.check(e.request_id, e.user_id, now, max_age)
            if wrong is not None:
                return [f"request_id: {wrong}; send the request_id of the answer this customer was given"]
            return []

        return problems

    def _remember(self, request_id: str, arm: str | None, version: str) -> None:
        with self._recent_lock:
            self._recent[request_id] = (arm, version)
            if len(self._recent) > RECENT_ANSWERS:
                self._recent.popitem(last=False)

    def _attribute(self, event: Event, now: float) -> Event:
        """The event with the arm and model version of the answer it follows, where the client left them out.

        The answer is found by ``request_id`` among this process's recent answers; failing that (another
        worker answered, or it is older), by the customer's assignment now, which names the same arm
        (assignment is a hash) and the model serving that arm now.
        """
        if event.arm is not None and event.model_version is not None:
            return event
        known = None
        if event.request_id is not None:
            with self._recent_lock:
                known = self._recent.get(event.request_id)
        if known is None:
            a, model, _ = self._route(event.user_id, now)
            known = (a.arm, model.version)
        return dataclasses.replace(event, arm=event.arm or known[0], model_version=event.model_version or known[1])


class _KnownCustomers:
    """``known_user`` of one batch of events: the batch's customer ids looked up at once (one round trip when the
    records live in Redis), any other id on its own."""

    def __init__(self, model: ServingModel, items: list[Any]) -> None:
        self.model = model
        ids = [str(it["user_id"]) for it in items if isinstance(it, dict) and isinstance(it.get("user_id"), str | int)]
        self.checked = set(ids)
        self.found = model.known(sorted(self.checked)) if model.customers is not None and ids else set()

    def __call__(self, user_id: str) -> bool:
        if self.model.customers is None:
            return self.model.data.user_row(user_id) >= 0
        if user_id in self.checked:
            return user_id in self.found
        return bool(self.model.known([user_id]))


_AUDITED = ("request_id", "model_version", "experiment", "arm", "served_at", "k", "excluded")


def _nothing(model: ServingModel) -> Ranked:
    return Ranked(np.empty(0, np.int64), np.empty(0), np.empty(0), np.empty((0, len(model.names)), np.float32), 0,
                  {})  # fmt: skip
