"""The consistency check over HTTP (admin): objects without rows and rows without objects."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from api.deps import get_state, require_admin
from api.state import ServiceState
from store.consistency import check

router = APIRouter(prefix="/v1/admin/fsck", tags=["operations (admin)"], dependencies=[Depends(require_admin)])


@router.get("")
def fsck(
    state: ServiceState = Depends(get_state),
    grace: float | None = Query(
        None, ge=0, le=100 * 365 * 86400, description="Grace period in seconds (default PROMPTSTORE_GC_GRACE)."
    ),
) -> dict[str, Any]:
    """What `promptstore fsck` prints: ``orphans`` (objects no row refers to; ``collectable`` once
    older than the grace), ``missing`` (rows whose object is gone). Reads only; the garbage
    collector (or `promptstore fsck --gc`) deletes the collectable orphans."""
    grace_s = state.settings.gc_grace if grace is None else grace
    return check(state.sessionmaker, state.objects, grace_s=grace_s).as_json()
