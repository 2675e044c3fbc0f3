"""Synthetic customers who react to a slate the way the ground truth says they would.

The generator (:mod:`finrec.data.synthetic.funnel`) draws every logged event from the
ground truth; :class:`SimulatedCustomers` draws the reactions to a *live* answer in the
same way, so that a model can be judged by what customers actually do with its answers:

* every shown product gets an ``impression`` at its 1-based ``position``;
* ``view`` with probability ``position ** -position_bias`` (position bias);
* ``click`` given a view with ``sigmoid(u + click_bias)``, where ``u`` is the true
  utility with the customer's current holdings, the season of the service's month and
  the drift (see below);
* ``apply`` given a click with ``sigmoid(apply_slope * u + apply_bias) * (floor + (1 -
  floor) * P(approve))``, except for a product the customer already holds;
* ``approve`` with ``P(approve | apply)`` (zero when ineligible), else ``decline``.

An approval becomes a holding at once: the next utility of that customer sees it
(saturation and complementarity), and in a category where a new product replaces the
old one (everything but insurance and investment funds) the old product is closed with
a ``close`` event, as the generator does.

The *true expected conversions* of a slate are ``sum_k view_prob(k) * propensity(u,
p_k)``: the mean number of approvals the slate earns, the quantity the realised
approvals estimate. A product the customer already holds contributes nothing, since no
one applies for what they hold.

Drift. Every world stores its drift direction (``coefficients.drift_shift`` in
``world.json``: deposits lose, loans gain), whether or not it was generated with
``--drift-month``; a world without one has ``drift_strength`` 0. With ``drift_strength
None`` the customers follow the world's own calendar (the drift applies from its
``drift_month`` on, at its strength); a number replaces the world's strength from the
first reaction on, e.g. to inject a rate shock the trained model never saw, or ``0`` to
switch the world's drift off.

Time. The month of the season and drift is the calendar month of the service's clock
(``served_at``) counted from the world's start; the day checks launch dates. Funnel steps
are stamped one second apart from ``served_at`` (the generator spreads them over
minutes to days): the reactions are posted right away, and the service refuses events
from its future.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> from finrec.data.synthetic.generate import WorldConfig, generate_world
>>> world = Path(tempfile.mkdtemp()) / "world"
>>> _ = generate_world(WorldConfig(users=50, products=12, months=1), world, progress=False)
>>> customers = SimulatedCustomers.from_world(world, seed=1)
>>> r = customers.react("1", ["3", "4"], served_at=1_706_000_000, stream=0)
>>> [e["event_type"] for e in r.events][:2], r.expected_conversions >= 0
(['impression', 'impression'], True)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from finrec.data.io import find_table, quote_literal, scan_sql
from finrec.data.synthetic import params as P
from finrec.data.synthetic.truth import GroundTruth
from finrec.errors import DataError, FinrecError

#: Seconds between the funnel steps of one reaction (impression, view, click, apply, decision).
STEP_SECONDS = 1
_SWITCH = np.array([c in P.SWITCH_CATEGORIES for c in P.CATEGORIES])
_HOLDING_EVENTS = ("hold", "approve", "close")


@dataclass(frozen=True)
class Reaction:
    """What one customer did with one answer.

    Attributes
    ----------
    events
        JSON-ready events in time order (``user_id``, ``product_id``, ``event_type``,
        ``timestamp`` in Unix seconds, ``position``; ``close`` has no position). The caller
        adds ``event_id``, ``request_id``, ``arm`` and ``model_version``.
    expected_conversions
        True expected approvals of the slate: ``sum_k view_prob(k) * propensity``.
    unknown_products
        Shown product ids the ground truth does not know (no reaction is drawn for them).
    """

    events: list[dict[str, Any]]
    expected_conversions: float
    unknown_products: list[str]

    def count(self, event_type: str) -> int:
        return sum(e["event_type"] == event_type for e in self.events)


class SimulatedCustomers:
    """The world's customers reacting to live answers; draws are seeded, holdings evolve.

    Parameters
    ----------
    truth
        The ground truth of the world the service serves.
    holdings
        What customers hold when the simulation starts: the world's events (a DataFrame
        with ``user_id``, ``product_id``, ``event_type``, ``timestamp``; holdings at the
        end of the data are taken), or a (n_users, n_categories) 0/1 matrix in the
        truth's user order (then the held *products* are unknown: no ``close`` is sent
        for them on a switch), or ``None`` (nobody holds anything).
    seed
        Seed of every draw; :meth:`react` with the same ``stream`` draws the same.
    drift_strength
        ``None``: the world's own drift; a number: the world's drift direction at this
        strength, replacing the world's own (module docstring).
    """

    def __init__(
        self,
        truth: GroundTruth,
        holdings: pd.DataFrame | np.ndarray | None = None,
        seed: int = 0,
        drift_strength: float | None = None,
    ) -> None:
        if drift_strength is not None and not np.isfinite(drift_strength):
            raise FinrecError(f"drift strength {drift_strength} is not a number",
                              hint="pass a finite number in logit units, e.g. 1.0, or leave it out")  # fmt: skip
        self.truth = truth
        self.seed = int(seed)
        self.drift_strength = drift_strength
        self._t0 = pd.Timestamp(truth.info.start, tz="UTC")
        self._category = np.asarray(truth.products["category"])
        self._product_row = {str(p): i for i, p in enumerate(truth.products["product_id"].tolist())}
        self._user_row = {str(u): i for i, u in enumerate(truth.users["user_id"].tolist())}
        self._drift = np.asarray(truth.coef.drift_shift, dtype=np.float64)
        self._lock = threading.Lock()
        #: (user id, product id) of every approval drawn so far, in order: the holdings the simulation added.
        self.approved: list[tuple[str, str]] = []
        n_cat = len(truth.info.categories)
        # Held products per customer row (only customers who hold something), and the category matrix.
        self._products: dict[int, set[int]] = {}
        if holdings is None:
            self.held = np.zeros((truth.n_users, n_cat), dtype=np.int8)
        elif isinstance(holdings, pd.DataFrame):
            self.held = truth.held_matrix(holdings, truth.users["user_id"])
            for u, p in _held_pairs(holdings, truth):
                self._products.setdefault(u, set()).add(p)
        else:
            held = np.asarray(holdings)
            if held.shape != (truth.n_users, n_cat):
                raise FinrecError(f"holdings matrix has shape {held.shape}, expected {(truth.n_users, n_cat)}",
                                  hint="one row per customer of the ground truth, one column per category")  # fmt: skip
            self.held = (held > 0).astype(np.int8)

    @classmethod
    def from_world(cls, world: str | Path, seed: int = 0, drift_strength: float | None = None) -> SimulatedCustomers:
        """Customers of a generated world (``world/ground_truth``), holding what they hold at the end of its data.

        Raises
        ------
        FinrecError
            The folder or its ground truth or events table is missing.
        """
        world = Path(world)
        if not world.is_dir():
            raise DataError(f"world folder {world} does not exist",
                            hint="pass the folder written by `finrec generate --out DIR`")  # fmt: skip
        truth = GroundTruth.load(world / "ground_truth")
        return cls(truth, read_holding_events(world), seed=seed, drift_strength=drift_strength)

    # -- time -----------------------------------------------------------------------------------
    def month_of(self, t: float) -> int:
        """0-based month of the world's calendar that Unix time ``t`` falls in (as the generator counts months)."""
        ts = pd.Timestamp(float(t), unit="s", tz="UTC")
        m = (ts.year - self._t0.year) * 12 + ts.month - self._t0.month
        if ts < self._t0 + pd.DateOffset(months=m):
            m -= 1
        return int(m)

    def day_of(self, t: float) -> int:
        """Whole days since the world's start (for launch dates)."""
        return int((float(t) - self._t0.timestamp()) // 86_400)

    def drift_applied(self, month: int) -> float:
        """Strength of the drift the customers feel in ``month``."""
        if self.drift_strength is not None:
            return float(self.drift_strength)
        info = self.truth.info
        on = info.drift_month is not None and month >= info.drift_month - 1
        return float(info.drift_strength) if on else 0.0

    # -- customers ------------------------------------------------------------------------------
    def callers(self, n: int, rng: np.random.Generator, consenting_only: bool = False) -> np.ndarray:
        """``n`` customer ids (text) drawn with probability proportional to their activity.

        Active customers open the app more often, as in the generator's sessions. With
        ``consenting_only`` customers who opted out of marketing never call (else the
        service itself must answer them with nothing).
        """
        weight = np.asarray(self.truth.users["activity"], dtype=np.float64).copy()
        if consenting_only:
            weight *= np.asarray(self.truth.users["consent"], dtype=bool)
        if not weight.sum() > 0:
            raise FinrecError("no customer of the world can call", hint="allow every customer (not only consenting)")
        rows = rng.choice(len(weight), size=n, p=weight / weight.sum())
        return np.asarray(self.truth.users["user_id"]).astype(str)[rows]

    def holds(self, user_id: str) -> np.ndarray:
        """0/1 per category: what the customer holds now."""
        return self.held[self._row(user_id)].copy()

    def held_products(self, user_id: str) -> set[str]:
        ids = self.truth.products["product_id"]
        with self._lock:
            return {str(ids[p]) for p in self._products.get(self._row(user_id), set())}

    def _row(self, user_id: str) -> int:
        row = self._user_row.get(str(user_id))
        if row is None:
            raise KeyError(f"customer {user_id!r} is not in the ground truth")
        return row

    # -- reactions ------------------------------------------------------------------------------
    def react(self, user_id: str, product_ids: Sequence[str], served_at: float, stream: int = 0) -> Reaction:
        """Draw what the customer does with a slate shown in rank order at ``served_at`` (Unix seconds).

        ``stream`` picks the random stream (the driver passes the request's index), so a
        reaction depends only on the seed, the stream and the customer's holdings, not on
        which thread runs it. Approvals become holdings before this returns.
        """
        truth = self.truth
        u_row = self._row(user_id)
        shown = [str(p) for p in product_ids]
        unknown = [p for p in shown if p not in self._product_row]
        keep = [(pos, self._product_row[p]) for pos, p in enumerate(shown, start=1) if p in self._product_row]
        t = int(np.floor(served_at))
        if not keep:
            return Reaction([], 0.0, unknown)
        pos = np.array([k[0] for k in keep], dtype=np.int64)
        prod = np.array([k[1] for k in keep], dtype=np.int64)
        u = np.full(len(prod), u_row, dtype=np.int64)
        month, day = self.month_of(served_at), self.day_of(served_at)
        rng = np.random.default_rng([self.seed, int(stream)])
        with self._lock:  # holdings are read and updated as one step: two answers of a customer in flight
            held_now = self.held[u_row : u_row + 1].copy()
            owned = self._products.get(u_row, set())
            already = np.array([p in owned for p in prod])
            util = self.utility(u, prod, held_now, month)
            approve_p = truth.approve_prob(u, prod, day=day)
            view_p = truth.view_prob(pos)
            expected = float((view_p * truth.conversion(util, approve_p) * ~already).sum())
            # The same draws in the same order as funnel.simulate_block.
            view = rng.random(len(u)) < view_p
            click = view & (rng.random(len(u)) < truth.click_prob(util))
            c_idx = np.flatnonzero(click & ~already)
            applies = rng.random(len(c_idx)) < truth.apply_prob(util[c_idx], approve_p[c_idx])
            a = c_idx[applies]
            approved = rng.random(len(a)) < approve_p[a]
            closes = self._hold(u_row, prod[a[approved]])
            self.approved += [(str(user_id), shown[k - 1]) for k in pos[a[approved]].tolist()]
        events = self._events(str(user_id), shown, pos, prod, view, click, a, approved, closes, t)
        return Reaction(events, expected, unknown)

    def utility(self, u: np.ndarray, p: np.ndarray, held: np.ndarray, month: int) -> np.ndarray:
        """True utility of pairs with holdings ``held`` (one row, shared by all pairs) in ``month``, with the drift."""
        util = self.truth.utility(u, p, held=held, month=month, held_row=np.zeros(len(u), dtype=np.int64))
        info = self.truth.info
        world = info.drift_strength if info.drift_month is not None and month >= info.drift_month - 1 else 0.0
        extra = self.drift_applied(month) - world  # truth.utility added the world's own drift already
        return util + extra * self._drift[self._category[p]] if extra else util

    def _hold(self, u_row: int, new: np.ndarray) -> list[int]:
        """Record approved products as held; the products they replace (switch categories) are returned, closed."""
        closed: list[int] = []
        owned = self._products.setdefault(u_row, set())
        for p in new.tolist():
            c = int(self._category[p])
            if _SWITCH[c]:
                old = [q for q in owned if self._category[q] == c and q != p]
                closed += old
                owned.difference_update(old)
            owned.add(p)
            self.held[u_row, c] = 1
        return closed

    def _events(self, user: str, shown: list[str], pos: np.ndarray, prod: np.ndarray, view: np.ndarray,
                click: np.ndarray, a: np.ndarray, approved: np.ndarray, closes: list[int],
                t: int) -> list[dict[str, Any]]:  # fmt: skip
        ids = self.truth.products["product_id"]
        step = STEP_SECONDS

        def event(i: int, etype: str, dt: int) -> dict[str, Any]:
            return {"user_id": user, "product_id": shown[pos[i] - 1], "event_type": etype,
                    "timestamp": t + dt, "position": int(pos[i])}  # fmt: skip

        out = [event(i, "impression", 0) for i in range(len(prod))]
        out += [event(i, "view", step) for i in np.flatnonzero(view).tolist()]
        out += [event(i, "click", 2 * step) for i in np.flatnonzero(click).tolist()]
        out += [event(i, "apply", 3 * step) for i in a.tolist()]
        out += [event(i, "approve" if ok else "decline", 4 * step)
                for i, ok in zip(a.tolist(), approved.tolist(), strict=True)]  # fmt: skip
        out += [{"user_id": user, "product_id": str(ids[q]), "event_type": "close", "timestamp": t + 4 * step}
                for q in closes]  # fmt: skip
        return out


def read_holding_events(world: Path) -> pd.DataFrame:
    """The ``hold``, ``approve`` and ``close`` events of a dataset (the rest is not needed for holdings)."""
    path = find_table(world, "events")
    types = ", ".join(quote_literal(t) for t in _HOLDING_EVENTS)
    try:
        with duckdb.connect() as con:
            return con.execute(
                f"SELECT user_id, product_id, CAST(event_type AS VARCHAR) AS event_type, timestamp "
                f"FROM {scan_sql(path)} WHERE CAST(event_type AS VARCHAR) IN ({types})"
            ).df()
    except duckdb.Error as exc:
        raise DataError(f"cannot read the events of {world}: {exc}",
                        hint="run `finrec validate --data DIR` to check the dataset") from None  # fmt: skip


def _held_pairs(events: pd.DataFrame, truth: GroundTruth) -> list[tuple[int, int]]:
    """(user row, product row) of every product held at the end of ``events`` (the last holding event is not close)."""
    ev = events[events["event_type"].isin(_HOLDING_EVENTS)]
    ev = ev.sort_values("timestamp", kind="stable")
    last = ev.groupby(["user_id", "product_id"], sort=False)["event_type"].last()
    owned = last[last != "close"].reset_index()
    u = pd.Index(truth.users["user_id"]).get_indexer(owned["user_id"].to_numpy())
    p = pd.Index(truth.products["product_id"]).get_indexer(owned["product_id"].to_numpy())
    ok = (u >= 0) & (p >= 0)
    return list(zip(u[ok].tolist(), p[ok].tolist(), strict=True))
