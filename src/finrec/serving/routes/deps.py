"""Named dependencies that make handlers read cleanly: the service, and the caller with the scope a route needs.

``Caller("recommend")`` authenticates the ``X-API-Key`` header against the service's keys
(:mod:`finrec.serving.auth`), checks the scope and the key's rate limit, and gives the handler the
:class:`~finrec.serving.auth.Principal`: 401 without a known key, 403 without the scope, 429 over the rate.
The key is checked before anything else, so an unauthenticated caller learns nothing, not even whether the
model has loaded.

Both dependencies are ``async``: they do no I/O (the key table and the rate limiter live in memory), and FastAPI
runs a sync dependency in its thread pool, one hand-off per dependency per request.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from finrec.serving.auth import KeyTable, Principal
from finrec.serving.service import Service

api_key_header = APIKeyHeader(name="X-API-Key", scheme_name="ApiKey", auto_error=False,
                              description="A key issued by the service's operator; each key has scopes "
                              "(docs/security.md).")  # fmt: skip


async def get_service(request: Request) -> Service:
    service: Service | None = request.app.state.service
    if service is None:
        raise HTTPException(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def needs(*scopes: str, browser: bool = False) -> Callable[..., Awaitable[Principal]]:
    """A dependency that returns the caller if its key has one of ``scopes``.

    ``browser``: a page people open in a browser, which cannot send the header: the key is also taken as the
    password of HTTP Basic authentication (any user name), and a 401 asks the browser for it.
    """
    scope = " or ".join(repr(s) for s in scopes)
    challenge = 'Basic realm="finrec: an API key as the password", charset="UTF-8"' if browser else "X-API-Key"

    async def caller(request: Request, key: Annotated[str | None, Security(api_key_header)] = None) -> Principal:
        table: KeyTable = request.app.state.keys
        if not key and browser:
            key = _basic_password(request.headers.get("authorization", ""))
        who = table.authenticate(key)
        if who is None:
            what = "no X-API-Key header" if not key else "the X-API-Key header holds no key this service knows"
            raise HTTPException(401, f"{what}: this route needs a key with the scope {scope}",
                                headers={"WWW-Authenticate": challenge})  # fmt: skip
        request.scope["state"]["caller"] = who.name
        if not any(who.may(s) for s in scopes):
            raise HTTPException(403, f"the key {who.name!r} lacks the scope {scope}, which this route needs "
                                     f"(it has {', '.join(sorted(who.scopes))})")  # fmt: skip
        wait = table.limiter.take(who)
        if wait > 0:
            raise HTTPException(429, f"the key {who.name!r} is over its rate limit ({who.rate_per_second:g} "
                                     f"requests per second, {who.burst} at once)",
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})  # fmt: skip
        return who

    caller.__name__ = "needs_" + "_or_".join(s.replace(":", "_") for s in scopes)
    return caller


def _basic_password(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2] or None
    except (ValueError, UnicodeDecodeError):
        return None


RecommendCaller = Annotated[Principal, Depends(needs("recommend"))]
EventsCaller = Annotated[Principal, Depends(needs("events", "events:trusted"))]
MonitorCaller = Annotated[Principal, Depends(needs("monitor"))]
#: For the HTML dashboard: the key in X-API-Key or as an HTTP Basic password (browsers prompt for it).
MonitorPageCaller = Annotated[Principal, Depends(needs("monitor", browser=True))]
AdminCaller = Annotated[Principal, Depends(needs("admin"))]


def require_admin(_: AdminCaller, service: ServiceDep) -> Service:
    """The service, for a caller whose key has the ``admin`` scope."""
    return service


AdminDep = Annotated[Service, Depends(require_admin)]
