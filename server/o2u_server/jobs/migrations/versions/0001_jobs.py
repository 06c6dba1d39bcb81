"""The first schema: jobs, their events, scores, class names, summaries and meta.

Revision ID: 0001
Revises:
Create Date: 2026-01-01

Stores created before migrations existed have exactly these tables; `migrate` stamps them at this
revision instead of creating them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ROW_NUMBER = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("key", name="meta_pkey"),
    )
    op.create_table(
        "jobs",
        sa.Column("seq", _ROW_NUMBER, autoincrement=True),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("request_id", sa.Text),
        sa.Column("request_hash", sa.Text, nullable=False),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("dataset_uri", sa.Text, nullable=False),
        sa.Column("dataset_format", sa.Text),
        sa.Column("config_json", sa.Text, nullable=False),
        sa.Column("initial_weights_uri", sa.Text),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("progress_json", sa.Text),
        sa.Column("error_json", sa.Text),
        sa.Column("run_info_json", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("crashes", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("last_sequence", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("create_time", sa.Double, nullable=False),
        sa.Column("update_time", sa.Double, nullable=False),
        sa.Column("start_time", sa.Double),
        sa.Column("end_time", sa.Double),
        sa.PrimaryKeyConstraint("seq", name="jobs_pkey"),
        sa.UniqueConstraint("job_id", name="jobs_job_id_key"),
        sa.UniqueConstraint("request_id", name="jobs_request_id_key"),
        sqlite_autoincrement=True,
    )
    op.create_index("jobs_by_state", "jobs", ["state", "seq"])
    op.create_table(
        "events",
        sa.Column("job_id", sa.Text),
        sa.Column("sequence", sa.Integer),
        sa.Column("event_time", sa.Double, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("progress_json", sa.Text),
        sa.Column("error_json", sa.Text),
        sa.Column("message", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "sequence", name="events_pkey"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "scores",
        sa.Column("job_id", sa.Text),
        sa.Column("rank", sa.Integer),
        sa.Column("sample_id", sa.BigInteger, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("given_label", sa.Integer, nullable=False),
        sa.Column("score", sa.Double, nullable=False),
        sa.Column("score_variance", sa.Double, nullable=False),
        sa.Column("noise_probability", sa.Double, nullable=False),
        sa.Column("suspected", sa.Boolean, nullable=False),
        sa.Column("suggested_label", sa.Integer, nullable=False),
        sa.Column("suggested_label_confidence", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "rank", name="scores_pkey"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "class_names",
        sa.Column("job_id", sa.Text),
        sa.Column("label", sa.Integer),
        sa.Column("name", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "label", name="class_names_pkey"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "summaries",
        sa.Column("job_id", sa.Text),
        sa.Column("summary_json", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("job_id", name="summaries_pkey"),
    )


def downgrade() -> None:
    for table in ("summaries", "class_names", "scores", "events", "jobs", "meta"):
        op.drop_table(table)
