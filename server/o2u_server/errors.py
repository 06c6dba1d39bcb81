"""Service errors and their one mapping to gRPC status codes with google.rpc details.

Code below the servicer raises the small exception classes here (or the engine's ValueError
subclasses); `to_status` turns any of them into a `google.rpc.Status` carrying an `ErrorInfo`
(reason + domain) and, where useful, `BadRequest`, `ResourceInfo` or `RetryInfo`. Nothing else
in the server chooses a status code, so a caller sees the same code for the same fault everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from o2u_engine import ConfigError, DataValidationError

DOMAIN = "o2u.dev"


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
    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class InvalidArgument(ServiceError):
    """The request (or the dataset it names) is malformed; retrying the same request will fail."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    """The job or object does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    """A request_id was reused with a different payload."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    """The job is not in a state that allows the call (e.g. scores of an unfinished job)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    """A limit was reached (queue full, too many streams, dataset too large, device memory)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(ServiceError):
    """The caller may not touch this path or bucket."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ServiceError):
    """No valid credentials were presented."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(ServiceError):
    """A dependency (object store, the server itself while draining) is unavailable; retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class Internal(ServiceError):
    """An unexpected fault; logged with the job id."""

    code = grpc.StatusCode.INTERNAL


def from_exception(exc: BaseException) -> ServiceError:
    """Map any exception to a ServiceError; engine validation errors become INVALID_ARGUMENT."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, DataValidationError):
        return InvalidArgument(str(exc), reason="INVALID_DATASET", field="dataset")
    if isinstance(exc, ConfigError):
        return InvalidArgument(str(exc), reason="INVALID_CONFIG", field="config")
    return Internal(f"internal error: {type(exc).__name__}: {exc}", reason="INTERNAL")


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(error: ServiceError) -> status_pb2.Status:
    """The google.rpc.Status for an error, with ErrorInfo and the details that apply."""
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=dict(error.metadata)))
    ]
    if error.field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    if error.resource_type is not None:
        info = error_details_pb2.ResourceInfo(
            resource_type=error.resource_type,
            resource_name=error.resource_name or "",
            description=error.message,
        )
        details.append(_pack(info))
    if error.retry_after_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_seconds * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    code_value: int = error.code.value[0]
    assert code_value in code_pb2.Code.values()
    return status_pb2.Status(code=code_value, message=error.message, details=details)
