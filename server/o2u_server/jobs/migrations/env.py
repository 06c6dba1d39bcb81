"""Alembic's environment: run the revisions on the connection the server hands over, or, from the
`alembic` command line, on the database O2U_DATABASE_URL names (SQLite under O2U_STATE_DIR when
unset), with the store's tables as the target of `--autogenerate`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from o2u_server.jobs.database import database_url
from o2u_server.jobs.tables import metadata
from o2u_server.settings import Settings


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


given: Connection | None = context.config.attributes.get("connection")
if given is not None:
    _run(given)
else:
    engine = create_engine(database_url(Settings()))
    with engine.connect() as opened:
        _run(opened)
    engine.dispose()
