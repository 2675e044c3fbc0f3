"""Validation of one batch of feedback events, item by item.

One malformed event must not cost the others in its batch their place in the log, so each item is checked on
its own and the batch is split three ways; every item's index lands in exactly one of them:

* ``accepted``: valid :class:`Event` objects in batch order (the indices in neither list below);
* ``rejected``: a :class:`Rejection` per invalid item with every problem found, each message naming the field,
  what is wrong and how to fix it, since the readers are integrators in other teams;
* ``duplicates``: valid items whose ``event_id`` repeats one accepted earlier in the batch. Clients retry and
  ``event_id`` is the idempotency key, so this is not an error: the first valid copy is kept and later ones are
  reported with its index. Content is not compared (as in the event store); an invalid copy is rejected.

``Event.ts`` is unix seconds (UTC). ``timestamp`` is ISO 8601 text (naive means UTC; ``Z`` and offsets allowed)
or a JSON number of unix seconds, truncated to whole seconds; without it the event happened ``now``. Times
before 2000-01-01 are implausible (a wrong unit, usually) and times more than ``future_tolerance_seconds``
ahead of the server are refused: a skewed client clock would otherwise put events past every feature cutoff.

The checks are written out rather than delegated to pydantic to keep the messages plain and specific; a
batch of 1000 events takes a few milliseconds.

Examples
--------
>>> batch = [{"event_id": 1, "user_id": "C-1", "product_id": "P-1", "event_type": "click"},
...          {"event_id": 2, "user_id": "C-1", "product_id": "P-1", "event_type": "purchase"}]
>>> accepted, rejected, duplicates = parse_events(batch, lambda p: True, now=1_700_000_000)
>>> accepted[0].event_id, accepted[0].ts
('1', 1700000000)
>>> rejected[0].index, rejected[0].errors[0].split("; ")[0]
(1, "event_type: 'purchase' is not a known event type")
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from difflib import get_close_matches
from typing import Any, NamedTuple

from finrec.data.contract import EVENT_TYPES

MAX_TEXT_LENGTH = 128
#: Problems listed per rejected event at most (``error_count`` has them all), so no item makes a huge answer.
MAX_ERRORS_PER_ITEM = 5
#: Events that change what a customer holds or may be offered: only the bank's own systems may send them.
OWNERSHIP_EVENTS = frozenset({"approve", "decline", "hold", "close"})
MAX_POSITION = 100_000  # far beyond any slate; keeps values inside SQLite's 64-bit integers
EARLIEST_TS = 946_684_800  # 2000-01-01T00:00:00Z
REQUIRED_FIELDS: tuple[str, ...] = ("event_id", "user_id", "product_id", "event_type")
OPTIONAL_FIELDS: tuple[str, ...] = ("timestamp", "position", "request_id", "channel", "arm", "model_version")
FIELDS = frozenset(REQUIRED_FIELDS + OPTIONAL_FIELDS)

_EVENT_TYPES = frozenset(EVENT_TYPES)
_FIELDS_TEXT = ", ".join(REQUIRED_FIELDS + OPTIONAL_FIELDS)
_EVENT_TYPE_FIX = f"use one of {', '.join(EVENT_TYPES)}"
_INT_LIMIT = 10**MAX_TEXT_LENGTH  # integers this large have more digits than an id may have
_MISSING: Any = object()
_JSON_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string"}
_JSON_KINDS |= {list: "an array", tuple: "an array", dict: "an object"}
_FIXES = {
    "event_id": "send a unique id per event, the same one when the event is sent again, so it is stored once",
    "user_id": "send the customer's id",
    "product_id": "send the product's id from the catalogue",
    "request_id": "send the request_id of the recommendation response the event answers, or leave it out",
    "channel": "send where it happened as text, e.g. 'app', 'web', 'email', or leave it out",
    "arm": "send the arm named in the recommendation response, or leave it out",
    "model_version": "send the model_version of the recommendation response, or leave it out",
}


@dataclass(frozen=True, slots=True)
class Event:
    """One valid feedback event; ids are text and ``ts`` is unix seconds (UTC)."""

    event_id: str
    user_id: str
    product_id: str
    event_type: str
    ts: int
    position: int | None = None
    request_id: str | None = None
    channel: str | None = None
    arm: str | None = None
    model_version: str | None = None


@dataclass
class Rejection:
    """An invalid item: its index in the batch, its ``event_id`` if that was valid, the first
    :data:`MAX_ERRORS_PER_ITEM` problems found and how many there were in all."""

    index: int
    event_id: str | None
    errors: list[str]
    error_count: int = 0

    def __post_init__(self) -> None:
        self.error_count = max(self.error_count, len(self.errors))
        del self.errors[MAX_ERRORS_PER_ITEM:]


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A valid item whose ``event_id`` was accepted earlier in the batch, at ``first_index``."""

    index: int
    event_id: str
    first_index: int


class ParsedBatch(NamedTuple):
    """The three-way split of a batch; see the module docstring."""

    accepted: list[Event]
    rejected: list[Rejection]
    duplicates: list[Duplicate]


def parse_events(
    items: list[Any],
    known_product: Callable[[str], bool],
    now: int,
    future_tolerance_seconds: int = 300,
    max_batch: int = 1000,
    known_user: Callable[[str], bool] | None = None,
    trust: Callable[[Event], list[str]] | None = None,
) -> ParsedBatch:
    """Validate a batch of decoded JSON items; never raises for bad items, only for a bad batch.

    Parameters
    ----------
    items
        The decoded JSON array of the request body.
    known_product
        Whether a product id is in the catalogue; events for unknown products are rejected.
    now
        Server time in unix seconds: the time of events without ``timestamp`` and the reference for the future check.
    future_tolerance_seconds
        Client clock skew allowed before a timestamp counts as in the future.
    max_batch
        Largest number of items accepted in one call.
    known_user
        Whether a customer id is known; events for unknown customers are rejected (None: no check).
    trust
        Further checks of an otherwise valid event (who may send it, the answer it cites): its problems, if any.

    Returns
    -------
    ParsedBatch
        ``(accepted, rejected, duplicates)``; each item's index is in exactly one of them.

    Raises
    ------
    ValueError
        If ``items`` is not a list or holds more than ``max_batch`` items (the HTTP layer answers 413/422).
    """
    if not isinstance(items, list | tuple):
        raise ValueError(f"expected a JSON array of event objects, got {_kind(items)}")
    if len(items) > max_batch:
        raise ValueError(
            f"the batch holds {len(items)} events but at most {max_batch} are accepted per request; "
            "split it into smaller batches"
        )
    accepted: list[Event] = []
    rejected: list[Rejection] = []
    duplicates: list[Duplicate] = []
    first_seen: dict[str, int] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            what = f"item: expected a JSON object with fields {', '.join(REQUIRED_FIELDS)}, got {_kind(item)}"
            rejected.append(Rejection(index, None, [what]))
            continue
        errors: list[str] = []
        event_id = _string("event_id", item.get("event_id", _MISSING), errors)
        hidden = [0]
        event = _parse_item(item, event_id, known_product, now, future_tolerance_seconds, errors, hidden)
        if event is not None and known_user is not None and not known_user(event.user_id):
            errors.append(f"user_id: {_show(event.user_id)} is not a customer of this service; send events only "
                          "for customers in the service's data (a new customer is known once the data is reloaded)")
            event = None
        if event is not None and trust is not None:
            errors.extend(trust(event))
            event = None if errors else event
        if event is None:
            rejected.append(Rejection(index, event_id, errors, len(errors) + hidden[0]))
        elif event.event_id in first_seen:
            duplicates.append(Duplicate(index, event.event_id, first_seen[event.event_id]))
        else:
            first_seen[event.event_id] = index
            accepted.append(event)
    return ParsedBatch(accepted, rejected, duplicates)


def _parse_item(
    item: dict[Any, Any],
    event_id: str | None,
    known_product: Callable[[str], bool],
    now: int,
    tolerance: int,
    errors: list[str],
    hidden: list[int],
) -> Event | None:
    user_id = _string("user_id", item.get("user_id", _MISSING), errors)
    product_id = _string("product_id", item.get("product_id", _MISSING), errors)
    event_type = _event_type(item.get("event_type", _MISSING), errors)
    ts = _timestamp(item.get("timestamp"), now, tolerance, errors)
    position = _position(item.get("position"), errors)
    request_id = _string("request_id", item.get("request_id"), errors, required=False)
    channel = _string("channel", item.get("channel"), errors, required=False, ints=False)
    arm = _string("arm", item.get("arm"), errors, required=False, ints=False)
    model_version = _string("model_version", item.get("model_version"), errors, required=False, ints=False)
    if product_id is not None and not known_product(product_id):
        errors.append(
            f"product_id: {product_id!r} is not in the product catalogue; send events only for catalogue "
            "products, and if the product was just added, wait until the service has reloaded the catalogue"
        )
    if not FIELDS.issuperset(item):
        unknown = [key for key in item if key not in FIELDS]
        for key in sorted(unknown[:100], key=repr)[:MAX_ERRORS_PER_ITEM]:  # a few suggestions, not one per key
            plain = isinstance(key, str) and len(key) <= 64 and key.isprintable()
            near = get_close_matches(key, FIELDS, n=1) if plain else []
            hint = f"did you mean {near[0]!r}? " if near else ""
            errors.append(f"{key if plain else _show(key)}: is not a known field; {hint}the fields are {_FIELDS_TEXT}")
        hidden[0] = max(0, len(unknown) - MAX_ERRORS_PER_ITEM)  # counted in error_count, never listed
    if errors or event_id is None or user_id is None or product_id is None or event_type is None or ts is None:
        return None
    return Event(event_id, user_id, product_id, event_type, ts, position, request_id, channel, arm, model_version)


def _string(name: str, value: Any, errors: list[str], required: bool = True, ints: bool = True) -> str | None:
    fix = _FIXES[name]
    if value is _MISSING or value is None:
        if required:
            errors.append(f"{name}: is {'missing' if value is _MISSING else 'null'}; {fix}")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int) or not (ints or isinstance(value, str)):
        errors.append(f"{name}: expected {'a string or an integer' if ints else 'a string'}, got {_kind(value)}; {fix}")
        return None
    if isinstance(value, int):
        # Checked before str(): a huge integer is refused without building its text.
        text = str(value) if -_INT_LIMIT < value < _INT_LIMIT else "x" * (MAX_TEXT_LENGTH + 1)
    else:
        text = value.strip()
    if not text:
        if required:
            errors.append(f"{name}: is empty; {fix}")
        return None  # a blank optional field means not given
    if len(text) > MAX_TEXT_LENGTH:
        errors.append(f"{name}: is {len(text)} characters long; use at most {MAX_TEXT_LENGTH} characters")
    elif not text.isprintable():
        errors.append(f"{name}: {_show(text)} contains control or other non-printable characters; remove them")
    else:
        return text
    return None


def _event_type(value: Any, errors: list[str]) -> str | None:
    fix = _EVENT_TYPE_FIX
    if value is _MISSING or value is None:
        errors.append(f"event_type: is {'missing' if value is _MISSING else 'null'}; {fix}")
    elif not isinstance(value, str):
        errors.append(f"event_type: expected a string, got {_kind(value)}; {fix}")
    elif value not in _EVENT_TYPES:
        near = get_close_matches(value.strip().lower(), EVENT_TYPES, n=1) if len(value) <= 64 else []
        hint = f"did you mean {near[0]!r}? " if near else ""
        errors.append(f"event_type: {_show(value)} is not a known event type; {hint}{fix}")
    else:
        return value
    return None


def _timestamp(value: Any, now: int, tolerance: int, errors: list[str]) -> int | None:
    fix = "send ISO 8601 text such as '2024-05-01T12:30:00Z' or unix seconds as a number, or leave it out for now"
    seconds: int | float
    if value is None:
        return now
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        errors.append(f"timestamp: expected text or a number, got {_kind(value)}; {fix}")
        return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
            seconds = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
        except (ValueError, OverflowError):
            unit = "; unix seconds must be a JSON number, not text" if value.strip().lstrip("-").isdigit() else ""
            errors.append(f"timestamp: {_show(value)} is not an ISO 8601 date and time{unit}; {fix}")
            return None
    elif isinstance(value, float) and not math.isfinite(value):
        errors.append(f"timestamp: {value} is not a time; {fix}")
        return None
    else:
        seconds = value
    if seconds < EARLIEST_TS:
        errors.append(f"timestamp: {_show(value)} is before 2000-01-01, which is implausible for an event; {fix}")
        return None
    if seconds > now + tolerance:
        unit = " (it looks like milliseconds; send seconds)" if not isinstance(value, str) and value > 1e11 else ""
        errors.append(
            f"timestamp: {_show(value)} is in the future{unit}: more than {tolerance} s after the server time {now}; "
            "send the UTC time the event happened and check the sender's clock"
        )
        return None
    return math.floor(seconds)


def _position(value: Any, errors: list[str]) -> int | None:
    fix = "send the 1-based slot the product was shown in (the first is 1), or leave it out"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        errors.append(f"position: expected an integer, got {_kind(value)}; {fix}")
    elif not 1 <= value <= MAX_POSITION:
        errors.append(f"position: {_show(value)} is outside 1..{MAX_POSITION}; {fix}")
    else:
        return value
    return None


def _kind(value: Any) -> str:
    """The JSON name of a value's type, as the sender sees it."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    """A short repr of a value sent by a client, so a huge payload is not echoed back."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return "<a very large integer>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
