"""Hard rules that run before any scoring: what a customer may be shown at all.

A request first computes the set of products the customer may see; only that
set is ever retrieved and ranked, so no model, however wrong, can put a removed
product in front of a customer. The guardrails, in the order they are counted:

``marketing_opt_out``
    the customer declined marketing (``marketing_consent`` = 0): nothing is shown;
    with ``require_marketing_consent`` an unknown consent blocks too.
eligibility rules (``launched``, ``region``, ``age``, ``credit``, ``income``)
    the product's rules against the customer's profile (:mod:`finrec.rules.eligibility`);
``suitability``
    investment risk above the customer's risk tolerance (policy in settings);
``held``
    products the customer already holds (data, then live approve/hold/close events);
``cooling_off``
    a product the customer was declined for within ``cooling_off_days``;
``frequency_cap``
    a product shown ``frequency_cap`` times within ``frequency_window_days``.

``excluded`` counts each removed product once, under the first guardrail in
this order that removed it, so the counts add up to the products removed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from finrec.data.dataset import ETYPE, EventLog
from finrec.events.schema import Event
from finrec.features.online import Activity, OnlineFeatureStore
from finrec.features.online.memory import MemoryOnlineStore
from finrec.rules.eligibility import RULES, ProductRules
from finrec.serving.records import CustomerRecord
from finrec.serving.state import ServingData

DAY = 86_400
#: Eligibility rules in the order they are counted (suitability comes after them).
_RULE_ORDER = ("launched", "region", "age", "credit", "income", "suitability")
assert set(_RULE_ORDER) == set(RULES)
GUARDRAILS = ("marketing_opt_out", *_RULE_ORDER, "held", "cooling_off", "frequency_cap")


@dataclass(frozen=True)
class GuardrailPolicy:
    """Settings of the behavioural guardrails (the eligibility rules come with the catalogue)."""

    cooling_off_days: float = 30.0
    frequency_cap: int = 3
    frequency_window_days: float = 7.0
    require_marketing_consent: bool = False


@dataclass
class GuardrailResult:
    allowed: np.ndarray  # (n_products,) bool
    excluded: dict[str, int]  # guardrail -> products it removed (first match in GUARDRAILS order)
    passed_rules: dict[str, np.ndarray] = field(default_factory=dict)  # rule -> products that have it (and passed)


class LiveState:
    """Declines, impressions and holdings that matter to the guardrails: the data's recent ones plus live events.

    The data's part is loaded once (:meth:`seed`) and kept in this process; live events go to the online
    feature store (:meth:`record`), which every worker shares when it is Redis, so a decline posted to one
    worker rests the product on all of them from the next request.
    """

    def __init__(self, policy: GuardrailPolicy, store: OnlineFeatureStore | None = None) -> None:
        self.policy = policy
        self.store: OnlineFeatureStore = store if store is not None else MemoryOnlineStore()
        self._declined: dict[str, dict[int, int]] = defaultdict(dict)  # user -> product -> last decline ts
        self._shown: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))  # recent impressions

    @property
    def horizon_days(self) -> float:
        return max(self.policy.cooling_off_days, self.policy.frequency_window_days)

    def seed(self, data: ServingData) -> None:
        """Load the data's declines and impressions recent enough to matter at its cutoff."""
        users = data.ds.users["user_id"].astype(str).to_numpy()
        declined, shown = recent_guard_history(data.ds.events, data.cutoff, self.horizon_days,
                                               self.policy.frequency_cap)  # fmt: skip
        for u, per in declined.items():
            self._declined[users[u]] = per
        for u, times in shown.items():
            self._shown[users[u]].update(times)

    def record(self, events: Sequence[Event]) -> None:
        """Live events (already de-duplicated by the event store) into the online store."""
        self.store.record(events)

    def activity(self, user_id: str, since: int) -> list[Activity]:
        return self.store.recent(user_id, since)

    def masks(self, user_id: str, n_products: int, now: float, activity: list[Activity],
              product_row: dict[str, int], seeded: CustomerRecord | None = None,
              ) -> tuple[np.ndarray, np.ndarray, dict[int, bool]]:  # fmt: skip
        """(cooling-off mask, frequency-cap mask, live holdings changes) of one customer at ``now``.

        The data's declines and impressions come from ``seeded`` (a materialised customer record) when it has
        them, else from :meth:`seed`.
        """
        p = self.policy
        if seeded is not None and seeded.declined is not None and seeded.shown is not None:
            declined, shown = dict(seeded.declined), {k: list(v) for k, v in seeded.shown.items()}
        else:
            declined = dict(self._declined.get(user_id, {}))
            shown = {k: list(v) for k, v in self._shown.get(user_id, {}).items()}
        held: dict[int, bool] = {}
        for a in activity:  # in time order
            row = product_row.get(a.product_id, -1)
            if row < 0:
                continue
            if a.event_type == "decline":
                declined[row] = max(a.ts, declined.get(row, a.ts))
            elif a.event_type == "impression":
                shown.setdefault(row, []).append(a.ts)
            elif a.event_type in ("approve", "hold"):
                held[row] = True
            elif a.event_type == "close":
                held[row] = False
        cool = np.zeros(n_products, dtype=bool)
        cap = np.zeros(n_products, dtype=bool)
        since_decline = now - p.cooling_off_days * DAY
        for prod, t in declined.items():
            if since_decline <= t <= now + 1 and prod < n_products:
                cool[prod] = True
        if p.frequency_cap > 0:
            since_shown = now - p.frequency_window_days * DAY
            for prod, times in shown.items():
                if prod < n_products and sum(1 for t in times if since_shown <= t <= now + 1) >= p.frequency_cap:
                    cap[prod] = True
        return cool, cap, held


def recent_guard_history(events: EventLog, cutoff: int, horizon_days: float, frequency_cap: int,
                         ) -> tuple[dict[int, dict[int, int]], dict[int, dict[int, list[int]]]]:  # fmt: skip
    """Per customer row, the last decline of each product and the recent impressions of each, within
    ``horizon_days`` before ``cutoff``: what the cooling-off and the frequency cap read from the data."""
    recent = events.between(int(cutoff - horizon_days * DAY), cutoff)
    keep = max(frequency_cap, 1)
    declined: dict[int, dict[int, int]] = defaultdict(dict)
    shown: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for u, p, t, e in zip(recent.user.tolist(), recent.product.tolist(), recent.ts.tolist(), recent.etype.tolist(),
                          strict=True):  # fmt: skip
        if e == ETYPE["decline"]:
            declined[u][p] = max(t, declined[u].get(p, t))
        elif e == ETYPE["impression"]:
            lst = shown[u][p]
            lst.append(t)
            if len(lst) > 4 * keep:  # only the most recent ones can matter
                del lst[: len(lst) - keep]
    return declined, shown


def apply_guardrails(
    rules: ProductRules,
    rule_row: int,
    now: float,
    consent: float,
    held: np.ndarray,
    live: LiveState,
    user_id: str | None,
    activity: list[Activity] | None = None,
    product_row: dict[str, int] | None = None,
    presence: dict[str, np.ndarray] | None = None,
    seeded: CustomerRecord | None = None,
) -> GuardrailResult:
    """The products one customer may be shown and how many each guardrail removed.

    Parameters
    ----------
    rules
        Rules whose user arrays hold this customer at ``rule_row``.
    consent
        ``marketing_consent`` (1 yes, 0 no, NaN unknown).
    held
        Product rows the data says the customer holds.
    user_id
        Key of the live state (None for a prospect, who has no history).
    activity, product_row
        The customer's live events since the cutoff (from :meth:`LiveState.activity`) and the catalogue's
        product id -> row map.
    presence
        ``rules.presence()`` when the caller keeps it (it depends on the catalogue only).
    seeded
        The customer's materialised record, which carries the data's recent declines and impressions when the
        service has not loaded them (:meth:`LiveState.masks`).
    """
    n = rules.n_products
    removed = np.zeros(n, dtype=bool)
    excluded: dict[str, int] = {}

    def take(name: str, mask: np.ndarray) -> None:
        excluded[name] = int((mask & ~removed).sum())
        removed[:] |= mask

    opted_out = consent == 0 or (live.policy.require_marketing_consent and np.isnan(consent))
    take("marketing_opt_out", np.full(n, opted_out))
    fails = rules.failures(np.array([rule_row]), at=int(now))
    for name in _RULE_ORDER:
        if name in fails:
            take(name, fails[name][0])
    holds = np.zeros(n, dtype=bool)
    holds[held] = True
    cool = cap = np.zeros(n, dtype=bool)
    if user_id is not None:
        cool, cap, changes = live.masks(user_id, n, now, activity or [], product_row or {}, seeded)
        for prod, now_held in changes.items():
            if prod < n:
                holds[prod] = now_held
    take("held", holds)
    take("cooling_off", cool)
    take("frequency_cap", cap)
    has_rule = presence if presence is not None else rules.presence()
    passed = {r: has & ~fails[r][0] for r, has in has_rule.items() if r in fails}
    return GuardrailResult(~removed, excluded, passed)
