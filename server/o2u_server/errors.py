"""Service errors: small exception classes, each standing for one canonical error code.

Code below the servicer raises these (the engine's errors are translated at the engine boundary,
`o2u_server.jobs.engine`). Each class carries its `Code`, numbered as google.rpc.Code, so a failed
job's stored JobError and the status of an RPC agree. Nothing here knows a transport: the one mapping
to gRPC statuses with google.rpc details is `o2u_server.api.status`, so a caller sees the same code
for the same fault everywhere.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "AlreadyExists",
    "Code",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServiceError",
    "StateStoreFull",
    "Unauthenticated",
    "Unavailable",
]


class Code(enum.IntEnum):
    """The canonical error codes this service uses, numbered as google.rpc.Code (and gRPC)."""

    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


@dataclass(eq=False)  # exceptions compare and hash by identity
class ServiceError(Exception):
    """Base class: a message a caller can act on, a reason code and optional details."""

    message: str
    reason: str = "ERROR"
    field: str | None = None  # request field at fault, reported as a BadRequest violation
    resource_type: str | None = None  # e.g. "scoring_job", "object"
    resource_name: str | None = None
    retry_after_seconds: float | None = None
    # dataclasses.field: the `field` attribute above shadows the bare name inside the class body.
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    quota: tuple[str, str] | None = None  # (subject, description), reported as a QuotaFailure violation
    code: ClassVar[Code] = Code.INTERNAL

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class InvalidArgument(ServiceError):
    """The request (or the dataset it names) is malformed; retrying the same request will fail."""

    code = Code.INVALID_ARGUMENT


class NotFound(ServiceError):
    """The job or object does not exist."""

    code = Code.NOT_FOUND


class AlreadyExists(ServiceError):
    """A request_id was reused with a different payload."""

    code = Code.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    """The job is not in a state that allows the call (e.g. scores of an unfinished job)."""

    code = Code.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    """A limit was reached (queue full, too many streams, dataset too large, device memory)."""

    code = Code.RESOURCE_EXHAUSTED


class StateStoreFull(ResourceExhausted):
    """Where the server keeps job state has no room left: its state volume (STATE_DISK_FULL), or
    the PostgreSQL job database (DATABASE_FULL). New work waits; reads keep working."""

    def __init__(self, message: str = "", *, reason: str = "STATE_DISK_FULL") -> None:
        super().__init__(
            message
            or "the server's state volume is full, so it accepts no new jobs until space is freed; "
            "retry later",
            reason=reason,
            retry_after_seconds=60.0,
        )


class PermissionDenied(ServiceError):
    """The caller may not touch this path or bucket."""

    code = Code.PERMISSION_DENIED


class Unauthenticated(ServiceError):
    """No valid credentials were presented."""

    code = Code.UNAUTHENTICATED


class Unavailable(ServiceError):
    """A dependency (object store, the server itself while draining) is unavailable; retry later."""

    code = Code.UNAVAILABLE


class Internal(ServiceError):
    """An unexpected fault; logged with the job id."""

    code = Code.INTERNAL
