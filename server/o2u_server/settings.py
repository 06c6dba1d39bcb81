"""Service settings: one pydantic-settings class, read from `O2U_*` environment variables and an
optional config file (`O2U_CONFIG_FILE`, YAML, JSON or TOML). Algorithm hyperparameters are not
here: they travel with each job (o2u_engine.O2UConfig)."""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

GIB = 1024**3
MIB = 1024**2


# O2U_ variables that name no server setting but may stand beside the server's: the config file's
# name, and the CLI's target and token (one shell may run both).
OTHER_VARIABLES = frozenset({"O2U_CONFIG_FILE", "O2U_TARGET", "O2U_TOKEN_FILE"})
# What Kubernetes' service links (and Docker's container links) set for a Service named `o2u` or
# `o2u-*` in the pod's namespace: O2U_SERVICE_HOST, O2U_METRICS_SERVICE_PORT_METRICS,
# O2U_PORT_50051_TCP_ADDR... The chart turns the links off; other manifests may not.
_LINK_VARIABLE = re.compile(
    r"O2U_(?:[A-Z0-9_]+_)?(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?|PORT(?:_\d+_(?:TCP|UDP|SCTP)(?:_[A-Z]+)?)?)"
)

# Class names and sample keys are at most this long (characters); datasets with longer ones are refused.
MAX_CLASS_NAME_CHARS = 256


def summary_bytes(num_classes: int) -> int:
    """An upper bound on the encoded size of a dataset summary with `num_classes` classes: the
    K x K transition matrix (8 bytes each), a class entry and a name per class, and the rest."""
    return 8 * num_classes * num_classes + num_classes * (2 * 4 * MAX_CLASS_NAME_CHARS + 64) + 16 * 1024


class Settings(BaseSettings):
    """Everything an operator can set. Every field is documented in docs/operations.md."""

    model_config = SettingsConfigDict(env_prefix="O2U_", extra="forbid", frozen=True)

    listen_address: str = "0.0.0.0:50051"
    """gRPC listen address, host:port (port 0 picks a free port)."""
    metrics_address: str = "0.0.0.0"
    """Address the Prometheus /metrics HTTP server binds to."""
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    """Port of the Prometheus /metrics HTTP server (0 picks a free port)."""
    data_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """Folders that `file://` dataset URIs may point into; nothing outside is read."""
    s3_endpoint: str | None = None
    """host:port of the S3-compatible object store (MinIO); requests cannot override it."""
    s3_access_key: SecretStr | None = None
    """Object store access key."""
    s3_secret_key: SecretStr | None = None
    """Object store secret key."""
    s3_secure: bool = True
    """Use HTTPS to reach the object store."""
    s3_region: str | None = None
    """Object store region, if it needs one."""
    s3_allowed_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Buckets jobs may read datasets from; empty allows every bucket the credentials reach."""
    state_dir: Path = Path(".o2u")
    """Folder of the SQLite job store (jobs.sqlite3) and of local training checkpoints; must be
    durable storage unless both live elsewhere (database_url and an s3:// checkpoint_uri)."""
    database_url: SecretStr | None = None
    """The job store: `postgresql://user@host:5432/db` for several replicas sharing one queue, or
    `sqlite:///path`; default SQLite in state_dir. Never logged with its password."""
    database_password_file: Path | None = None
    """File holding the database password (a mounted Secret), used instead of one in database_url."""
    checkpoint_uri: str | None = None
    """Where training checkpoints live: `s3://bucket/prefix` (in the object store; every replica can
    resume a job) or a local folder; default state_dir/checkpoints."""
    lease_seconds: float = Field(default=30.0, ge=0.5)
    """A running job's lease, in seconds: renewed every third of it; a replica that has not renewed it
    for this long (crashed, paused, cut off) loses the job to another replica, which resumes it.
    Database outages shorter than this are retried."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Torch device for training: `auto` uses CUDA when available."""
    gpus_per_job: int | None = Field(default=None, ge=1)
    """Workers that train one job together (torch.distributed, data-parallel): GPUs on a GPU server
    (default all visible ones), worker processes on the CPU (default 1; more runs gloo workers)."""
    max_concurrent_jobs: int | None = Field(default=None, ge=1)
    """Jobs trained at once; default one per group of gpus_per_job visible GPUs, or 1 on a CPU."""
    training_isolation: Literal["thread", "process"] = "thread"
    """Where a one-worker job trains: `thread`, in the worker slot's thread of the server process, or
    `process`, in a long-lived training process per worker slot, started with the server: training
    then never waits for the interpreter lock the RPCs hold, and a crash in training (a device
    fault, the kernel's OOM killer) ends only that attempt, which resumes from its checkpoint. Each
    job's samples are then decoded into shared memory (/dev/shm), where the training process reads
    them. Data-parallel jobs (gpus_per_job > 1) always train in worker processes."""
    cpu_threads: int | None = Field(default=None, ge=1)
    """Torch threads for training on the CPU; default one per CPU this process may use (affinity and
    cgroup quota). On a host whose cores are busy with other work, 1 is often several times faster."""
    max_queued_jobs: int = Field(default=100, ge=1)
    """Queued jobs beyond which CreateScoringJob answers RESOURCE_EXHAUSTED."""
    max_watch_streams: int = Field(default=256, ge=1)
    """Concurrent WatchScoringJob streams beyond which new ones get RESOURCE_EXHAUSTED."""
    max_dataset_bytes: int = Field(default=8 * GIB, ge=1)
    """Largest dataset (sum of object sizes) a job may read, in bytes."""
    max_samples: int = Field(default=5_000_000, ge=1)
    """Largest number of samples in one dataset."""
    max_epochs_per_job: int = Field(default=20_000, ge=1)
    """Most training epochs one job may run over all its stages (pretraining, cyclic, and both models
    of clean retraining): explicit epochs are refused at submission (RESOURCE_EXHAUSTED,
    TOO_MANY_EPOCHS), the defaults chosen for the data once it is read (the job fails so). Bounds
    how long one caller can hold a worker."""
    max_classes: int = Field(default=1000, ge=2)
    """Largest number of classes in one dataset (K; integer labels mean K = the largest label + 1),
    checked before any per-class list or K x K matrix is built. A summary carries K x K numbers,
    so max_message_bytes must hold about 8 K^2 bytes (checked at start)."""
    max_decoded_bytes: int = Field(default=8 * GIB, ge=1)
    """Largest in-memory size of a dataset once decoded (inflated .npz arrays, decoded images, and
    stage 2's per-class votes and probabilities of 10 x N x K bytes), in bytes; checked from the headers
    before anything is inflated or decoded."""
    max_image_pixels: int = Field(default=16_777_216, ge=1)
    """Largest width x height of one image, checked before decoding (decompression bombs)."""
    default_page_size: int = Field(default=100, ge=1)
    """Page size used when a list request leaves page_size at 0."""
    max_page_size: int = Field(default=1000, ge=1)
    """Larger page_size values are capped to this (AIP-158)."""
    max_message_bytes: int = Field(default=16 * MIB, ge=1024)
    """Largest gRPC message received or sent, in bytes."""
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    """On SIGTERM: time allowed for in-flight RPCs and the running job's checkpoint, in seconds."""
    checkpoint_interval_seconds: float = Field(default=10.0, ge=0)
    """Least time between two training checkpoints, in seconds (0 = every epoch); a stage's end and a
    requested stop always checkpoint. A crash repeats at most this much training."""
    max_job_attempts: int = Field(default=3, ge=1)
    """A job is marked FAILED instead of resumed once the server running it crashed (or, with
    replicas, stopped renewing its lease; or one of its data-parallel workers or its training
    process died) this many times in a row without the job getting further in training than
    before (a crash after which the job trained past its earlier furthest epoch does not count)."""
    export_uris: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Where ExportNoiseScores may write: `file:///folder` or `s3://bucket/prefix` locations; empty
    disables exports. Existing files and objects are never replaced."""
    min_free_state_bytes: int = Field(default=256 * MIB, ge=0)
    """Free space the state volume must keep (state_dir, the SQLite store's folder and the local
    checkpoint folder, whichever is fullest): below it CreateScoringJob answers RESOURCE_EXHAUSTED
    and this server claims no queued job, until space is freed; in bytes."""
    webhook_allowed_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Where completion webhooks may go: URL prefixes (`https://hooks.example.com/o2u/`), host names
    (`hooks.example.com`: port 443 only) or host:port (`hooks.example.com:8443`); empty disables
    webhooks. Needs webhook_secret_file."""
    webhook_secret_file: Path | None = None
    """File holding the secret that signs webhook events (HMAC-SHA256; a mounted Secret)."""
    webhook_allow_http_loopback: bool = False
    """Also allow plain http:// webhooks to loopback addresses (tests and local development only)."""
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    """How long one webhook delivery attempt waits for the receiver's answer, in seconds."""
    webhook_max_attempts: int = Field(default=10, ge=1)
    """Delivery attempts per webhook event before it is given up."""
    webhook_retry_seconds: float = Field(default=5.0, ge=0)
    """Wait before the first retry of a webhook, in seconds; it doubles with each further attempt
    (at most an hour)."""
    tls_cert_file: Path | None = None
    """PEM server certificate; with tls_key_file enables TLS."""
    tls_key_file: Path | None = None
    """PEM private key of the server certificate."""
    tls_client_ca_file: Path | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""
    auth_token_file: Path | None = None
    """File holding the bearer token callers must send (`authorization: Bearer <token>`)."""
    tokens_file: Path | None = None
    """File of `principal: token` lines, one tenant each (docs/security.md); the caller's token names
    its principal, which owns the jobs it creates."""
    admin_principals: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Principals (comma-separated) that see and manage every principal's jobs."""
    max_jobs_per_principal: int = Field(default=0, ge=0)
    """Most QUEUED plus RUNNING jobs one principal may have (all replicas together); 0: no limit."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the server's JSON logs."""

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            scheme = value.get_secret_value().split(":", 1)[0]
            if scheme not in ("sqlite", "postgresql", "postgresql+psycopg", "postgres"):
                raise ValueError(f"database_url must start with postgresql:// or sqlite:///, not {scheme}://")
        return value

    @field_validator(
        "data_roots",
        "s3_allowed_buckets",
        "export_uris",
        "webhook_allowed_urls",
        "admin_principals",
        mode="before",
    )
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        # Environment variables carry lists as comma-separated strings (JSON lists work too).
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    @field_validator("export_uris")
    @classmethod
    def _check_export_uris(cls, value: list[str]) -> list[str]:
        for uri in value:
            scheme, separator, rest = uri.partition("://")
            if scheme not in ("file", "s3") or not separator or not rest.strip("/"):
                raise ValueError(f"export_uris: {uri!r} is not a file:///folder or s3://bucket[/prefix] URI")
            if scheme == "file" and not rest.startswith("/"):
                raise ValueError(f"export_uris: {uri!r} must name an absolute folder: file:///folder")
        return value

    @field_validator("webhook_allowed_urls")
    @classmethod
    def _check_webhook_allowed_urls(cls, value: list[str]) -> list[str]:
        for entry in value:
            parts = urlsplit(entry if "://" in entry else f"//{entry}")
            try:
                parts.port  # noqa: B018  (raises for a port that is not a number)
            except ValueError:
                parts = urlsplit("")
            prefix = "://" in entry
            if (
                not parts.hostname
                or (prefix and parts.scheme not in ("https", "http"))
                or (not prefix and (parts.path or parts.query or parts.fragment))
                or parts.username is not None
            ):
                raise ValueError(
                    f"webhook_allowed_urls: {entry!r} is neither an https:// URL prefix nor a host name "
                    "with an optional port (hooks.example.com or hooks.example.com:8443)"
                )
        return value

    @model_validator(mode="after")
    def _webhooks_are_signed(self) -> Settings:
        if self.webhook_allowed_urls and self.webhook_secret_file is None:
            raise ValueError("webhook_allowed_urls needs webhook_secret_file: every webhook event is signed")
        return self

    @model_validator(mode="after")
    def _summary_fits_a_message(self) -> Settings:
        needed = summary_bytes(self.max_classes)
        if needed > self.max_message_bytes:
            raise ValueError(
                f"max_classes={self.max_classes} allows dataset summaries of up to {needed} bytes, more "
                f"than max_message_bytes={self.max_message_bytes}: lower max_classes or raise "
                "max_message_bytes"
            )
        return self

    @property
    def store_path(self) -> Path:
        return self.state_dir / "jobs.sqlite3"

    @property
    def checkpoint_dir(self) -> Path:
        return self.state_dir / "checkpoints"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then environment, then the config file.
        return (init_settings, _UnknownVariables(settings_cls), env_settings, _ConfigFileSource(settings_cls))


class _UnknownVariables(PydanticBaseSettingsSource):
    """Refuses an O2U_ environment variable that names no setting (a misspelt
    O2U_MAX_QUEUED_JOB would otherwise be ignored, and its default used); contributes no value."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        known = {f"O2U_{name.upper()}" for name in self.settings_cls.model_fields}
        unknown = sorted(
            name
            for name in (variable.upper() for variable in os.environ)
            if name.startswith("O2U_")
            and name not in known
            and name not in OTHER_VARIABLES
            and not _LINK_VARIABLE.fullmatch(name)
        )
        if not unknown:
            return {}
        named = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            named.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise ValueError(
            f"environment variable{'s' if len(named) > 1 else ''} {', '.join(named)} "
            f"name{'' if len(named) > 1 else 's'} no setting; the settings are listed in docs/operations.md "
            "(Configuration reference)"
        )


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Reads the file named by O2U_CONFIG_FILE (YAML, JSON or TOML by extension)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("O2U_CONFIG_FILE")
        if not path:
            return {}
        text = Path(path).read_text()
        if path.endswith((".yaml", ".yml")):
            data = yaml.safe_load(text) or {}
        elif path.endswith(".json"):
            data = json.loads(text)
        elif path.endswith(".toml"):
            data = tomllib.loads(text)
        else:
            raise ValueError(f"O2U_CONFIG_FILE must end in .yaml, .yml, .json or .toml, got {path!r}")
        if not isinstance(data, dict):
            raise ValueError(f"O2U_CONFIG_FILE {path!r} must hold a mapping of setting names to values")
        return data
