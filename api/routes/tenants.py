"""Tenants (admin): create and list (a page at a time: ``store.listing``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from api.deps import DbSession, require_admin
from api.errors import ApiError
from api.jsonroute import CheckedJSONRoute
from api.schemas import ErrorOut, TenantCreate, TenantCreated, TenantList, TenantPublic
from store import listing, repo

router = APIRouter(
    prefix="/v1/admin/tenants", tags=["tenants (admin)"], dependencies=[Depends(require_admin)],
    route_class=CheckedJSONRoute,  # JSON bodies bounded before parsing (store.textinput)
)


@router.post(
    "", status_code=201, response_model=TenantCreated,
    responses={409: {"model": ErrorOut, "description": "A tenant with that name exists."}},
)
def create_tenant(body: TenantCreate, s: DbSession) -> TenantCreated:
    """Create a tenant; the answer holds its API key, which is shown only here."""
    try:
        tenant, key = repo.create_tenant(s, body.name)
    except repo.TenantExists as exc:
        raise ApiError(409, str(exc)) from None
    except repo.StoreError as exc:
        raise ApiError(422, str(exc)) from None
    return TenantCreated(id=tenant.id, name=tenant.name, api_key=key)


@router.get("", response_model=TenantList, responses={422: {"model": ErrorOut}})
def list_tenants(
    s: DbSession,
    limit: int | None = Query(None, description="Tenants per page, 1 to 1000 (default 100)."),
    cursor: str | None = Query(None, description="The `next_cursor` of the previous page; omitted: the first page."),
    name_prefix: str | None = Query(None, description="Only tenants whose name starts with this (case-sensitive)."),
) -> TenantList:
    """The tenants, oldest first, a page at a time (keyset: stable while tenants are added),
    with their task and request counters. ``count``: all matching."""
    try:
        page = listing.tenant_page(s, limit=limit, cursor=cursor, name_prefix=name_prefix)
    except listing.InvalidListing as exc:
        raise ApiError(422, str(exc)) from None
    items = [TenantPublic.model_validate(t) for t in page.items]
    return TenantList(items=items, count=page.count, next_cursor=page.next_cursor)
