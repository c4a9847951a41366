"""The admin dashboard (``/admin``): server-rendered pages behind the admin token.

Pages (HTML; 401 with the login form in their place without the token):
``/admin`` overview, ``/admin/tasks`` (filter by tenant/status/method, sort, 100 per page),
``/admin/tasks/{id}`` (curve, confusion matrix with right and wrong cells shaded apart,
per-class numbers, failure reason, versions with the serve action, evaluations with their
per-class table, reliability diagram and confusion matrix, the task's events, actions),
``/admin/tasks/{id}/delete`` and ``/admin/tasks/{id}/versions/{n}/serve`` (confirmations),
``/admin/tenants`` (create shows the key once), ``/admin/login``. Forms (POST, CSRF token):
``/admin/tasks/{id}/cancel|retry|delete``, ``/admin/tasks/{id}/versions/{n}/serve``,
``/admin/tenants``, ``/admin/logout``. JSON (401 without the token): ``/admin/api/overview``,
``/admin/api/tasks?ids=a,b``. Server-Sent Events (401 without the token):
``/admin/tasks/{id}/events`` (the task page's live progress and events, ``api.admin.feed``).
Static: ``/admin/static/admin.css|admin.js``.

Auth: ``api.admin.auth``; queries: ``store.overview``, ``store.evaluations``; numbers of the
serving side: ``api.admin.panels``; pictures: ``api.admin.charts``; the live feed:
``api.admin.feed``; its benchmark, ``promptstore bench dashboard``, is ``api.bench.dashboard``.
"""

from api.admin.deps import install_admin_errors
from api.admin.views import router

__all__ = ["install_admin_errors", "router"]
