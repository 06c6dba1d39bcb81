"""The one mapping from service errors to gRPC statuses with google.rpc details.

`to_status` turns a `ServiceError` into a `google.rpc.Status` carrying an `ErrorInfo` (reason + domain)
and, where the error has them, `BadRequest`, `ResourceInfo`, `QuotaFailure` and `RetryInfo`;
`grpc_status` wraps it for `context.abort_with_status`. The interceptor and the credential checks are
its only callers, so no other code in the server chooses a status code. Status and details travel in
gRPC trailers, which clients cap (8 KiB by default), so the message is cut at MAX_MESSAGE_BYTES and
the texts repeated in details at MAX_DETAIL_BYTES: an error can never fail to reach the caller.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from o2u_server.errors import Code, ServiceError

__all__ = ["DOMAIN", "grpc_code", "grpc_status", "to_status"]

DOMAIN = "o2u.dev"  # ErrorInfo.domain of every error this service raises
MAX_MESSAGE_BYTES = 1024  # UTF-8 bytes of a status message
MAX_DETAIL_BYTES = 256  # UTF-8 bytes of each text repeated in the details

_GRPC_CODES: dict[Code, grpc.StatusCode] = {code: grpc.StatusCode[code.name] for code in Code}


def grpc_code(error: ServiceError) -> grpc.StatusCode:
    return _GRPC_CODES[error.code]


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _cut(text: str, limit: int) -> str:
    """`text` in at most `limit` UTF-8 bytes, ending in "..." when it was cut."""
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode("utf-8", "ignore") + "..."


def to_status(error: ServiceError) -> status_pb2.Status:
    """The google.rpc.Status for an error, with ErrorInfo and the details that apply."""
    metadata = {_cut(key, 64): _cut(value, MAX_DETAIL_BYTES) for key, value in error.metadata.items()}
    details = [_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata))]
    description = _cut(error.message, MAX_DETAIL_BYTES)
    if error.field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=description)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    if error.resource_type is not None:
        info = error_details_pb2.ResourceInfo(
            resource_type=error.resource_type,
            resource_name=_cut(error.resource_name or "", MAX_DETAIL_BYTES),
            description=description,
        )
        details.append(_pack(info))
    if error.quota is not None:
        subject, about = (_cut(text, MAX_DETAIL_BYTES) for text in error.quota)
        violation = error_details_pb2.QuotaFailure.Violation(subject=subject, description=about)
        details.append(_pack(error_details_pb2.QuotaFailure(violations=[violation])))
    if error.retry_after_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_seconds * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    code_value = int(error.code)
    assert code_value in code_pb2.Code.values()
    return status_pb2.Status(code=code_value, message=_cut(error.message, MAX_MESSAGE_BYTES), details=details)


def grpc_status(error: ServiceError) -> grpc.Status:
    """The status to end a call with (`context.abort_with_status`)."""
    status: grpc.Status = rpc_status.to_status(to_status(error))
    return status
