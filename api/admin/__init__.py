"""The admin dashboard (``/admin``): server-rendered pages behind the admin token.

Pages (HTML; 401 with the login form in their place without the token):
``/admin`` overview, ``/admin/tasks`` (filter by tenant/status/method, sort, 100 per page),
``/admin/tasks/{id}`` (curve, confusion matrix, failure reason, versions, actions),
``/admin/tasks/{id}/delete`` (confirmation), ``/admin/tenants`` (create shows the key once),
``/admin/login``. Forms (POST, CSRF token): ``/admin/tasks/{id}/cancel|retry|delete``,
``/admin/tenants``, ``/admin/logout``. JSON (401 without the token): ``/admin/api/overview``,
``/admin/api/tasks?ids=a,b``. Static: ``/admin/static/admin.css|admin.js``.

Auth: ``api.admin.auth``; queries: ``store.overview``; numbers of the serving side:
``api.admin.panels``; pictures: ``api.admin.charts``; its benchmark, ``promptstore bench
dashboard``, is ``api.bench.dashboard``.
"""

from api.admin.deps import install_admin_errors
from api.admin.views import router

__all__ = ["install_admin_errors", "router"]
