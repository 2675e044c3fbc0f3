"""Admin endpoints: a key with the ``admin`` scope; actions are logged and recorded with the key's name."""

from __future__ import annotations

import logging
from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.concurrency import run_in_threadpool

from finrec.serving.audit import read_records
from finrec.serving.routes.deps import AdminCaller, AdminDep, ServiceDep
from finrec.serving.schemas import Problem, PromoteRequest, ReloadRequest, RollbackRequest

router = APIRouter(prefix="/admin", tags=["admin"], responses={401: {"model": Problem}, 403: {"model": Problem}})
log = logging.getLogger("finrec.serving")
_WHO = {"x-scopes": ["admin"]}


@router.post("/reload", openapi_extra=_WHO,
             responses={400: {"model": Problem, "description": "Not under the models folder, or a registry-backed "
                              "service."},
                        422: {"model": Problem, "description": "Bundle refused; the old one serves."}})  # fmt: skip
async def reload(caller: AdminCaller, service: ServiceDep, body: ReloadRequest | None = None) -> dict:
    """Load a model bundle, check and warm it up, then swap it in atomically; a bad bundle is refused.

    `model_dir` is a folder under the models folder (`serve.models_root`, by default the one holding the bundle
    served at start-up), relative to it or absolute; any other path is refused.
    """
    target = FsPath(body.model_dir) if body and body.model_dir else None
    log.info("admin: reload", extra={"by": caller.name})
    return await run_in_threadpool(service.reload, target)


@router.get("/models", openapi_extra=_WHO)
def models(service: AdminDep) -> dict:
    """What this process serves: the version behind each model reference, the source and the experiments."""
    rec = service.recommender
    now = rec.clock()
    active = rec.assigner.active(now)
    out: dict = {"source": service.source.kind, "models": service.versions(),
                 "experiment": None if active is None else active.name,
                 "experiments": [e.name for e in rec.assigner.experiments]}  # fmt: skip
    if service.source.kind == "registry":
        registry = service.source.registry  # type: ignore[attr-defined]
        out["aliases"] = registry.aliases()
        out["registry"] = registry.name
    return out


_PROMOTE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "Not a registry-backed service."},
    404: {"model": Problem, "description": "Unknown version or alias."},
    409: {"model": Problem, "description": "Refused by the promotion gate (the verdict is in `gate`), or the "
          "version's bundle cannot load, check or warm up; the champion alias is unchanged."},
}


@router.post("/promote", responses=_PROMOTE_ERRORS, openapi_extra=_WHO)
async def promote(caller: AdminCaller, service: ServiceDep, body: PromoteRequest | None = None) -> dict:
    """Promote a version (default: the challenger) to champion through the gate, and serve it at once.

    The version is loaded, checked and warmed up before the alias moves: a bundle that cannot serve is refused
    (409, with the reason). The gate refuses a challenger that is worse than the champion on the offline metrics
    (409, saying by how much) unless `force`. Other serving processes follow within `registry.poll_seconds`.
    The registry's history records the key's name as who did it.
    """
    body = body or PromoteRequest()
    log.info("admin: promote", extra={"by": caller.name, "version": body.version, "force": body.force})
    return await run_in_threadpool(service.promote, body.version, body.force, body.reason, caller.name)


@router.post("/rollback", openapi_extra=_WHO,
             responses={400: {"model": Problem, "description": "Nothing to roll back to."},
                        409: {"model": Problem, "description": "The version's bundle cannot serve; nothing moved."}})
async def rollback(caller: AdminCaller, service: ServiceDep, body: RollbackRequest | None = None) -> dict:
    """Point the champion back at the previous one (or `to`), and serve it at once (loaded first, as promote)."""
    body = body or RollbackRequest()
    log.info("admin: rollback", extra={"by": caller.name, "to": body.to})
    return await run_in_threadpool(service.rollback, body.to, body.reason, caller.name)


@router.get("/audit/{user_id}", openapi_extra=_WHO)
def audit(
    service: AdminDep,
    user_id: Annotated[str, Path(min_length=1, max_length=128)],
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> dict:
    """What a customer was shown and why: their audit records, oldest first (at most `limit`, the latest)."""
    if service.audit_path is None or service.audit_key is None:
        return {"user_id": user_id, "records": [], "skipped_lines": 0, "note": "audit log is off"}
    q = read_records(service.audit_path, service.audit_key, user_id, limit)
    return {"user_id": user_id, "records": q.records, "skipped_lines": q.skipped_lines}
