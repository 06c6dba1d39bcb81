"""Schema migrations at start-up: Alembic's revisions in `jobs/migrations/versions/`, to the newest.

`Database.open` calls `upgrade` once per start, under PostgreSQL's advisory lock (or SQLite's
state-directory lock), so replicas that start together migrate once. A store written before
migrations existed (its tables, no `alembic_version`) is stamped at the first revision, whose
schema it has, and upgraded from there.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect

__all__ = ["SCRIPT_LOCATION", "head_revision", "upgrade"]

SCRIPT_LOCATION = Path(__file__).with_name("migrations")
_FIRST_REVISION = "0001"


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def upgrade(connection: Connection) -> None:
    """Migrate the database behind `connection` (not inside a transaction) to the newest revision."""
    tables = set(inspect(connection).get_table_names())
    connection.rollback()  # inspection began a transaction; each revision runs in its own
    config = _config(connection)
    if "jobs" in tables and "alembic_version" not in tables:
        command.stamp(config, _FIRST_REVISION)
    command.upgrade(config, "head")
    connection.commit()  # what Alembic read to find the current revision ends its transaction
