"""Stored results of finished jobs: ranked scores, class names and the dataset summary.

Scores are keyed by (job_id, rank), so a page is an index range scan that starts after the last rank
the caller saw (keyset pagination): page 1,000 of a million-sample job costs the same as page 1.
The caller writes them in transactions of `STAGE_ROWS` rows (`insert_scores`: COPY on PostgreSQL, a
million rows in seconds where row-by-row INSERTs would take minutes across a network; batched
INSERTs on SQLite) before the one that makes the job SUCCEEDED, and builds each batch between those
transactions: one transaction of millions of rows would hold back the job's lease renewals (and,
on SQLite, which has one writer for the whole process, every other job's) until it commits. Scores
are only ever read for a SUCCEEDED job, so staged rows are invisible until then; a job that ends
otherwise loses them (`clear`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, bindparam, delete, func, select

from o2u_server.domain import DatasetSummary, NoiseScoreRow, ScoreFilter, ScoreTuple
from o2u_server.errors import NotFound
from o2u_server.jobs import records
from o2u_server.jobs.database import Database
from o2u_server.jobs.tables import class_names, jobs, scores, summaries
from o2u_server.jobs.transitions import not_found

__all__ = ["STAGE_ROWS", "ResultsStore"]

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
# Rows per staging transaction: on SQLite about 0.2 s of the write lock on a 2-core machine (1M rows
# take 3.8 s), where a lease allows `lease_seconds` (30 s) between renewals.
STAGE_ROWS = 50_000


# The reads are built once per filter shape, with the values bound per call: on SQLite a statement
# built per call costs as much again as the query (construction and its cache key).
_NAMES = select(class_names.c.label, class_names.c.name).where(class_names.c.job_id == bindparam("job_id"))


def _where(top_k: bool, min_score: bool, only_suspected: bool) -> list[ColumnElement[bool]]:
    """The clauses of a score filter that sets those fields (the values are bound per call)."""
    clauses: list[ColumnElement[bool]] = [scores.c.job_id == bindparam("job_id")]
    if top_k:
        clauses.append(scores.c.rank <= bindparam("top_k"))
    if min_score:
        clauses.append(scores.c.score >= bindparam("min_score"))
    if only_suspected:
        clauses.append(scores.c.suspected.is_(True))
    return clauses


def _shape(score_filter: ScoreFilter) -> tuple[bool, bool, bool]:
    """Which of the filter's fields are set: one statement per combination."""
    return score_filter.top_k > 0, score_filter.min_score is not None, score_filter.only_suspected


def _parameters(job_id: str, score_filter: ScoreFilter, **more: object) -> dict[str, object]:
    return {"job_id": job_id, "top_k": score_filter.top_k, "min_score": score_filter.min_score, **more}


@functools.cache
def _page_query(top_k: bool, min_score: bool, only_suspected: bool) -> Select[Any]:
    return (
        select(*(scores.c[name] for name in _COLUMNS))
        .where(*_where(top_k, min_score, only_suspected), scores.c.rank > bindparam("after_rank"))
        .order_by(scores.c.rank)
        .limit(bindparam("limit"))
    )


@functools.cache
def _count_query(top_k: bool, min_score: bool, only_suspected: bool) -> Select[Any]:
    return select(func.count()).select_from(scores).where(*_where(top_k, min_score, only_suspected))


class ResultsStore:
    """Reads and writes the result tables; writes happen inside the caller's transaction."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @staticmethod
    def insert_summary(conn: Connection, job_id: str, names: list[str], summary: DatasetSummary) -> None:
        if names:
            labelled = [{"job_id": job_id, "label": label, "name": name} for label, name in enumerate(names)]
            conn.execute(class_names.insert().values(labelled))  # one statement, not one per class
        conn.execute(summaries.insert().values(job_id=job_id, summary_json=records.encode(summary)))

    def insert_scores(self, conn: Connection, job_id: str, rows: Sequence[ScoreTuple]) -> None:
        """Score rows: by COPY on PostgreSQL, in batched INSERTs on SQLite (in-process: no network
        round trips to save)."""
        if self._db.postgresql:
            self._copy(conn, job_id, rows)
            return
        statement = f"INSERT INTO scores (job_id, {', '.join(_COLUMNS)}) VALUES ({'?, ' * 10}?)"
        for start in range(0, len(rows), _INSERT_BATCH):
            conn.exec_driver_sql(statement, [(job_id, *row) for row in rows[start : start + _INSERT_BATCH]])

    @staticmethod
    def highest_rank(conn: Connection, job_id: str) -> int:
        """The highest rank stored for the job; 0 if it has no scores."""
        found = conn.execute(select(func.max(scores.c.rank)).where(scores.c.job_id == job_id)).scalar()
        return int(found or 0)

    @staticmethod
    def clear(conn: Connection, job_id: str, *, ranks: tuple[int, int] | None = None) -> None:
        """Delete the job's scores (those with `ranks[0] < rank <= ranks[1]` when given)."""
        statement = delete(scores).where(scores.c.job_id == job_id)
        if ranks is not None:
            statement = statement.where(scores.c.rank > ranks[0], scores.c.rank <= ranks[1])
        conn.execute(statement)

    @staticmethod
    def _copy(conn: Connection, job_id: str, rows: Iterable[ScoreTuple]) -> None:
        driver = conn.connection.driver_connection  # psycopg's connection, in this transaction
        assert driver is not None
        statement = f"COPY scores (job_id, {', '.join(_COLUMNS)}) FROM STDIN"
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row((job_id, *row))

    @staticmethod
    def _names(conn: Connection, job_id: str) -> dict[int, str]:
        return {int(label): str(name) for label, name in conn.execute(_NAMES, {"job_id": job_id})}

    @staticmethod
    def _row(row: Sequence[Any], names: dict[int, str]) -> NoiseScoreRow:
        """A row of `_COLUMNS`, read by position (a name lookup per field costs more than the query)."""
        rank, sample_id, key, given, score, variance, probability, suspected, suggested, confidence = row
        return NoiseScoreRow(
            sample_id,
            key,
            given,
            score,
            variance,
            rank,
            probability,
            bool(suspected),
            suggested,
            confidence,
            names.get(given, str(given)),
            names.get(suggested, str(suggested)),
        )

    def page(
        self, job_id: str, score_filter: ScoreFilter, after_rank: int, limit: int
    ) -> list[NoiseScoreRow]:
        query = _page_query(*_shape(score_filter))
        parameters = _parameters(job_id, score_filter, after_rank=after_rank, limit=limit)

        def read() -> list[NoiseScoreRow]:
            with self._db.read() as conn:
                names = self._names(conn, job_id)
                return [self._row(row, names) for row in conn.execute(query, parameters).all()]

        return self._db.retry(read)

    def count(self, job_id: str, score_filter: ScoreFilter) -> int:
        query = _count_query(*_shape(score_filter))
        parameters = _parameters(job_id, score_filter)

        def read() -> int:
            with self._db.read() as conn:
                return int(conn.execute(query, parameters).scalar_one())

        return self._db.retry(read)

    def iterate(self, job_id: str, score_filter: ScoreFilter, batch: int = 5_000) -> Iterator[NoiseScoreRow]:
        """Every matching score in rank order, read in pages so memory stays flat (each page is
        one read). NotFound when the job was deleted between two pages: its scores seem to end
        there, and an export of them would be cut short without a word."""
        after = 0
        while True:
            rows = self.page(job_id, score_filter, after, batch)
            yield from rows
            if len(rows) < batch:
                if not self._exists(job_id):
                    raise not_found(job_id)
                return
            after = rows[-1].rank

    def _exists(self, job_id: str) -> bool:
        def read() -> bool:
            with self._db.read() as conn:
                return conn.execute(select(jobs.c.job_id).where(jobs.c.job_id == job_id)).first() is not None

        return self._db.retry(read)

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
