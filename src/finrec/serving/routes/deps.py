"""Named dependencies that make handlers read cleanly."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from finrec.serving.service import Service


def get_service(request: Request) -> Service:
    service: Service | None = request.app.state.service
    if service is None:
        raise HTTPException(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def require_admin(service: ServiceDep, x_api_key: Annotated[str | None, Header()] = None) -> Service:
    """Admin endpoints: off without a configured key; otherwise the X-API-Key header must match it."""
    key = service.settings.serve.api_key
    if key is None:
        raise HTTPException(403, "admin endpoints are off: no API key is configured (set serve.api_key, "
                                 "e.g. FINREC_SERVE__API_KEY)")  # fmt: skip
    if x_api_key is None or not hmac.compare_digest(x_api_key.encode(), key.get_secret_value().encode()):
        raise HTTPException(401, "missing or wrong X-API-Key header", headers={"WWW-Authenticate": "X-API-Key"})
    return service


AdminDep = Annotated[Service, Depends(require_admin)]
