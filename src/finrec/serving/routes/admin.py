"""Admin endpoints (need the X-API-Key header; off when no key is configured)."""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.concurrency import run_in_threadpool

from finrec.serving.audit import read_records
from finrec.serving.routes.deps import AdminDep
from finrec.serving.schemas import Problem, ReloadRequest

router = APIRouter(prefix="/admin", tags=["admin"],
                   responses={401: {"model": Problem}, 403: {"model": Problem}})  # fmt: skip


@router.post("/reload", responses={422: {"model": Problem, "description": "Bundle refused; the old one serves."}})
async def reload(service: AdminDep, body: ReloadRequest | None = None) -> dict:
    """Load a model bundle, check and warm it up, then swap it in atomically; a bad bundle is refused."""
    target = FsPath(body.model_dir) if body and body.model_dir else None
    return await run_in_threadpool(service.reload, target)


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
