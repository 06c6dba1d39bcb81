"""Jobs: the manager the servicer awaits, the runner's worker threads, the engine boundary, and where a
job's state is kept (the SQLite store, its result tables, row records and live events)."""
