"""Owners: the principal that created each job; request_id becomes unique per owner.

Jobs from before tenants belong to the default principal, which is everyone's on a server without
tokens and the single bearer token's.

Revision ID: 0005
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None


# SQLite reflects an unnamed unique constraint; the convention names it so it can be dropped.
_NAMING = {"uq": "%(table_name)s_%(column_0_name)s_key"}


def upgrade() -> None:
    with op.batch_alter_table("jobs", naming_convention=_NAMING) as batch:
        batch.add_column(sa.Column("owner", sa.Text, nullable=False, server_default=sa.text("'default'")))
        batch.drop_constraint("jobs_request_id_key", type_="unique")
        batch.create_index("jobs_by_owner", ["owner", "seq"])
        batch.create_index("jobs_owner_request_id_key", ["owner", "request_id"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("jobs_owner_request_id_key")
        batch.drop_index("jobs_by_owner")
        batch.create_unique_constraint("jobs_request_id_key", ["request_id"])
        batch.drop_column("owner")
