"""Which jobs a principal sees: its own, or every job for an admin.

Another owner's job answers exactly as a missing one (NOT_FOUND, the same message), so a job id
reveals nothing about other tenants' jobs. Listings are filtered in the query: a principal lists its
own jobs, an admin every job, or one owner's when it names one.
"""

from __future__ import annotations

from o2u_server.domain import Job
from o2u_server.errors import InvalidArgument
from o2u_server.jobs.transitions import not_found
from o2u_server.principals import PRINCIPAL_NAME, PRINCIPAL_RULE, Principal

__all__ = ["listing_owner", "visible"]


def visible(job: Job, caller: Principal) -> Job:
    """`job` if `caller` may see it; else the NotFound a missing job would raise."""
    if not caller.sees(job.spec.owner):
        raise not_found(job.job_id)
    return job


def listing_owner(caller: Principal, requested: str) -> str | None:
    """The owner a ListScoringJobs call is restricted to (None: every owner, for admins only).

    A principal that is not an admin lists only its own jobs, whatever it asks for: naming another
    owner lists nothing of theirs (its own jobs are the only ones it may see).
    """
    if requested and not PRINCIPAL_NAME.fullmatch(requested):
        raise InvalidArgument(
            f"owner must be a principal name: {PRINCIPAL_RULE}",
            reason="INVALID_OWNER",
            field="owner",
        )
    if not caller.admin:
        return caller.name
    return requested or None
