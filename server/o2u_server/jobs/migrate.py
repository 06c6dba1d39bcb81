"""Schema migrations at start-up: Alembic's revisions in `jobs/migrations/versions/`, to the newest.

`Database.open` calls `upgrade` once per start, under PostgreSQL's advisory lock (or SQLite's
state-directory lock), so replicas that start together migrate once. A store written before
migrations existed (its tables, no `alembic_version`) is stamped at the first revision, whose
schema it has, and upgraded from there.

Migrations go forward only. A store already migrated by a newer server (a revision this server does
not know) is refused with NewerSchemaError before anything is written: a rollback of the server
after an upgrade needs the database as it was before (its backup), or the newer server again.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect

__all__ = ["SCRIPT_LOCATION", "NewerSchemaError", "head_revision", "upgrade"]

SCRIPT_LOCATION = Path(__file__).with_name("migrations")
_FIRST_REVISION = "0001"


class NewerSchemaError(RuntimeError):
    """The job store's schema revision is newer than this server's migrations."""


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
    if "alembic_version" in tables:
        _check_known(connection, ScriptDirectory.from_config(config))
    if "jobs" in tables and "alembic_version" not in tables:
        command.stamp(config, _FIRST_REVISION)
    command.upgrade(config, "head")
    connection.commit()  # what Alembic read to find the current revision ends its transaction


def _check_known(connection: Connection, script: ScriptDirectory) -> None:
    stored = {row[0] for row in connection.exec_driver_sql("SELECT version_num FROM alembic_version")}
    connection.rollback()
    known = {revision.revision for revision in script.walk_revisions()}
    unknown = sorted(stored - known)
    if unknown:
        raise NewerSchemaError(
            f"the job store's schema is at revision {', '.join(unknown)}, newer than this server's "
            f"newest ({script.get_current_head()}): a newer o2u-server migrated it. Run that version "
            "again, or restore the database from before the upgrade to run this one (migrations go "
            "forward only)"
        )
