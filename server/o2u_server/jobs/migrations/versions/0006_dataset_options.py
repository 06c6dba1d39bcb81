"""Dataset options: how a job's dataset is read (Parquet column names, the Label Studio annotation
rule), kept with the job so every attempt reads the dataset the same way.

Jobs from before have none (NULL): their formats' defaults, which is how they were read.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("dataset_options_json", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("dataset_options_json")
