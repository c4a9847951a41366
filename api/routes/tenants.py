"""Tenants (admin): create and list."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.deps import DbSession, require_admin
from api.errors import ApiError
from api.jsonroute import CheckedJSONRoute
from api.schemas import ErrorOut, TenantCreate, TenantCreated, TenantList, TenantPublic
from store import repo

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


@router.get("", response_model=TenantList)
def list_tenants(s: DbSession) -> TenantList:
    items = [TenantPublic.model_validate(t) for t in repo.list_tenants(s)]
    return TenantList(items=items, count=len(items))
