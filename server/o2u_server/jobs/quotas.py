"""Per-principal job quotas, checked inside the store's admission transaction.

Admission is serialized across replicas (`Database.lock_admission`), so counting an owner's QUEUED
and RUNNING jobs there and inserting in the same transaction holds the limit however many replicas
accept jobs at once. A caller over its quota gets RESOURCE_EXHAUSTED with ErrorInfo
PRINCIPAL_QUOTA_EXCEEDED and a google.rpc.QuotaFailure naming the principal and the limit.
"""

from __future__ import annotations

from sqlalchemy import Connection, func, select

from o2u_server.domain import JobState
from o2u_server.errors import ResourceExhausted
from o2u_server.jobs.tables import jobs

__all__ = ["QuotaExceeded", "check_owner_quota"]

_ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)


class QuotaExceeded(ResourceExhausted):
    """A principal has as many unfinished jobs as max_jobs_per_principal allows."""

    def __init__(self, owner: str, active: int, limit: int) -> None:
        super().__init__(
            f"principal {owner!r} has {active} queued or running jobs, the limit per principal is {limit} "
            "(max_jobs_per_principal); wait for some to finish or cancel queued ones",
            reason="PRINCIPAL_QUOTA_EXCEEDED",
            metadata={"principal": owner, "limit": str(limit), "quota": "max_jobs_per_principal"},
            quota=(f"principal:{owner}", f"at most {limit} queued or running jobs per principal"),
        )


def check_owner_quota(conn: Connection, owner: str, limit: int) -> None:
    """QuotaExceeded if `owner` already has `limit` QUEUED or RUNNING jobs."""
    active = conn.execute(
        select(func.count()).select_from(jobs).where(jobs.c.owner == owner, jobs.c.state.in_(_ACTIVE))
    ).scalar_one()
    if active >= limit:
        raise QuotaExceeded(owner, int(active), limit)
