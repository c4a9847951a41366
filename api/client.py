"""A small typed HTTP client for the Promptstore API (docs/api.md): one method per route.

Every answer the server refuses is raised as one ``PromptstoreError`` carrying the HTTP status
and the server's ``detail``; a server that cannot be reached is ``ServerUnreachable``. Used by
the tenant-side command line (``api.cli_tenant``) and usable on its own::

    with PromptstoreClient("http://127.0.0.1:8000", api_key=KEY) as ps:
        task = ps.create_task("colours", "coop", dataset=zip_bytes, config={"epochs": 5})
        task = ps.get_task(task["id"])
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
#: Items asked per page when a list is read whole (the server's maximum).
PAGE_SIZE = 1000

Json = dict[str, Any]


class PromptstoreError(Exception):
    """The server answered with an error: ``status`` and its ``detail`` (docs/api.md#errors)."""

    def __init__(self, status: int, detail: str, retry_after: str | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class ServerUnreachable(Exception):
    """No HTTP answer at all from ``url`` (refused, timed out, bad address)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class PromptFile:
    """A downloaded prompt: the safetensors bytes, its version and the server's file name."""

    data: bytes
    version: int | None
    filename: str | None
    sha256: str | None


def run_state(task: Json) -> tuple[str, float, str | None]:
    """``(status, progress, error)`` of the task's current run: ``training`` for a retrain of a
    task that serves a version (it stays ``ready`` meanwhile), else the task's own fields."""
    training = task.get("training")
    if task.get("version") is not None and training:
        return str(training.get("status")), float(training.get("progress") or 0.0), training.get("error")
    return str(task.get("status")), float(task.get("progress") or 0.0), task.get("error")


class PromptstoreClient:
    """One method per route. ``api_key`` for tenant calls, ``admin_token`` for admin calls."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        admin_token: str | None = None,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.admin_token = admin_token
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport)

    def __enter__(self) -> PromptstoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, *, admin: bool = False, **kw: Any) -> httpx.Response:
        token = self.admin_token if admin else self.api_key
        headers = dict(kw.pop("headers", None) or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            r = self._http.request(method, path, headers=headers, **kw)
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            raise ServerUnreachable(self.url, str(exc) or type(exc).__name__) from None
        if r.status_code >= 400:
            raise PromptstoreError(r.status_code, _detail(r), r.headers.get("Retry-After"))
        return r

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self._request(method, path, **kw)
        try:
            return r.json()
        except ValueError:
            raise PromptstoreError(r.status_code, f"the server answered {path} with something that is not JSON") from None

    # ------------------------------------------------------------------ operations

    def health(self) -> Json:
        return self._json("GET", "/healthz")

    # ------------------------------------------------------------------ tenants (admin)

    def create_tenant(self, name: str) -> Json:
        return self._json("POST", "/v1/admin/tenants", admin=True, json={"name": name})

    def list_tenants(self, *, name_prefix: str | None = None, page_size: int = PAGE_SIZE) -> list[Json]:
        """Every tenant (oldest first), following the pages' ``next_cursor``."""
        return self._all_pages("/v1/admin/tenants", {"name_prefix": name_prefix}, page_size, admin=True)

    # ------------------------------------------------------------------ tasks (tenant)

    def create_task(
        self,
        name: str,
        method: str,
        *,
        dataset: bytes | None = None,
        classes: Sequence[str] | None = None,
        config: Json | None = None,
        dataset_filename: str = "dataset.zip",
    ) -> Json:
        data: dict[str, str] = {"name": name, "method": method}
        if classes is not None:
            data["classes"] = json.dumps(list(classes))
        if config is not None:
            data["config"] = json.dumps(config)
        files = {"dataset": (dataset_filename, dataset, "application/zip")} if dataset is not None else None
        return self._multipart("POST", "/v1/tasks", data, files)

    def list_tasks(
        self,
        *,
        status: str | None = None,
        method: str | None = None,
        name_prefix: str | None = None,
        page_size: int = PAGE_SIZE,
    ) -> list[Json]:
        """Every task of the tenant (newest first) matching the filters, following the pages'
        ``next_cursor``; each a summary (``get_task`` has the rest)."""
        params = {"status": status, "method": method, "name_prefix": name_prefix}
        return self._all_pages("/v1/tasks", params, page_size)

    def get_task(self, task_id: str, *, include: Sequence[str] = ()) -> Json:
        """The task; ``include``: heavy fields to add (``history``, ``confusion``, ``per_class``)."""
        params = {"include": ",".join(include)} if include else None
        return self._json("GET", f"/v1/tasks/{_seg(task_id)}", params=params)

    def retrain_task(
        self, task_id: str, *, dataset: bytes | None = None, config: Json | None = None,
        dataset_filename: str = "dataset.zip",
    ) -> Json:  # fmt: skip
        data = {"config": json.dumps(config)} if config is not None else {}
        files = {"dataset": (dataset_filename, dataset, "application/zip")} if dataset is not None else None
        return self._multipart("POST", f"/v1/tasks/{_seg(task_id)}/retrain", data, files)

    def cancel_task(self, task_id: str) -> Json:
        return self._json("POST", f"/v1/tasks/{_seg(task_id)}/cancel")

    def delete_task(self, task_id: str) -> None:
        self._request("DELETE", f"/v1/tasks/{_seg(task_id)}")

    def list_versions(self, task_id: str) -> Json:
        """``{"items", "count", "served_version", "max_versions"}``: the kept versions, newest first."""
        return self._json("GET", f"/v1/tasks/{_seg(task_id)}/versions")

    def serve_version(self, task_id: str, version: int) -> Json:
        """Serve ``version`` from now on (a rollback or a roll-forward); returns the task."""
        return self._json("POST", f"/v1/tasks/{_seg(task_id)}/versions/{int(version)}/serve")

    def evaluate(
        self, task_id: str, dataset: bytes, *, version: int | None = None, top_k: int | None = None,
        precision: float | None = None, dataset_filename: str = "heldout.zip",
    ) -> Json:  # fmt: skip
        """Queue an evaluation of ``version`` (default: the served one) on a labelled zip."""
        fields = {"version": version, "top_k": top_k, "precision": precision}
        data = {k: str(v) for k, v in fields.items() if v is not None}
        files = {"dataset": (dataset_filename, dataset, "application/zip")}
        return self._multipart("POST", f"/v1/tasks/{_seg(task_id)}/evaluate", data, files)

    def get_evaluation(self, task_id: str, evaluation_id: str) -> Json:
        return self._json("GET", f"/v1/tasks/{_seg(task_id)}/evaluations/{_seg(evaluation_id)}")

    def events(self, task_id: str, *, after: int = 0) -> Json:
        """``{"items", "next_after"}``: the task's events after ``after``, oldest first."""
        return self._json("GET", f"/v1/tasks/{_seg(task_id)}/events", params={"after": after})

    def follow_events(self, task_id: str, *, after: int = 0) -> Iterator[Json]:
        """The task's events as they happen (Server-Sent Events), until it has no run or
        evaluation in progress and nothing new arrives (``until_idle``), or it is deleted."""
        params = {"after": after, "until_idle": "true"}
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            with self._http.stream("GET", f"/v1/tasks/{_seg(task_id)}/events", params=params, headers=headers,
                                   timeout=httpx.Timeout(self._http.timeout.connect, read=None)) as r:  # fmt: skip
                if r.status_code >= 400:
                    r.read()
                    raise PromptstoreError(r.status_code, _detail(r), r.headers.get("Retry-After"))
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        try:
                            yield json.loads(line[6:])
                        except ValueError:
                            continue
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            raise ServerUnreachable(self.url, str(exc) or type(exc).__name__) from None

    def download_prompt(self, task_id: str, *, version: int | None = None) -> PromptFile:
        params = {"version": int(version)} if version is not None else None
        r = self._request("GET", f"/v1/tasks/{_seg(task_id)}/prompt", params=params)
        version = r.headers.get("X-Prompt-Version")
        match = re.search(r'filename="?([^";]+)"?', r.headers.get("Content-Disposition", ""))
        return PromptFile(
            data=r.content,
            version=int(version) if version and version.isdigit() else None,
            filename=match.group(1) if match else None,
            sha256=(r.headers.get("ETag") or "").strip('"') or None,
        )

    # ------------------------------------------------------------------ classify (tenant)

    def classify(
        self, task_id: str, images: Sequence[tuple[str, bytes]], *, top_k: int | None = None,
        min_score: float | None = None,
    ) -> Json:  # fmt: skip
        """``images``: ``(filename, bytes)`` pairs, sent as multipart ``images`` parts."""
        query = {"top_k": top_k, "min_score": min_score}
        params = {k: v for k, v in query.items() if v is not None} or None
        files = [("images", (name, data, "application/octet-stream")) for name, data in images]
        return self._json("POST", f"/v1/tasks/{_seg(task_id)}/classify", params=params, files=files)

    def _all_pages(self, path: str, params: dict[str, Any], page_size: int, *, admin: bool = False) -> list[Json]:
        """The items of every page of a list, following ``next_cursor`` until it is null."""
        query = {k: v for k, v in params.items() if v is not None}
        query["limit"] = page_size
        items: list[Json] = []
        while True:
            page = self._json("GET", path, params=query, admin=admin)
            items.extend(page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                return items
            query["cursor"] = cursor

    def _multipart(self, method: str, path: str, data: dict[str, str], files: Any) -> Json:
        # With files the body is multipart; form fields alone go urlencoded (the routes read both).
        return self._json(method, path, data=data or None, files=files)

def _seg(task_id: str) -> str:
    from urllib.parse import quote

    return quote(task_id.strip(), safe="")


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):  # FastAPI's own validation errors: [{"loc": [...], "msg": ...}]
            parts = []
            for e in detail:
                if isinstance(e, dict):
                    loc = ".".join(str(x) for x in e.get("loc", []) if x not in ("body", "query", "path"))
                    parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
            if parts:
                return "; ".join(parts)
        return json.dumps(detail)
    text = r.text.strip().splitlines()[0] if r.text.strip() else ""
    return text[:300] or f"HTTP {r.status_code} {r.reason_phrase}"
