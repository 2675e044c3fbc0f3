"""Named dependencies that make handlers read cleanly: the service, and the caller with the scope a route needs.

``Caller("recommend")`` authenticates the ``X-API-Key`` header against the service's keys
(:mod:`finrec.serving.auth`), checks the scope and the key's rate limit, and gives the handler the
:class:`~finrec.serving.auth.Principal`: 401 without a known key, 403 without the scope, 429 over the rate.
The key is checked before anything else, so an unauthenticated caller learns nothing, not even whether the
model has loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from finrec.serving.auth import KeyTable, Principal
from finrec.serving.service import Service

api_key_header = APIKeyHeader(name="X-API-Key", scheme_name="ApiKey", auto_error=False,
                              description="A key issued by the service's operator; each key has scopes "
                              "(docs/security.md).")  # fmt: skip


def get_service(request: Request) -> Service:
    service: Service | None = request.app.state.service
    if service is None:
        raise HTTPException(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def needs(*scopes: str) -> Callable[..., Principal]:
    """A dependency that returns the caller if its key has one of ``scopes``."""
    scope = " or ".join(repr(s) for s in scopes)

    def caller(request: Request, key: Annotated[str | None, Security(api_key_header)] = None) -> Principal:
        table: KeyTable = request.app.state.keys
        who = table.authenticate(key)
        if who is None:
            what = "no X-API-Key header" if not key else "the X-API-Key header holds no key this service knows"
            raise HTTPException(401, f"{what}: this route needs a key with the scope {scope}",
                                headers={"WWW-Authenticate": "X-API-Key"})  # fmt: skip
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


RecommendCaller = Annotated[Principal, Depends(needs("recommend"))]
EventsCaller = Annotated[Principal, Depends(needs("events", "events:trusted"))]
MonitorCaller = Annotated[Principal, Depends(needs("monitor"))]
AdminCaller = Annotated[Principal, Depends(needs("admin"))]


def require_admin(_: AdminCaller, service: ServiceDep) -> Service:
    """The service, for a caller whose key has the ``admin`` scope."""
    return service


AdminDep = Annotated[Service, Depends(require_admin)]
