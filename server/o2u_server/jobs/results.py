"""Stored results of finished jobs: ranked scores, class names and the dataset summary.

Scores are keyed by (job_id, rank), so a page is an index range scan that starts after the last rank
the caller saw (keyset pagination): page 1,000 of a million-sample job costs the same as page 1.
They are bulk-loaded inside the caller's transaction: PostgreSQL's COPY on PostgreSQL (a million
rows in seconds, where row-by-row INSERTs would take minutes across a network), batched INSERTs on
SQLite, which runs in-process.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from sqlalchemy import ColumnElement, Connection, func, select

from o2u_server.domain import DatasetSummary, NoiseScoreRow, ScoreFilter, ScoreTuple
from o2u_server.errors import NotFound
from o2u_server.jobs import records
from o2u_server.jobs.database import Database
from o2u_server.jobs.tables import class_names, scores, summaries

__all__ = ["ResultsStore"]

# ScoreTuple's order, after job_id.
_COLUMNS = (
    "rank",
    "sample_id",
    "key",
    "given_label",
    "score",
    "score_variance",
    "noise_probability",
    "suspected",
    "suggested_label",
    "suggested_label_confidence",
)
_INSERT_BATCH = 10_000


def _where(job_id: str, score_filter: ScoreFilter) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = [scores.c.job_id == job_id]
    if score_filter.top_k > 0:
        clauses.append(scores.c.rank <= score_filter.top_k)
    if score_filter.min_score is not None:
        clauses.append(scores.c.score >= score_filter.min_score)
    if score_filter.only_suspected:
        clauses.append(scores.c.suspected.is_(True))
    return clauses


class ResultsStore:
    """Reads and writes the result tables; writes happen inside the caller's transaction."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def insert(
        self,
        conn: Connection,
        job_id: str,
        rows: Iterable[ScoreTuple],
        names: list[str],
        summary: DatasetSummary,
    ) -> None:
        if names:
            labelled = [{"job_id": job_id, "label": label, "name": name} for label, name in enumerate(names)]
            conn.execute(class_names.insert().values(labelled))  # one statement, not one per class
        if self._db.postgresql:
            self._copy(conn, job_id, rows)
        else:
            self._insert_batches(conn, job_id, rows)
        conn.execute(summaries.insert().values(job_id=job_id, summary_json=records.encode(summary)))

    @staticmethod
    def _copy(conn: Connection, job_id: str, rows: Iterable[ScoreTuple]) -> None:
        driver = conn.connection.driver_connection  # psycopg's connection, in this transaction
        assert driver is not None
        statement = f"COPY scores (job_id, {', '.join(_COLUMNS)}) FROM STDIN"
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row((job_id, *row))

    @staticmethod
    def _insert_batches(conn: Connection, job_id: str, rows: Iterable[ScoreTuple]) -> None:
        statement = f"INSERT INTO scores (job_id, {', '.join(_COLUMNS)}) VALUES ({'?, ' * 10}?)"
        batch: list[tuple[object, ...]] = []
        for row in rows:
            batch.append((job_id, *row))
            if len(batch) >= _INSERT_BATCH:
                conn.exec_driver_sql(statement, batch)
                batch.clear()
        if batch:
            conn.exec_driver_sql(statement, batch)

    @staticmethod
    def _names(conn: Connection, job_id: str) -> dict[int, str]:
        rows = conn.execute(
            select(class_names.c.label, class_names.c.name).where(class_names.c.job_id == job_id)
        )
        return {int(label): str(name) for label, name in rows}

    @staticmethod
    def _row(row: Mapping[Any, Any], names: dict[int, str]) -> NoiseScoreRow:
        return NoiseScoreRow(
            sample_id=row["sample_id"],
            key=row["key"],
            given_label=row["given_label"],
            score=row["score"],
            score_variance=row["score_variance"],
            rank=row["rank"],
            noise_probability=row["noise_probability"],
            suspected=bool(row["suspected"]),
            suggested_label=row["suggested_label"],
            suggested_label_confidence=row["suggested_label_confidence"],
            given_label_name=names.get(row["given_label"], str(row["given_label"])),
            suggested_label_name=names.get(row["suggested_label"], str(row["suggested_label"])),
        )

    def page(
        self, job_id: str, score_filter: ScoreFilter, after_rank: int, limit: int
    ) -> list[NoiseScoreRow]:
        query = (
            select(*(scores.c[name] for name in _COLUMNS))
            .where(*_where(job_id, score_filter), scores.c.rank > after_rank)
            .order_by(scores.c.rank)
            .limit(limit)
        )

        def read() -> list[NoiseScoreRow]:
            with self._db.read() as conn:
                names = self._names(conn, job_id)
                return [self._row(row, names) for row in conn.execute(query).mappings()]

        return self._db.retry(read)

    def count(self, job_id: str, score_filter: ScoreFilter) -> int:
        query = select(func.count()).select_from(scores).where(*_where(job_id, score_filter))

        def read() -> int:
            with self._db.read() as conn:
                return int(conn.execute(query).scalar_one())

        return self._db.retry(read)

    def iterate(self, job_id: str, score_filter: ScoreFilter, batch: int = 5_000) -> Iterator[NoiseScoreRow]:
        """Every matching score in rank order, read in pages so memory stays flat."""
        after = 0
        while True:
            rows = self.page(job_id, score_filter, after, batch)
            yield from rows
            if len(rows) < batch:
                return
            after = rows[-1].rank

    def summary(self, job_id: str) -> DatasetSummary:
        def read() -> str | None:
            with self._db.read() as conn:
                query = select(summaries.c.summary_json).where(summaries.c.job_id == job_id)
                return conn.execute(query).scalar_one_or_none()

        text = self._db.retry(read)
        if text is None:
            raise NotFound(
                f"scoring job {job_id!r} has no stored summary",
                reason="SUMMARY_NOT_FOUND",
                resource_type="scoring_job",
                resource_name=job_id,
            )
        return records.decode_summary(text)
