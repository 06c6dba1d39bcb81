"""The job store's tables as SQLAlchemy Core metadata: the schema at the newest migration.

The store's queries are built from these tables, so one set of statements serves SQLite and
PostgreSQL. The schema itself is created and changed only by the Alembic migrations in
`jobs/migrations/versions/`; `tests/o2u_server/jobs/test_migrations.py` fails when a migrated
database and these tables disagree, so a new column goes into both (docs/architecture.md).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    false,
    text,
)

__all__ = ["class_names", "events", "jobs", "meta", "metadata", "scores", "summaries", "webhook_deliveries"]

metadata = MetaData(
    naming_convention={
        "ix": "%(table_name)s_%(column_0_N_name)s_index",
        "uq": "%(table_name)s_%(column_0_name)s_key",
        "pk": "%(table_name)s_pkey",
    }
)

# SQLite makes INTEGER PRIMARY KEY the rowid (with AUTOINCREMENT: never reused); PostgreSQL gets a
# BIGINT identity.
_ROW_NUMBER = BigInteger().with_variant(Integer(), "sqlite")

meta = Table(
    "meta",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", LargeBinary, nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("seq", _ROW_NUMBER, primary_key=True, autoincrement=True),
    Column("job_id", Text, nullable=False, unique=True),
    Column("request_id", Text),
    # The principal that created the job; a request_id names one job per owner.
    Column("owner", Text, nullable=False, server_default=text("'default'")),
    Column("request_hash", Text, nullable=False),
    Column("display_name", Text, nullable=False),
    Column("dataset_uri", Text, nullable=False),
    Column("dataset_format", Text),
    Column("config_json", Text, nullable=False),
    Column("initial_weights_uri", Text),
    Column("state", Text, nullable=False),
    Column("progress_json", Text),
    Column("error_json", Text),
    Column("run_info_json", Text),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("crashes", Integer, nullable=False, server_default=text("0")),
    Column("cancel_requested", Boolean, nullable=False, server_default=false()),
    Column("last_sequence", Integer, nullable=False, server_default=text("0")),
    Column("create_time", Double, nullable=False),
    Column("update_time", Double, nullable=False),
    Column("start_time", Double),
    Column("end_time", Double),
    # The replica that holds the running attempt, and until when (database clock, Unix seconds).
    Column("lease_owner", Text),
    Column("lease_expires_at", Double),
    Column("webhook_url", Text),
    # The DatasetOptions the job was created with, as JSON; NULL: the format's defaults.
    Column("dataset_options_json", Text),
    Index("jobs_by_state", "state", "seq"),
    Index("jobs_by_owner", "owner", "seq"),
    Index("jobs_owner_request_id_key", "owner", "request_id", unique=True),
    sqlite_autoincrement=True,
)

events = Table(
    "events",
    metadata,
    Column("job_id", Text, primary_key=True),
    Column("sequence", Integer, primary_key=True),
    Column("event_time", Double, nullable=False),
    Column("type", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("progress_json", Text),
    Column("error_json", Text),
    Column("message", Text, nullable=False),
    sqlite_with_rowid=False,
)

scores = Table(
    "scores",
    metadata,
    Column("job_id", Text, primary_key=True),
    Column("rank", Integer, primary_key=True),
    Column("sample_id", BigInteger, nullable=False),
    Column("key", Text, nullable=False),
    Column("given_label", Integer, nullable=False),
    Column("score", Double, nullable=False),
    Column("score_variance", Double, nullable=False),
    Column("noise_probability", Double, nullable=False),
    Column("suspected", Boolean, nullable=False),
    Column("suggested_label", Integer, nullable=False),
    Column("suggested_label_confidence", Double, nullable=False),
    sqlite_with_rowid=False,
)

class_names = Table(
    "class_names",
    metadata,
    Column("job_id", Text, primary_key=True),
    Column("label", Integer, primary_key=True),
    Column("name", Text, nullable=False),
    sqlite_with_rowid=False,
)

summaries = Table(
    "summaries",
    metadata,
    Column("job_id", Text, primary_key=True),
    Column("summary_json", Text, nullable=False),
)

# A job's completion webhook: written with the job's final state, sent by `jobs/webhooks.py`.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("delivery_id", Text, primary_key=True),
    Column("job_id", Text, nullable=False),
    Column("url", Text, nullable=False),
    Column("event_type", Text, nullable=False),
    Column("state", Text, nullable=False),  # pending, delivered, failed
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", Double, nullable=False),
    Column("create_time", Double, nullable=False),
    Column("attempts_json", Text, nullable=False, server_default=text("'[]'")),
    Index("webhook_deliveries_due", "state", "next_attempt_at"),
    Index("webhook_deliveries_by_job", "job_id"),
)
