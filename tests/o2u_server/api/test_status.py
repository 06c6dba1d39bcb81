"""The one error-to-status mapping, and the layering that keeps it in one place: the error classes,
storage and datasets import neither grpc nor the engine."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2

from o2u_server import errors
from o2u_server.api.status import DOMAIN, grpc_code, grpc_status, to_status
from o2u_server.errors import Code, InvalidArgument, ServiceError, Unavailable

ERROR_CLASSES = [
    value
    for value in vars(errors).values()
    if isinstance(value, type) and issubclass(value, ServiceError) and value is not ServiceError
]


@pytest.mark.parametrize("error_class", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_class_has_its_canonical_grpc_code(error_class: type[ServiceError]) -> None:
    error = error_class("message")
    code = grpc_code(error)
    assert code.name == error.code.name
    assert code.value[0] == int(error.code) == code_pb2.Code.Value(error.code.name)


def test_every_code_is_used_by_an_error_class() -> None:
    assert {cls.code for cls in ERROR_CLASSES} == set(Code)


def test_status_carries_error_info_and_the_details_that_apply() -> None:
    plain = to_status(InvalidArgument("bad", reason="INVALID_URI"))
    assert (plain.code, plain.message, len(plain.details)) == (code_pb2.INVALID_ARGUMENT, "bad", 1)
    info = error_details_pb2.ErrorInfo()
    assert plain.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("INVALID_URI", DOMAIN)

    detailed = to_status(
        Unavailable(
            "store down",
            reason="OBJECT_STORE_UNAVAILABLE",
            field="dataset.uri",
            resource_type="object_store",
            resource_name="minio:9000",
            retry_after_seconds=1.5,
            metadata={"limit": "none"},
        )
    )
    request, resource, retry = (
        error_details_pb2.BadRequest(),
        error_details_pb2.ResourceInfo(),
        error_details_pb2.RetryInfo(),
    )
    assert detailed.details[0].Unpack(info)
    assert dict(info.metadata) == {"limit": "none"}
    assert detailed.details[1].Unpack(request)
    assert request.field_violations[0].field == "dataset.uri"
    assert detailed.details[2].Unpack(resource)
    assert (resource.resource_type, resource.resource_name) == ("object_store", "minio:9000")
    assert detailed.details[3].Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() == 1_500_000_000
    assert grpc_status(Unavailable("store down")).code is grpc.StatusCode.UNAVAILABLE


def test_errors_storage_and_datasets_import_neither_grpc_nor_the_engine() -> None:
    script = (
        "import sys, o2u_server.errors, o2u_server.storage, o2u_server.datasets\n"
        "print(sorted(m for m in ('grpc', 'o2u_engine', 'torch') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
