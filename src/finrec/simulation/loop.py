"""The closed loop: synthetic customers call the running service and send back what they did.

Requests arrive as a Poisson process at ``rate`` per second for ``minutes``; each one is a customer drawn by
activity who asks ``GET /recommend/{user_id}?k=K``, reacts to the answer as the ground truth says
(:class:`~finrec.simulation.customers.SimulatedCustomers`) and posts the reaction in one ``POST /events``
batch carrying the answer's ``request_id``, ``arm`` and ``model_version``. The service applies the events
(holdings, cooling-off, frequency caps, online features), so later answers see earlier reactions.

Arrival times are fixed in advance (seeded); a pool of ``concurrency`` threads sends the requests over one
keep-alive connection pool. When the service is slower than the arrivals, requests queue in the pool: the
report's ``lag_seconds`` says how late they went out, so an overloaded run is visible rather than silently
running at a lower rate.

Examples
--------
>>> report = run_simulation("http://127.0.0.1:8000", "data/world", minutes=0.2, rate=5)  # doctest: +SKIP
>>> report.to_dict()["totals"]["realised_per_answer"]  # doctest: +SKIP
0.021
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
from tqdm import tqdm

from finrec.errors import FinrecError
from finrec.simulation.customers import SimulatedCustomers
from finrec.simulation.report import SimulationRecorder, SimulationReport

#: Largest number of arrivals one run may plan (rate x seconds); beyond it the plan alone takes memory.
MAX_ARRIVALS = 10_000_000
#: Largest k the service answers (serving.recommender.MAX_K).
MAX_K = 50
CHANNEL = "simulation"


def run_simulation(
    base_url: str,
    world_dir: str | Path,
    minutes: float,
    rate: float,
    k: int = 10,
    seed: int = 0,
    concurrency: int = 8,
    drift_strength: float | None = None,
    api_key: str | None = None,
    progress: bool = True,
    *,
    consenting_only: bool = False,
    window_seconds: float | None = None,
    timeout: float = 10.0,
    max_batch: int = 1000,
    customers: SimulatedCustomers | None = None,
    transport: httpx.BaseTransport | None = None,
) -> SimulationReport:
    """Run synthetic customers of ``world_dir`` against the service at ``base_url``.

    Parameters
    ----------
    base_url
        Root of the service, e.g. ``http://127.0.0.1:8000``.
    world_dir
        The generated world the service serves (its ``ground_truth/`` drives the customers).
    minutes, rate
        Duration (fractions allowed) and mean arrivals per second of the Poisson process.
    k
        Products asked for per request (1-50).
    seed
        Seeds the arrivals, the callers and every reaction.
    concurrency
        Requests in flight at most (threads sharing one keep-alive connection pool).
    drift_strength
        ``None``: the world's own drift; a number: the world's drift direction at this strength from now on
        (see :mod:`finrec.simulation.customers`).
    api_key
        Sent as ``X-API-Key`` on every call: a key with the scopes ``recommend`` and ``events:trusted`` (the
        simulated bank reports approvals and declines too), and ``recommend:explain`` to count opt-outs. Customer
        events carry the answer's ``request_id``, as the service requires of untrusted callers.
    progress
        Show a progress bar.
    consenting_only
        Draw callers only among customers who consent to marketing; by default everyone calls and the service
        answers those who opted out with nothing (counted as ``opted_out``).
    window_seconds
        Width of the time windows of the conversion timeline; default a thirtieth of the run, at least 1 s.
    timeout
        Seconds a call may take before it counts as a ``timeout`` failure.
    max_batch
        Events per ``POST /events`` at most (the service's ``serve.max_events_per_request``).
    customers
        Use these customers instead of loading them from ``world_dir`` (tests; a warm start).
    transport
        An httpx transport instead of the network (tests).

    Returns
    -------
    SimulationReport
        Tallies per model version and arm, failures by kind with the server's messages, and the timeline. A
        Ctrl-C stops the run early and returns what was done so far (``interrupted``).

    Raises
    ------
    FinrecError
        Invalid numbers, a world without ground truth, or a service that cannot be reached or is not ready.
    """
    duration = _check(minutes, rate, k, concurrency, timeout, max_batch, window_seconds)
    window = float(window_seconds) if window_seconds is not None else max(1.0, duration / 30)
    if customers is None:
        customers = SimulatedCustomers.from_world(world_dir, seed=seed, drift_strength=drift_strength)
    headers = {"X-API-Key": api_key} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    config = {"url": base_url, "world": str(world_dir), "minutes": minutes, "rate": rate, "k": k, "seed": seed,
              "concurrency": concurrency, "drift_strength": drift_strength, "consenting_only": consenting_only,
              "timeout": timeout}  # fmt: skip
    recorder = SimulationRecorder(window)
    with httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, limits=limits,
                      transport=transport) as client:  # fmt: skip
        _check_service(client, base_url, customers, recorder)
        rng = np.random.default_rng([seed, 1])
        n = int(rng.poisson(rate * duration))
        due = np.sort(rng.uniform(0.0, duration, n))
        callers = customers.callers(n, rng, consenting_only=consenting_only)
        run = _Run(client, customers, recorder, k, max_batch, uuid.uuid4().hex[:12])
        t0 = time.perf_counter()
        interrupted = _drive(run, due, callers, concurrency, progress)
        wall = time.perf_counter() - t0
    return recorder.report(config, planned=n, wall_seconds=wall, interrupted=interrupted)


def _check(minutes: float, rate: float, k: int, concurrency: int, timeout: float, max_batch: int,
           window_seconds: float | None) -> float:  # fmt: skip
    problems = []
    if not (math.isfinite(minutes) and minutes > 0):
        problems.append(f"--minutes must be a positive number (got {minutes})")
    if not (math.isfinite(rate) and rate > 0):
        problems.append(f"--rate must be a positive number of requests per second (got {rate})")
    if not 1 <= k <= MAX_K:
        problems.append(f"--k must be between 1 and {MAX_K} (got {k})")
    if not 1 <= concurrency <= 1024:
        problems.append(f"--concurrency must be between 1 and 1024 (got {concurrency})")
    if not (math.isfinite(timeout) and timeout > 0):
        problems.append(f"--timeout must be a positive number of seconds (got {timeout})")
    if max_batch < 1:
        problems.append(f"the events batch size must be at least 1 (got {max_batch})")
    if window_seconds is not None and not (math.isfinite(window_seconds) and window_seconds > 0):
        problems.append(f"--window-seconds must be a positive number (got {window_seconds})")
    if not problems and rate * minutes * 60 > MAX_ARRIVALS:
        problems.append(f"{rate:g}/s for {minutes:g} minutes plans {rate * minutes * 60:,.0f} requests, "
                        f"more than {MAX_ARRIVALS:,}")  # fmt: skip
    if problems:
        raise FinrecError("cannot run this simulation: " + "; ".join(problems), hint="see `finrec simulate --help`")
    return float(minutes) * 60.0


def _check_service(client: httpx.Client, url: str, customers: SimulatedCustomers, recorder: SimulationRecorder) -> None:
    """Fail early, with a hint, when the service is not there or not ready; note a world it does not serve."""
    start = "start it with `finrec serve --model-dir MODEL --data WORLD` (or pass --url)"
    try:
        r = client.get("/ready")
    except httpx.TimeoutException:
        raise FinrecError(f"the service at {url} did not answer /ready in time", hint=start) from None
    except httpx.TransportError as exc:
        raise FinrecError(f"cannot reach the service at {url}: {_describe(exc)}", hint=start) from None
    if r.status_code == 503:
        raise FinrecError(f"the service at {url} is still loading its model",
                          hint="wait until GET /ready answers 200, then run again")  # fmt: skip
    if r.status_code != 200:
        raise FinrecError(f"the service at {url} answered /ready with {r.status_code}: {_problem(r)}",
                          hint="check --url: it must be the root of a `finrec serve`")  # fmt: skip
    try:
        ready = r.json()
    except ValueError:
        raise FinrecError(f"{url}/ready did not answer JSON; is it a finrec service?", hint=start) from None
    truth = customers.truth
    served = (ready.get("customers"), ready.get("products"))
    if served != (truth.n_users, truth.n_products) and None not in served:
        recorder.note(f"the service serves {served[0]} customers and {served[1]} products, the world has "
                      f"{truth.n_users} and {truth.n_products}: is it serving this world?")  # fmt: skip


class _Run:
    """One request of the loop, end to end: ask, react, post the reaction; every outcome is recorded."""

    def __init__(self, client: httpx.Client, customers: SimulatedCustomers, recorder: SimulationRecorder, k: int,
                 max_batch: int, run_id: str) -> None:  # fmt: skip
        self.client, self.customers, self.recorder = client, customers, recorder
        self.k, self.max_batch, self.run_id = k, max_batch, run_id
        self.t0 = 0.0

    def __call__(self, i: int, user: str, due: float) -> None:
        rec = self.recorder
        rec.request(time.perf_counter() - (self.t0 + due))
        request_id = f"sim-{self.run_id}-{i}"
        started = time.perf_counter()
        body = self._call("recommend", "GET", f"/recommend/{quote(user, safe='')}", params={"k": self.k},
                          headers={"X-Request-ID": request_id})  # fmt: skip
        if body is None:
            return
        latency = time.perf_counter() - started
        try:
            version, arm = str(body["model_version"]), body.get("arm")
            shown = [str(it["product_id"]) for it in body["items"]]
            served_at = float(body["served_at"])
            opted_out = bool((body.get("excluded") or {}).get("marketing_opt_out", 0))
            request_id = str(body.get("request_id") or request_id)
        except (KeyError, TypeError, ValueError) as exc:
            rec.failure("recommend", "bad_response", 200, f"answer lacks {exc}: not a finrec answer")
            return
        reaction = self.customers.react(user, shown, served_at, stream=i)
        if reaction.unknown_products:
            rec.note_once("the service showed products the world does not know (no reaction is drawn for them): "
                          "is it serving this world?")  # fmt: skip
        counts = Counter(e["event_type"] for e in reaction.events)
        rec.answer(version, arm, due, len(shown), opted_out and not shown, counts, reaction.expected_conversions,
                   latency)  # fmt: skip
        events = [{**e, "event_id": f"{request_id}-{j}", "request_id": request_id, "arm": arm,
                   "model_version": version, "channel": CHANNEL} for j, e in enumerate(reaction.events)]  # fmt: skip
        for start in range(0, len(events), self.max_batch):
            self._post(events[start : start + self.max_batch], version, arm)

    def _post(self, batch: list[dict[str, Any]], version: str, arm: str | None) -> None:
        result = self._call("events", "POST", "/events", json=batch)
        if result is None:
            return
        rejected = result.get("rejected") or []
        self.recorder.events(version, arm, len(batch), int(result.get("accepted", 0)),
                             int(result.get("duplicates", 0)), len(rejected))  # fmt: skip
        for r in rejected:
            errors = "; ".join(r.get("errors") or []) or "no reason given"
            etype = batch[r["index"]]["event_type"] if 0 <= r.get("index", -1) < len(batch) else "?"
            self.recorder.failure("events", "rejected", 200, f"{etype} event rejected: {errors}")

    def _call(self, stage: str, method: str, path: str, **kwargs: Any) -> dict[str, Any] | None:
        """The decoded JSON answer, or None after recording the failure by kind with the server's message."""
        rec = self.recorder
        try:
            try:
                r = self.client.request(method, path, **kwargs)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                # A kept-alive connection can be closed by the service just as a request goes out on it (its idle
                # timeout fires): the request never reached the application. Sent once more on a new connection,
                # as browsers and urllib3 do; safe here, since a recommendation is a read and events carry ids the
                # service deduplicates. A service that is down fails the second try too, and that is recorded.
                rec.resend()
                r = self.client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            rec.failure(stage, "timeout", None, f"no answer within the timeout ({type(exc).__name__})")
            return None
        except httpx.TransportError as exc:
            rec.failure(stage, "connection", None, _describe(exc))
            return None
        if r.status_code >= 500:
            rec.failure(stage, "http_5xx", r.status_code, _problem(r))
            return None
        if r.status_code >= 400:
            rec.failure(stage, "http_4xx", r.status_code, _problem(r))
            return None
        try:
            body = r.json()
        except ValueError:
            rec.failure(stage, "bad_response", r.status_code, f"not JSON: {r.text[:200]!r}")
            return None
        if not isinstance(body, dict):
            rec.failure(stage, "bad_response", r.status_code, f"expected a JSON object, got {r.text[:200]!r}")
            return None
        return body


def _drive(run: _Run, due: np.ndarray, callers: np.ndarray, concurrency: int, progress: bool) -> bool:
    """Send every request at its due time; True when stopped by Ctrl-C (pending requests are dropped)."""
    bar = tqdm(total=len(due), unit="req", desc="simulating", disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="finrec-sim")
    futures: list[Future[None]] = []
    run.t0 = time.perf_counter()
    try:
        for i, (t, user) in enumerate(zip(due.tolist(), callers.tolist(), strict=True)):
            wait = run.t0 + t - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            f = pool.submit(run, i, user, t)
            f.add_done_callback(lambda _: bar.update(1))
            futures.append(f)
        for f in futures:
            f.result()  # a bug in the loop itself surfaces here instead of vanishing in a thread
    except KeyboardInterrupt:
        pool.shutdown(wait=True, cancel_futures=True)
        run.recorder.note("interrupted: requests not yet sent were dropped")
        return True
    finally:
        pool.shutdown(wait=True)
        bar.close()
    return False


def _describe(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _problem(r: httpx.Response) -> str:
    """The server's own words: the ``error`` (and ``hint``) of a finrec problem body, else the start of the text."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:300] or r.reason_phrase
    if isinstance(body, dict) and "error" in body:
        text = str(body["error"])
        more = [p for p in body.get("problems") or [] if isinstance(p, dict)][1:5]  # the first is in the error
        if more:
            text += "; also " + "; ".join(f"{p.get('where', '?')}: {p.get('message', '?')}" for p in more)
        if body.get("hint"):
            text += f" (hint: {body['hint']})"
        return text
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return r.text[:300]
