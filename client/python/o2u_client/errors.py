"""Exceptions raised by the client, one class per gRPC status code a caller is likely to handle.

Every failed call becomes an `O2UError` carrying the status code, the server's message and the
`google.rpc` details the server attached (ErrorInfo reason and metadata, BadRequest field
violations, ResourceInfo, RetryInfo), so callers branch on `reason` or the class instead of
parsing messages. `EXIT_CODES` is the one table the CLI uses to turn a code into a process exit
status.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "EXIT_CODES",
    "EXIT_GENERIC_ERROR",
    "AbortedError",
    "AlreadyExistsError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "O2UError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "error_from_rpc",
]


@dataclass(frozen=True)
class FieldViolation:
    """One request field the server rejected (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


class O2UError(Exception):
    """A failed call: status code, message and the google.rpc details the server sent."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        resource_type: str = "",
        resource_name: str = "",
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: Mapping[str, str] = MappingProxyType(dict(metadata or {}))
        self.field_violations = field_violations
        self.resource_type = resource_type
        self.resource_name = resource_name
        self.retry_delay = retry_delay  # seconds the server asked the caller to wait (RetryInfo)
        # Set by Client.submit: the request_id it sent, so a retry finds the job instead of a second one.
        self.request_id: str | None = None

    @property
    def code_name(self) -> str:
        """The status code as its canonical name, e.g. `NOT_FOUND`."""
        return self.code.name

    @property
    def exit_code(self) -> int:
        """The process exit status the CLI uses for this error."""
        return EXIT_CODES.get(self.code, EXIT_GENERIC_ERROR)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, message={self.message!r}, reason={self.reason!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the error."""
        return {
            "code": self.code.name,
            "message": self.message,
            "reason": self.reason,
            "domain": self.domain,
            "metadata": dict(self.metadata),
            "field_violations": [
                {"field": v.field, "description": v.description} for v in self.field_violations
            ],
            "resource_type": self.resource_type,
            "resource_name": self.resource_name,
            "retry_delay": self.retry_delay,
            "request_id": self.request_id,
        }


class InvalidArgumentError(O2UError):
    """The request or the dataset it names is malformed; retrying it unchanged fails again."""


class NotFoundError(O2UError):
    """The job, dataset or object does not exist."""


class AlreadyExistsError(O2UError):
    """A request_id was reused with a different payload."""


class FailedPreconditionError(O2UError):
    """The job is not in a state that allows the call (e.g. scores of an unfinished job)."""


class ResourceExhaustedError(O2UError):
    """A server limit was reached: queue full, too many streams, dataset too large, device memory."""


class PermissionDeniedError(O2UError):
    """The caller may not use this path or bucket."""


class UnauthenticatedError(O2UError):
    """No valid credentials were presented."""


class UnavailableError(O2UError):
    """The server or a dependency is unreachable or draining; retry later."""


class DeadlineExceededError(O2UError):
    """The call did not finish within its timeout."""


class AbortedError(O2UError):
    """The call was aborted by a concurrent change; retry it."""


class UnimplementedError(O2UError):
    """The server does not implement this method (version mismatch)."""


class InternalError(O2UError):
    """An unexpected server fault."""


_CLASSES: Mapping[grpc.StatusCode, type[O2UError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
}

# Exit status of the `o2u` CLI: 0 success, 1 the job FAILED or was CANCELLED, 2 usage error,
# 3 any status code not listed here, then one status per code a script may want to branch on.
EXIT_GENERIC_ERROR = 3
EXIT_CODES: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.NOT_FOUND: 4,
    grpc.StatusCode.INVALID_ARGUMENT: 5,
    grpc.StatusCode.UNAVAILABLE: 6,
    grpc.StatusCode.FAILED_PRECONDITION: 7,
    grpc.StatusCode.ALREADY_EXISTS: 8,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 9,
    grpc.StatusCode.PERMISSION_DENIED: 10,
    grpc.StatusCode.UNAUTHENTICATED: 11,
    grpc.StatusCode.DEADLINE_EXCEEDED: 12,
    grpc.StatusCode.INTERNAL: 13,
}


def error_class(code: grpc.StatusCode) -> type[O2UError]:
    """The exception class for a status code (O2UError for codes without their own class)."""
    return _CLASSES.get(code, O2UError)


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    if not isinstance(error, grpc.Call):
        return None
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)
    except ValueError:
        # The details trailer disagrees with the call's status (e.g. a proxy rewrote it):
        # the code and message of the call itself are the truth then.
        return None
    return status


def error_from_rpc(error: grpc.RpcError) -> O2UError:
    """Convert a grpc.RpcError into the matching O2UError, parsing google.rpc details."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    fields: dict[str, Any] = {}
    violations: list[FieldViolation] = []
    status = _rich_status(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            fields.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            resource = error_details_pb2.ResourceInfo()
            detail.Unpack(resource)
            fields.update(resource_type=resource.resource_type, resource_name=resource.resource_name)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            fields.update(retry_delay=retry.retry_delay.ToNanoseconds() / 1e9)
    return error_class(code)(code, message, field_violations=tuple(violations), **fields)
