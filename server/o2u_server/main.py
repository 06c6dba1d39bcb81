"""`o2u-server`: run the server from O2U_* settings, log JSON lines to stderr, drain on SIGTERM.

On SIGTERM or SIGINT the server reports NOT_SERVING, refuses new jobs with UNAVAILABLE, asks the
running job to checkpoint and stop (it stays in the store and resumes on the next start) and exits
within `shutdown_grace_seconds`: a worker that has not stopped by then is not waited for (the
process ends, which releases the state-directory lock for the next server). A second signal during
the drain exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from pydantic import ValidationError

from o2u_server import __version__
from o2u_server.api.security import check_security_files
from o2u_server.api.tenancy import principal_interceptors
from o2u_server.settings import Settings

__all__ = ["JsonFormatter", "configure_logging", "main"]

logger = logging.getLogger("o2u_server")

# Attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field.
_STANDARD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


async def _serve(settings: Settings) -> tuple[int, bool]:
    """Serve until SIGTERM/SIGINT; returns (exit status, whether every worker stopped in time)."""
    # Imported here, after logging is set up: these import torch, which takes a few seconds.
    from o2u_engine import configure_cpu_threads
    from o2u_server.app import create_server

    server = create_server(settings)
    cpu_threads = None
    if "cpu" in server.devices:
        # Size torch's thread pool to the CPUs this container may use, not the host's core count.
        cpu_threads = configure_cpu_threads(settings.cpu_threads)
    port = await server.start()
    logger.info(
        "o2u-server %s listening",
        __version__,
        extra={"port": port, "metrics_port": server.metrics_port, "cpu_threads": cpu_threads},
    )
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    logger.info("shutting down", extra={"grace_seconds": settings.shutdown_grace_seconds})
    for sig in signals:
        # A second signal means "now": the default handler ends the process.
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_DFL)
    await server.stop(settings.shutdown_grace_seconds)
    return 0, server.stopped_cleanly


def _check_webhook_secret(settings: Settings) -> None:
    """The webhook signing key must be readable and non-empty when webhooks are on."""
    path = settings.webhook_secret_file
    if settings.webhook_allowed_urls and path is not None and not path.read_bytes().strip():
        raise ValueError(f"webhook_secret_file {path} is empty")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="o2u-server",
        description="O2U-Net noise-scoring gRPC server. Configured by O2U_* environment variables "
        "and an optional O2U_CONFIG_FILE (YAML, JSON or TOML); see docs/operations.md.",
    )
    parser.add_argument("--version", action="version", version=f"o2u-server {__version__}")
    parser.parse_args(argv)
    # Idle OpenMP workers sleep instead of spinning: with spinning, a CPU shared with other busy
    # processes made small-model training tens of times slower. Read once, when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        settings = Settings()
        check_security_files(settings)  # SecurityConfigError is a ValueError naming the setting
        _check_webhook_secret(settings)  # an unreadable file is an OSError
        principal_interceptors(settings)  # reads and checks the tokens file
    except (ValidationError, ValueError, OSError) as exc:
        print(f"o2u-server: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        code, clean = asyncio.run(_serve(settings))
    except Exception:
        logger.exception("o2u-server failed")
        return 1
    if not clean:
        # Interpreter exit would wait for the stuck worker's threads; the grace is over, so end now.
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
