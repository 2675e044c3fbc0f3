"""Funnel events of a block of customers over the simulated months.

Each month a customer has a Poisson number of sessions (activity x season).
In each session the bank's *logging policy* shows a slate: some slots explore
uniformly, the rest target a category from a noisy view of the customer's life
stage and pick a product by provider size; it knows nothing of true appeal, so
logged data carries position and selection bias but no leak of the truth. The
customer looks at a slot with a position-biased probability, then clicks,
applies and is approved or declined as the ground truth says. Approved products
become holdings (a switch closes the old product of the category) and holdings
close at a monthly hazard. Everything is vectorised over the block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from finrec.data.synthetic import params as P
from finrec.data.synthetic.catalogue import Catalogue
from finrec.data.synthetic.truth import GroundTruth

# Event type codes, in the order of contract.EVENT_TYPES.
IMPRESSION, VIEW, CLICK, APPLY, APPROVE, DECLINE, HOLD, CLOSE = range(8)
_SWITCH = np.array([c in P.SWITCH_CATEGORIES for c in P.CATEGORIES])


@dataclass
class BlockEvents:
    """Events of one block; ``request`` is block-local (-1 none), ``position`` 0 means none."""

    user: np.ndarray  # row in the block
    product: np.ndarray  # catalogue index
    etype: np.ndarray
    t: np.ndarray  # seconds since the Unix epoch
    request: np.ndarray
    position: np.ndarray
    channel: np.ndarray  # index into params.CHANNELS, -1 none
    n_requests: int

    def __len__(self) -> int:
        return len(self.user)


class _Collector:
    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(
        self,
        user: np.ndarray,
        product: np.ndarray,
        etype: int | np.ndarray,
        t: np.ndarray,
        request: np.ndarray | None = None,
        position: np.ndarray | None = None,
        channel: np.ndarray | None = None,
    ) -> None:
        n = len(user)
        if n == 0:
            return
        full = np.full
        self.parts.append(
            (
                np.asarray(user, np.int32),
                np.asarray(product, np.int32),
                full(n, etype, np.int8) if np.isscalar(etype) else np.asarray(etype, np.int8),
                np.asarray(t, np.int64),
                full(n, -1, np.int64) if request is None else np.asarray(request, np.int64),
                full(n, 0, np.int16) if position is None else np.asarray(position, np.int16),
                full(n, -1, np.int8) if channel is None else np.asarray(channel, np.int8),
            )
        )

    def build(self, n_requests: int) -> BlockEvents:
        cols = [np.concatenate(c) for c in zip(*self.parts, strict=True)] if self.parts else [np.empty(0)] * 7
        order = np.argsort(cols[3], kind="stable")
        user, product, etype, t, request, position, channel = (c[order] for c in cols)
        return BlockEvents(user, product, etype, t, request, position, channel, n_requests=n_requests)


class LoggingPolicy:
    """How the bank chose what to show before finrec: exploration plus life-stage targeting.

    Targeted slots pick a category from the customer's segment and then rotate offers of that
    category uniformly: exposure follows segment need, not a hidden weight. (Weighting offers by
    provider size here made logged engagement track market share, so that on logged metrics
    even the ground-truth oracle lost to models imitating the old policy.) Holdings at the start
    still follow market share (``weighted=True``).
    """

    def __init__(self, catalogue: Catalogue):
        self.n = len(catalogue)
        w = catalogue.provider_size[catalogue.provider]
        self.by_cat = [np.flatnonzero(catalogue.category == c) for c in range(P.N_CAT)]
        self.cum_weighted = [np.cumsum(w[idx]) / w[idx].sum() for idx in self.by_cat]
        self.cum_uniform = [np.arange(1, len(idx) + 1) / len(idx) for idx in self.by_cat]
        target = np.exp(P.TARGETING_SHARPNESS * P.NEED)
        self.cat_cum = np.cumsum(target / target.sum(axis=1, keepdims=True), axis=1)

    def in_category(self, cat: np.ndarray, rng: np.random.Generator, weighted: bool = False) -> np.ndarray:
        """A product of each given category: uniformly, or weighted by provider size."""
        out = np.empty(len(cat), dtype=np.int64)
        cums = self.cum_weighted if weighted else self.cum_uniform
        for c in range(P.N_CAT):
            m = cat == c
            if m.any():
                k = np.searchsorted(cums[c], rng.random(m.sum()), side="right")
                out[m] = self.by_cat[c][np.minimum(k, len(self.by_cat[c]) - 1)]
        return out

    def slates(self, stage: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
        """(len(stage), size) product indices; duplicates possible (removed by the caller)."""
        n = len(stage)
        u = rng.random((n, size))
        cat = (u[..., None] > self.cat_cum[stage][:, None, :]).sum(axis=2)
        slate = self.in_category(cat.ravel(), rng).reshape(n, size)
        explore = rng.random((n, size)) < P.EXPLORATION
        slate[explore] = rng.integers(0, self.n, explore.sum())
        return slate


def month_bounds(start: str, months: int) -> np.ndarray:
    """Unix seconds of the start of each simulated month, plus the end of the period."""
    t0 = pd.Timestamp(start, tz="UTC")
    return np.array([(t0 + pd.DateOffset(months=m)).value // 10**9 for m in range(months + 1)], dtype=np.int64)


def initial_holdings(
    truth: GroundTruth, catalogue: Catalogue, policy: LoggingPolicy, rng: np.random.Generator
) -> np.ndarray:
    """(n, n_categories) product index held in each category at the start, -1 for none.

    Needs ``truth.users`` without ``main_provider``-dependent terms: only eligibility is used.
    """
    n = truth.n_users
    stage = truth.users["stage"]
    logit = P.INITIAL_HOLDING[None, :] + 0.8 * P.NEED[stage]
    has = rng.random((n, P.N_CAT)) < 1 / (1 + np.exp(-logit))
    held = np.full((n, P.N_CAT), -1, dtype=np.int64)
    for c in range(P.N_CAT):
        users = np.flatnonzero(has[:, c])
        prod = policy.in_category(np.full(len(users), c), rng, weighted=True)
        ok = truth.eligible(users, prod, day=0)
        held[users[ok], c] = prod[ok]
    return held


def simulate_block(
    truth: GroundTruth,
    held: np.ndarray,
    catalogue: Catalogue,
    policy: LoggingPolicy,
    bounds: np.ndarray,
    sessions_per_month: float,
    slate_size: int,
    rng: np.random.Generator,
) -> BlockEvents:
    """All events of the block's customers over the period; ``held`` is updated in place."""
    U = truth.users
    n = truth.n_users
    t_start, t_end = int(bounds[0]), int(bounds[-1])
    ev = _Collector()

    # Holdings when the period starts.
    hu, hc = np.nonzero(held >= 0)
    ev.add(hu, held[hu, hc], HOLD, np.full(len(hu), t_start))

    n_req = 0
    for m in range(len(bounds) - 1):
        m0, m1 = int(bounds[m]), int(bounds[m + 1])
        moy = int(truth.info.month_of_year(m))
        rate = U["activity"] * sessions_per_month * P.ACTIVITY_SEASON[moy]
        counts = rng.poisson(rate)
        s_user = np.repeat(np.arange(n), counts)
        ns = len(s_user)
        s_time = rng.integers(m0, m1, ns)
        s_req = n_req + np.arange(ns)
        n_req += ns
        s_chan = rng.choice(len(P.CHANNELS), size=ns, p=P.CHANNEL_WEIGHTS)
        s_chan[(s_chan == P.CHANNELS.index("email")) & ~U["consent"][s_user]] = P.CHANNELS.index("app")

        # Slates: drop duplicates and not-yet-launched products, compact to positions 1..k.
        slate = policy.slates(U["stage"][s_user], slate_size, rng)
        day = (s_time - t_start) // 86_400
        bad = catalogue.launch_day[slate] > day[:, None]
        for j in range(1, slate_size):
            bad[:, j] |= (slate[:, :j] == slate[:, j : j + 1]).any(axis=1)
        order = np.argsort(bad, axis=1, kind="stable")
        slate = np.take_along_axis(slate, order, axis=1)
        bad = np.take_along_axis(bad, order, axis=1)
        si, pos0 = np.nonzero(~bad)
        prod, u, pos = slate[si, pos0], s_user[si], pos0 + 1
        t_imp, req, chan = s_time[si], s_req[si], s_chan[si]

        held_cat = (held >= 0).astype(np.int8)
        util = truth.utility(u, prod, held=held_cat, month=m, held_row=u)
        cat = catalogue.category[prod]
        view = rng.random(len(u)) < truth.view_prob(pos)
        click = view & (rng.random(len(u)) < truth.click_prob(util))
        already = held[u, cat] == prod
        c_idx = np.flatnonzero(click & ~already)
        approve_p = truth.approve_prob(u[c_idx], prod[c_idx], day=day[si][c_idx])
        applies = rng.random(len(c_idx)) < truth.apply_prob(util[c_idx], approve_p)
        apply = np.zeros(len(u), dtype=bool)
        apply[c_idx[applies]] = True
        t_view = np.minimum(t_imp + rng.integers(1, 30, len(u)), t_end - 1)
        t_click = np.minimum(t_view + rng.integers(2, 120, len(u)), t_end - 1)
        t_apply = np.minimum(t_click + rng.integers(60, 1800, len(u)), t_end - 1)
        a = c_idx[applies]
        approved = rng.random(len(a)) < approve_p[applies]
        t_dec = np.minimum(t_apply[a] + rng.integers(1800, 3 * 86_400, len(a)), t_end - 1)

        ev.add(u, prod, IMPRESSION, t_imp, req, pos, chan)
        for mask, etype, t in ((view, VIEW, t_view), (click, CLICK, t_click), (apply, APPLY, t_apply)):
            ev.add(u[mask], prod[mask], etype, t[mask], req[mask], pos[mask], chan[mask])
        dec_type = np.where(approved, APPROVE, DECLINE)
        ev.add(u[a], prod[a], dec_type, t_dec, req[a], pos[a], chan[a])

        # New holdings, in time order; a switch closes what the customer held in the category.
        g = a[approved]
        if len(g):
            gt = t_dec[approved]
            o = np.lexsort((gt, cat[g], u[g]))
            gu, gc, gp, gt = u[g][o], cat[g][o], prod[g][o], gt[o]
            prev = held[gu, gc].copy()
            same = np.r_[False, (gu[1:] == gu[:-1]) & (gc[1:] == gc[:-1])]
            prev[same] = gp[np.flatnonzero(same) - 1]  # a second switch in a month closes the first
            close = (prev >= 0) & (prev != gp) & _SWITCH[gc]
            ev.add(gu[close], prev[close], CLOSE, gt[close])
            held[gu, gc] = gp  # the last write per (user, category) wins: the latest approval

        # Closures at a monthly hazard (not of what was just approved this month).
        hu, hc = np.nonzero(held >= 0)
        fresh = np.zeros_like(held, dtype=bool)
        if len(g):
            fresh[gu, gc] = True
        closing = (rng.random(len(hu)) < P.CLOSE_HAZARD[hc]) & ~fresh[hu, hc]
        cu, cc = hu[closing], hc[closing]
        ev.add(cu, held[cu, cc], CLOSE, rng.integers(m0, m1, len(cu)))
        held[cu, cc] = -1

    return ev.build(n_req)
