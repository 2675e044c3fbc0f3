"""Admin endpoints (need the X-API-Key header; off when no key is configured)."""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.concurrency import run_in_threadpool

from finrec.serving.audit import read_records
from finrec.serving.routes.deps import AdminDep
from finrec.serving.schemas import Problem, PromoteRequest, ReloadRequest, RollbackRequest

router = APIRouter(prefix="/admin", tags=["admin"],
                   responses={401: {"model": Problem}, 403: {"model": Problem}})  # fmt: skip


@router.post("/reload", responses={422: {"model": Problem, "description": "Bundle refused; the old one serves."}})
async def reload(service: AdminDep, body: ReloadRequest | None = None) -> dict:
    """Load a model bundle, check and warm it up, then swap it in atomically; a bad bundle is refused."""
    target = FsPath(body.model_dir) if body and body.model_dir else None
    return await run_in_threadpool(service.reload, target)


@router.get("/models")
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
        out["registry"] = str(registry.root)
    return out


_PROMOTE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "Not a registry-backed service."},
    404: {"model": Problem, "description": "Unknown version or alias."},
    409: {"model": Problem, "description": "Refused by the promotion gate (the verdict is in `gate`)."},
}


@router.post("/promote", responses=_PROMOTE_ERRORS)
async def promote(service: AdminDep, body: PromoteRequest | None = None) -> dict:
    """Promote a version (default: the challenger) to champion through the gate, and serve it at once.

    The gate refuses a challenger that is worse than the champion on the offline metrics (409, saying by how
    much) unless `force`. Other serving processes follow within `registry.poll_seconds`.
    """
    body = body or PromoteRequest()
    return await run_in_threadpool(service.promote, body.version, body.force, body.reason, "api")


@router.post("/rollback", responses={400: {"model": Problem, "description": "Nothing to roll back to."}})
async def rollback(service: AdminDep, body: RollbackRequest | None = None) -> dict:
    """Point the champion back at the previous one (or `to`), and serve it at once."""
    body = body or RollbackRequest()
    return await run_in_threadpool(service.rollback, body.to, body.reason, "api")


@router.get("/audit/{user_id}")
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
