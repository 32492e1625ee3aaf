"""Settings (environment variables) and quality presets.

``Settings`` is built once in ``main.create_app`` (never at import). The presets follow COLMAP's
automatic reconstructor (``colmap/src/colmap/controllers/automatic_reconstruction.cc``:
low 1000 px / 2048 features, medium 1600 / 4096, high 2400 / 8192), with frame caps from the
deployment guide (``MAX_FRAMES_LOW/MEDIUM/HIGH`` = 30/50/100).
"""
from __future__ import annotations

import base64
import binascii
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .layout import DATABASE_FILE
from .presets import PRESET_SIFT, Preset, Quality, default_preset  # noqa: F401 - re-exported


class Settings(BaseSettings):
    """Service configuration, read from the environment (and ``.env`` if present).

    Names with units in them carry that unit (``_BYTES``, ``_SECONDS``/``_S``, ``_HOURS``).
    See ``.env.example`` for every setting with its default.
    """

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    port: int = Field(8080, description="HTTP port (PORT)")
    host: str = Field("0.0.0.0", description="bind address (HOST)")
    data_dir: Path = Field(Path("./data"), description="uploads, workspaces, artifacts, database")
    database_path: Path | None = Field(None, description="SQLite file; default "
                                       "DATA_DIR/colmap_app.db")
    database_url: str | None = Field(
        None, description="PostgreSQL URL (postgresql://user:pass@host:5432/db): the job store "
        "shared by several replicas; wins over DATABASE_PATH")
    colmap_cpu_only: bool = Field(False, description="force every stage onto the CPU")
    max_concurrent_jobs: int = Field(
        1, ge=0, description="jobs processed at once; 0: this replica serves the API only and "
        "runs no job (another replica, or a later start, runs them)")
    max_gpu_jobs: int = Field(4, ge=1, description="jobs in GPU stages at once")
    max_requests_per_minute: int = Field(
        20, ge=1, description="uploads per API key (else per client address) per minute")
    rate_limit_storage_uri: str = Field(
        "memory://", description="where the upload limiter counts (the limits library's "
        "storage URI): memory:// per process; redis://HOST:6379 shares the counts between "
        "replicas")
    forwarded_allow_ips: str = Field(
        "127.0.0.1", description="comma-separated addresses or networks of proxies whose "
        "X-Forwarded-For / X-Forwarded-Proto are trusted (uvicorn's proxy headers); * trusts any")
    api_keys: SecretStr = Field(
        SecretStr(""), description="comma-separated name:key pairs; empty: no authentication "
        "(a laptop). Each job belongs to the key that created it")
    admin_api_keys: SecretStr = Field(
        SecretStr(""), description="name:key pairs (same format) whose holders see and act on "
        "every job")
    docs_public: bool = Field(True, description="/docs and /openapi.json answer without a key")
    url_signing_secret: SecretStr = Field(
        SecretStr(""), description="HMAC secret of the signed links (artifacts); empty: a random "
        "secret per start, so links die on restart and differ between replicas")
    signed_url_ttl_s: int = Field(
        900, ge=1, le=7 * 24 * 3600, description="lifetime of a signed link (s)")
    max_pending_jobs_per_key: int = Field(
        20, ge=0, description="pending jobs one API key may have; beyond it uploads get 429 "
        "quota_exceeded; 0: no limit (also the case with authentication off)")
    max_frames_low: int = Field(30, ge=3)
    max_frames_medium: int = Field(50, ge=3)
    max_frames_high: int = Field(100, ge=3)
    max_upload_bytes: int = Field(2 * 1024**3, ge=1, description="largest accepted upload (bytes)")
    max_video_seconds: float = Field(600.0, gt=0, description="longest accepted video (s)")
    min_free_disk_bytes: int = Field(2 * 1024**3, ge=0,
                                     description="readiness fails below this free disk (bytes)")
    job_timeout_s: float = Field(3600.0, gt=0, description="wall-clock limit per job (s)")
    cors_origins: str = Field("*", description="comma-separated allowed origins, or *")
    cors_allow_credentials: bool = Field(
        False, description="CORS: let browsers send cookies/authorization; refused at start "
        "together with CORS_ORIGINS=* while API keys are set")
    child_nice: int = Field(10, ge=0, le=19, description="nice increment for pipeline children")
    storage_bucket: str = Field("", description="GCS bucket holding every job's input, stage "
                                "checkpoints and artifacts; empty: local disk only")
    gcs_project_id: str = Field("", description="GCS project (optional)")
    storage_emulator_host: str = Field(
        "", description="http://HOST:PORT of a GCS emulator (gcp-storage-emulator); empty: Google")
    artifact_url_ttl_s: int = Field(
        900, ge=1, le=7 * 24 * 3600, description="lifetime of an artifact's V4 signed URL (s; "
        "at most 7 days, the V4 limit)")
    log_level: str = Field("info")
    test_fault: str = Field(
        "",
        description="TEST ONLY: 'ACTION:STAGE' (abort|fail|sleep|pause) makes the pipeline child "
        "misbehave at that stage. Off unless set.",
    )
    upload_read_timeout_s: float = Field(
        60.0, gt=0, description="an upload whose body sends nothing for this long gets 408 (s)")
    shutdown_grace_s: float = Field(
        20.0, ge=0, description="on SIGTERM, seconds running stages get to finish before they "
        "are stopped (left resumable)")
    retention_hours: float = Field(
        168.0, ge=0, description="files of finished jobs are deleted this many hours after they "
        "finish (row kept as 'expired'); 0 keeps them forever")
    housekeeping_interval_s: float = Field(
        3600.0, gt=0, description="seconds between retention / orphan sweeps")
    max_manual_retries: int = Field(
        10, ge=0, description="times a client may retry one job (POST /jobs/{id}/retry); "
        "beyond it the retry answers 409 retry_limit_reached")
    queue_heartbeat_interval_s: float = Field(
        5.0, gt=0, description="PostgreSQL mode: seconds between a replica's queue-worker "
        "heartbeats (also its fetch and abort polling fallback)")
    queue_stall_timeout_s: float = Field(
        30.0, gt=0, description="PostgreSQL mode: a replica whose heartbeat is older than this "
        "(s) is dead; its jobs are requeued (retried once per run)")
    queue_sweep_interval_s: int = Field(
        5, ge=1, le=59, description="PostgreSQL mode: seconds between stall sweeps (a "
        "procrastinate periodic task, seconds field of a cron line)")
    pipeline_random_seed: int = Field(
        -1, ge=-1, description="-1: random RANSAC/mapper seeds on all cores; >= 0: that seed "
        "and one thread for matching and mapping, so runs are repeatable (tests, benchmarks)")

    # --- webhooks and metrics (issue 16) ---
    webhook_url: str = Field(
        "", description="default target of every job's webhook (job.completed, job.failed, "
        "job.cancelled) when the upload names none in its webhook_url field; empty: only jobs "
        "that name one")
    webhook_secret: SecretStr = Field(
        SecretStr(""), description="Standard Webhooks signing secret: whsec_ followed by the "
        "base64 of 24-64 random bytes; empty: webhooks are off (uploads naming one get 422)")
    webhook_allow_private: bool = Field(
        False, description="let webhooks go to loopback, private, link-local and other "
        "non-public addresses (tests, a receiver on the same network); off: refused (SSRF)")
    webhook_retry_schedule_s: str = Field(
        "10,60,180,420,900,1500,2400", description="comma-separated upper bounds (s) of the "
        "waits before each retry of a webhook (full jitter: a wait is drawn between 10 % and "
        "100 % of its bound); one try plus one retry per entry")
    webhook_timeout_s: float = Field(10.0, gt=0, le=60, description="time limit of one webhook "
                                     "try (connect, send, answer; s)")
    public_base_url: str = Field(
        "", description="this service's public address (https://colmap.example.com): webhook "
        "bodies then carry absolute artifact URLs; empty: paths like GET /jobs/{id} gives")
    metrics_public: bool = Field(
        False, description="GET /metrics answers without an API key while API_KEYS is set")

    @model_validator(mode="after")
    def _default_db(self) -> Settings:
        if self.database_path is None:
            self.database_path = self.data_dir / DATABASE_FILE
        return self

    def preset(self, quality: str) -> Preset:
        """The :class:`Preset` for ``quality``; raises ``KeyError`` for an unknown name."""
        size, feats = PRESET_SIFT[quality]
        cap = {"low": self.max_frames_low, "medium": self.max_frames_medium,
               "high": self.max_frames_high}[quality]
        return Preset(quality, cap, size, feats)

    @property
    def cors_origin_list(self) -> list[str]:
        """``CORS_ORIGINS`` split on commas."""
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @model_validator(mode="after")
    def _webhook_settings(self) -> Settings:
        """Refuse a malformed ``WEBHOOK_SECRET`` or ``WEBHOOK_RETRY_SCHEDULE_S``, and a global
        ``WEBHOOK_URL`` without a secret (the rule is named, never the value)."""
        secret = self.webhook_secret.get_secret_value()
        if secret:
            body = secret.removeprefix("whsec_")
            try:
                raw = base64.b64decode(body, validate=True)
            except (ValueError, binascii.Error):
                raw = b""
            if not secret.startswith("whsec_") or not 24 <= len(raw) <= 64:
                raise ValueError("WEBHOOK_SECRET must be whsec_ followed by the base64 of 24-64 "
                                 "bytes (python -c \"import base64,secrets; print('whsec_' + "
                                 "base64.b64encode(secrets.token_bytes(32)).decode())\")")
        elif self.webhook_url:
            raise ValueError("WEBHOOK_URL needs WEBHOOK_SECRET (deliveries are signed)")
        _ = self.webhook_retry_delays_s
        return self

    @property
    def webhook_retry_delays_s(self) -> tuple[float, ...]:
        """``WEBHOOK_RETRY_SCHEDULE_S`` as numbers (s): the bound of each retry's wait.

        Raises: ValueError when an entry is not a number >= 0 (or the list is empty).
        """
        try:
            delays = tuple(float(d) for d in self.webhook_retry_schedule_s.split(",") if d.strip())
        except ValueError:
            delays = ()
        if not delays or any(not 0 <= d <= 86400 for d in delays):
            raise ValueError("WEBHOOK_RETRY_SCHEDULE_S must be comma-separated seconds "
                             "(0-86400 each), e.g. 10,60,180")
        return delays
