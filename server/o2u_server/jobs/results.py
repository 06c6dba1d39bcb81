"""Stored results of finished jobs: ranked scores, class names and the dataset summary.

Scores are keyed by (job_id, rank), so a page is an index range scan that starts after the last rank
the caller saw (keyset pagination): page 1,000 of a million-sample job costs the same as page 1.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator

from o2u_server.domain import DatasetSummary, NoiseScoreRow, ScoreFilter, ScoreTuple
from o2u_server.errors import NotFound
from o2u_server.jobs import records
from o2u_server.jobs.database import Database

__all__ = ["ResultsStore"]

_COLUMNS = (
    "rank, sample_id, key, given_label, score, score_variance, noise_probability, suspected, "
    "suggested_label, suggested_label_confidence"
)
_INSERT_BATCH = 10_000


def _where(job_id: str, score_filter: ScoreFilter) -> tuple[str, list[object]]:
    clauses: list[str] = ["job_id = ?"]
    params: list[object] = [job_id]
    if score_filter.top_k > 0:
        clauses.append("rank <= ?")
        params.append(score_filter.top_k)
    if score_filter.min_score is not None:
        clauses.append("score >= ?")
        params.append(score_filter.min_score)
    if score_filter.only_suspected:
        clauses.append("suspected = 1")
    return " AND ".join(clauses), params


class ResultsStore:
    """Reads and writes the result tables; writes happen inside the caller's transaction."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def insert(
        self,
        conn: sqlite3.Connection,
        job_id: str,
        scores: Iterable[ScoreTuple],
        class_names: list[str],
        summary: DatasetSummary,
    ) -> None:
        conn.executemany(
            "INSERT INTO class_names VALUES (?, ?, ?)",
            [(job_id, label, name) for label, name in enumerate(class_names)],
        )
        batch: list[tuple[object, ...]] = []
        for row in scores:
            batch.append((job_id, *row))
            if len(batch) >= _INSERT_BATCH:
                conn.executemany(f"INSERT INTO scores (job_id, {_COLUMNS}) VALUES ({'?, ' * 10}?)", batch)
                batch.clear()
        if batch:
            conn.executemany(f"INSERT INTO scores (job_id, {_COLUMNS}) VALUES ({'?, ' * 10}?)", batch)
        conn.execute("INSERT INTO summaries VALUES (?, ?)", (job_id, records.encode(summary)))

    def _names(self, conn: sqlite3.Connection, job_id: str) -> dict[int, str]:
        rows = conn.execute("SELECT label, name FROM class_names WHERE job_id = ?", (job_id,))
        return {int(label): str(name) for label, name in rows}

    @staticmethod
    def _row(row: sqlite3.Row, names: dict[int, str]) -> NoiseScoreRow:
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
        where, params = _where(job_id, score_filter)
        with self._db.read() as conn:
            names = self._names(conn, job_id)
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM scores WHERE {where} AND rank > ? ORDER BY rank LIMIT ?",
                (*params, after_rank, limit),
            ).fetchall()
        return [self._row(row, names) for row in rows]

    def count(self, job_id: str, score_filter: ScoreFilter) -> int:
        where, params = _where(job_id, score_filter)
        (total,) = (
            self._db.connection().execute(f"SELECT COUNT(*) FROM scores WHERE {where}", params).fetchone()
        )
        return int(total)

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
        row = (
            self._db.connection()
            .execute("SELECT summary_json FROM summaries WHERE job_id = ?", (job_id,))
            .fetchone()
        )
        if row is None:
            raise NotFound(
                f"scoring job {job_id!r} has no stored summary",
                reason="SUMMARY_NOT_FOUND",
                resource_type="scoring_job",
                resource_name=job_id,
            )
        return records.decode_summary(row[0])
