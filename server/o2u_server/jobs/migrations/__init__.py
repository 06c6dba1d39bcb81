"""The job store's Alembic migrations: `env.py`, the revision template and `versions/`."""
