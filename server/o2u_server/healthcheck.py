"""`o2u-healthcheck`: exit 0 if the server's gRPC health service answers SERVING, else 1.

For container HEALTHCHECKs and exec probes. Plaintext by default; `--tls` uses the system roots or
`--ca`, and `--cert`/`--key` present a client certificate for mutual TLS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["check", "main"]


# What to check when a file named on the command line is missing: the chart's probes name files of
# the mounted TLS Secret, and a Secret made by `kubectl create secret tls` has no ca.crt.
_MISSING = {
    "--ca": "with the Helm chart, tls.caKey names the CA's key in the TLS Secret (empty: the system roots)",
    "--cert": "with the Helm chart, the TLS Secret's tls.crt",
    "--key": "with the Helm chart, the TLS Secret's tls.key",
}


def _read(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path} does not exist; {_MISSING[flag]}") from None


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if not (args.tls or args.ca or args.cert):
        return grpc.insecure_channel(args.address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(args.ca, "--ca"),
        private_key=_read(args.key, "--key"),
        certificate_chain=_read(args.cert, "--cert"),
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.address, credentials, options=options)


def check(args: argparse.Namespace) -> tuple[bool, str]:
    """(serving, what to print)."""
    try:
        with _channel(args) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as error:
        return False, f"health check failed: {error.code().name}: {error.details()}"
    except OSError as error:
        return False, f"health check failed: {error}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="o2u-healthcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="host:port of the server")
    parser.add_argument("--service", default="", help="health service name ('' is the whole server)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca", help="PEM CA bundle to verify the server (implies --tls)")
    parser.add_argument("--cert", help="PEM client certificate for mutual TLS (implies --tls)")
    parser.add_argument("--key", help="PEM private key of --cert")
    parser.add_argument("--server-name", help="expected name in the server certificate")
    args = parser.parse_args(argv)
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    serving, text = check(args)
    print(text, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
