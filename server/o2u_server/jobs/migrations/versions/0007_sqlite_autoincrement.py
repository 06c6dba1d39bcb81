"""SQLite: `jobs.seq` is AUTOINCREMENT again, so a deleted newest job's number is never reused.

The table rebuilds of revisions 0002, 0003 and 0005 recreated `jobs` without the AUTOINCREMENT
that 0001 gave it. SQLite then hands the next job the highest seq in use plus one: after the newest
job is deleted, its seq goes to the next job, and a job listing's page token (which resumes after a
seq) can show that job on a page it had already passed. This rebuild restores the keyword; SQLite
starts its counter at the highest seq copied. PostgreSQL's identity column never reuses values and
is left alone.

Any later batch migration of `jobs` must pass the same `table_kwargs`, or the rebuild drops the
keyword again (test_migrations checks that no seq is reused at the head revision).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("jobs", recreate="always", table_kwargs={"sqlite_autoincrement": True}):
        pass


def downgrade() -> None:
    """Nothing to undo: AUTOINCREMENT only stops SQLite from reusing numbers."""
