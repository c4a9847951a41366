"""Service settings: one pydantic-settings class read from ``PROMPTSTORE_*`` variables.

Every field is documented next to its default here and in docs/settings.md.
One way to get them: a process reads its environment once, through ``get_settings()``
(the app factory ``api.app.create_app`` when given none, the worker, the Celery app);
inside the API a handler gets them from the injected service state
(``state: ServiceState = Depends(api.deps.get_state)``, ``state.settings``: the
settings the app was built with, so a test builds an app from its own ``Settings``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, computed_field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
GiB = 1024 * MiB

#: Admin tokens that are obviously placeholders; refused outside embedded/local runs.
PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "change_me", "changethis", "admin", "secret", "password", "token", "test"}
)


class Settings(BaseSettings):
    """Everything the service reads from the environment (prefix ``PROMPTSTORE_``)."""

    model_config = SettingsConfigDict(env_prefix="PROMPTSTORE_", extra="ignore", frozen=True)

    database_url: str = Field(
        "sqlite:///./var/promptstore.db",
        description="SQLAlchemy URL; e.g. postgresql+psycopg://user:pw@db/promptstore.",
    )
    object_store_url: str = Field(
        "file://./var/objects",
        description="file://PATH (relative to cwd) or s3://bucket?endpoint=http://host:port[&region=R].",
    )
    broker_url: str | None = Field(None, description="Celery broker (redis://...); unset: jobs run in-process.")
    redis_url: str | None = Field(None, description="Redis for rate limits / cache invalidation; optional.")
    broker_visibility_timeout: float = Field(
        12 * 3600,
        gt=0,
        description="Seconds after which the Redis broker re-delivers a tuning job whose worker has not "
        "acknowledged it (a worker killed mid-job); must exceed the longest tuning run.",
    )
    backbone: str = Field("auto", description="Backbone spec LIBRARY:ARCH:WEIGHTS or 'auto'.")
    device: str | None = Field(None, description="torch device; unset: cuda if available else cpu.")
    admin_token: str | None = Field(None, description="Admin bearer token; unset: generated at first start.")
    max_upload_bytes: int = Field(200 * MiB, gt=0, description="Largest accepted request body / dataset zip.")
    object_store_access_key: str | None = Field(
        None, description="Access key of the object store (its backend reads it); default: s3_access_key.",
    )
    object_store_secret_key: str | None = Field(
        None, description="Secret key of the object store (its backend reads it); default: s3_secret_key.",
    )
    s3_access_key: str | None = Field(None, description="Synonym of object_store_access_key (kept, documented).")
    s3_secret_key: str | None = Field(None, description="Synonym of object_store_secret_key (kept, documented).")
    max_archive_entries: int = Field(10_000, gt=0, description="Most entries a dataset zip may hold.")
    max_expansion_ratio: float = Field(100.0, gt=0, description="Largest uncompressed/compressed ratio.")
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="Largest width*height of one image.")
    max_uncompressed_bytes: int = Field(1 * GiB, gt=0, description="Largest total uncompressed dataset size.")
    max_classify_images: int = Field(64, gt=0, description="Most images in one classify request.")
    prompt_cache_bytes: int = Field(1 * GiB, ge=0, description="Device bytes of resident prompts kept cached.")
    max_versions_per_task: int = Field(
        20, ge=0, description="Prompt versions kept per task: older ones beyond this many are pruned at each "
        "publish (never the served one; 0 keeps all). A version is a few kilobytes to a few megabytes.",
    )
    max_batch: int = Field(32, gt=0, description="Largest batch (images) the inference engine forms.")
    max_wait_ms: float = Field(
        5, ge=0, description="How long the engine waits, from a batch's oldest request, to fill it."
    )
    queue_size: int = Field(
        1024, gt=0, description="Images the inference queue holds; a request past it gets 503 with Retry-After."
    )
    classify_rate: float = Field(
        1000.0, ge=0, description="Classify requests per second one tenant may keep up (429 past it); 0: no limit."
    )
    classify_burst: int = Field(1000, ge=0, description="Classify requests one tenant may send at once, over the rate.")
    jobs_per_minute: float = Field(
        60.0, ge=0, description="Tuning jobs (task creations and retrains) per minute per tenant; 0: no limit."
    )
    jobs_burst: int = Field(60, ge=0, description="Tuning jobs one tenant may submit at once, over the rate.")
    admin_auth_failures_per_minute: float = Field(
        10.0, ge=0,
        description="Failed admin-token attempts per minute per client address; past the burst, every admin "
        "authentication from that address gets 429 until the bucket refills. 0: no limit.",
    )
    admin_auth_failure_burst: int = Field(10, ge=0, description="Failed admin-token attempts allowed at once.")
    gc_interval: float = Field(
        3600.0, ge=0,
        description="Seconds between the object garbage collector's passes in `serve` and `worker` (it deletes "
        "objects no row refers to once they are older than gc_grace); 0 turns the periodic pass off "
        "(then run `promptstore fsck --gc` from a schedule).",
    )
    gc_grace: float = Field(
        24 * 3600.0, ge=0,
        description="Seconds an object with no row referring to it is kept before the garbage collector may "
        "delete it: must exceed the longest time between a write of an object and the commit of its row "
        "(an upload request, a publish).",
    )
    http_max_header_bytes: int = Field(
        16 * 1024, gt=0,
        description="Largest request line plus headers uvicorn's HTTP parser (h11) buffers; past it the HTTP layer "
        "answers 400 text/plain 'Invalid HTTP request received.' and closes (docs/operations.md).",
    )
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    job_threads: int = Field(1, gt=0, description="In-process tuning threads when no broker is configured.")
    run_lease_s: float = Field(
        30.0, gt=0,
        description="Seconds a running tuning job's lease lasts; the job renews it (heartbeat) every quarter of "
        "this. A run whose lease expired has no live worker: the reconciler re-queues or fails it.",
    )
    reconcile_interval_s: float = Field(
        10.0, gt=0,
        description="Seconds between two passes of the run reconciler (in `promptstore worker`, and in "
        "`promptstore serve` when jobs run in-process).",
    )
    requeue_queued_after_s: float = Field(
        300.0, gt=0,
        description="A run still queued (not claimed by any job) this many seconds after it was sent is sent "
        "again (its message may have been lost); duplicates are harmless.",
    )
    run_max_requeues: int = Field(
        2, ge=0,
        description="Times the reconciler re-queues a run whose worker stopped responding before it fails the "
        "run with a reason instead.",
    )
    # Timeouts (docs/operations.md "Timeouts and retries"): past them a request gets 503 naming the part.
    db_connect_timeout: float = Field(
        3.0, gt=0, description="Seconds to open a database connection, or to wait for a free pooled one "
        "(Postgres' connect_timeout counts whole seconds, at least 2).",
    )
    db_timeout: float = Field(
        5.0, gt=0, description="Seconds one database statement may take: Postgres cancels it (statement_timeout, "
        "lock_timeout) and the client gives up 1 s later on a server that does not answer at all.",
    )
    s3_connect_timeout: float = Field(2.0, gt=0, description="Seconds to connect to the S3 endpoint.")
    s3_read_timeout: float = Field(5.0, gt=0, description="Seconds the S3 endpoint may stay silent during a call.")
    s3_retries: int = Field(2, ge=0, description="Retries of an S3 call after a connection error, timeout or 5xx.")
    s3_deadline: float = Field(
        8.0, gt=0, description="Seconds one object-store call may take in all, retries included.",
    )
    redis_timeout: float = Field(
        0.5, gt=0, description="Connect and read timeout (s) of the API's Redis (rate limits, cache invalidation).",
    )
    broker_timeout: float = Field(2.0, gt=0, description="Connect and read timeout (s) of one broker call.")
    broker_deadline: float = Field(
        5.0, gt=0, description="Seconds enqueueing one job may take in all, retries included.",
    )
    readyz_timeout: float = Field(
        2.0, gt=0, description="Seconds each /readyz check may take; keep it below the probe's timeout.",
    )
    idempotency_key_ttl: float = Field(
        24 * 3600, gt=0, description="Seconds an Idempotency-Key is remembered (same key: the first answer).",
    )
    # Samples and feedback (docs/api.md "Samples", store.samples).
    prediction_retention_s: float = Field(
        7 * 24 * 3600.0, gt=0,
        description="Seconds an image classified with keep=true is kept so that a feedback can turn it into a "
        "sample; then it is deleted (by the garbage collector's pass). Without keep nothing is stored.",
    )
    prediction_record_s: float = Field(
        30 * 24 * 3600.0, ge=0,
        description="Seconds a kept prediction's record (id, task, times; not its image) outlives its expiry, so "
        "that a late feedback is told it expired rather than that it is unknown.",
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def is_embedded_db(self) -> bool:
        """True when the database is the embedded SQLite file (local runs)."""
        return self.database_url.startswith("sqlite")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def is_local_objects(self) -> bool:
        """True when objects live in local files (file://)."""
        return self.object_store_url.startswith("file://")

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> "Settings":
        if self.admin_token is not None and not self.is_embedded_db:
            if self.admin_token.strip().lower() in PLACEHOLDER_SECRETS:
                raise ValueError(
                    f"PROMPTSTORE_ADMIN_TOKEN is the placeholder {self.admin_token!r}; set a real secret "
                    "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`) or leave it unset "
                    "to have one generated. Placeholders are only accepted with the embedded SQLite database."
                )
        from store.objects import known_schemes, scheme_of, supported_urls

        if scheme_of(self.object_store_url) not in known_schemes():
            raise ValueError(
                f"PROMPTSTORE_OBJECT_STORE_URL {self.object_store_url!r} is not supported; use {supported_urls()}"
            )
        return self

    def object_store_credentials(self) -> tuple[str | None, str | None]:
        """(access key, secret key) of the object store: ``object_store_access_key`` and
        ``object_store_secret_key``, each falling back to its ``s3_*`` synonym."""
        return (
            self.object_store_access_key if self.object_store_access_key is not None else self.s3_access_key,
            self.object_store_secret_key if self.object_store_secret_key is not None else self.s3_secret_key,
        )


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once (cached; tests that change
    the environment call ``get_settings.cache_clear()``)."""
    return Settings()
