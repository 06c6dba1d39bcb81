"""Completion webhooks: the submit-time check of a job's webhook URL, the signed CloudEvent a
finished job sends, and the deliverer thread that sends the queued events (`webhook_store`).

A webhook URL must be https (plain http only to a loopback address, when the operator allows it for
tests) and must match the server's allow-list (`webhook_allowed_urls`: URL prefixes, or host names with an
optional port);
an empty list disables webhooks. The server so never posts to an address a caller picked alone.

Each event is a CloudEvents 1.0 structured-mode JSON document, POSTed with
`Content-Type: application/cloudevents+json` and `O2U-Signature: t=<unix seconds>,v1=<hex>`, where
the hex is HMAC-SHA256 under the server's webhook secret of `<t>.<body>` (docs/api.md shows how a
receiver checks it). Redirects are not followed and https certificates are verified. A 2xx answer
delivers the event; anything else (another status, a timeout, no connection) is retried with
exponential backoff up to `webhook_max_attempts`, each attempt recorded on the job. Sending runs
on its own threads, so a receiver that is down never slows a job, and the queue is in the job store,
so deliveries pending at a restart resume after it. At most PER_DESTINATION of a replica's SENDERS
attempts go to one destination (scheme, host and port) at once, so a receiver that answers slowly
delays its own events, not every other receiver's.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import queue
import socket
import ssl
import threading
import time
from collections import Counter
from urllib.parse import unquote, urlsplit

from o2u_server.domain import WebhookAttempt
from o2u_server.errors import FailedPrecondition, InvalidArgument, ServiceError
from o2u_server.jobs.store import JobStore
from o2u_server.jobs.webhook_store import Due
from o2u_server.metrics import ServerMetrics
from o2u_server.settings import Settings

__all__ = [
    "MAX_URL_CHARS",
    "OUTCOMES",
    "WebhookDeliverer",
    "check_webhook_url",
    "read_webhook_secret",
    "sign",
]

logger = logging.getLogger(__name__)

MAX_URL_CHARS = 2048
OUTCOMES = ("delivered", "http_error", "timeout", "network_error", "not_allowed")
SIGNATURE_HEADER = "O2U-Signature"
EVENT_SOURCE = "o2u-server"
_POLL_SECONDS = 0.5
SENDERS = 4  # attempts under way at once per replica
PER_DESTINATION = SENDERS // 2  # of those, to one destination (webhook_store.claim's `excluding`)
_MAX_BACKOFF_SECONDS = 3600.0


def destination(url: str) -> str:
    """The scheme and host (with its port) of a webhook URL, as the URL spells them: what
    PER_DESTINATION counts ("https://hooks.example:8443" of "https://hooks.example:8443/o2u")."""
    start = url.find("://") + 3 if "://" in url else 0
    ends = [found for mark in "/?#" if (found := url.find(mark, start)) >= 0]
    return url[: min(ends, default=len(url))]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_DEFAULT_PORTS = {"https": 443, "http": 80}


def _host_entry(entry: str) -> tuple[str, int | None]:
    """A host-name entry's host and port: `hooks.example.com` (the URL scheme's default port) or
    `hooks.example.com:8443`; an IPv6 address in brackets (`[::1]:8443`). Port None: not a number."""
    parts = urlsplit(f"//{entry}")
    try:
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "", None


def _allowed(url: str, host: str, allow_list: list[str]) -> bool:
    """Whether `url` matches an entry: the same scheme, host and port and a path under the entry's
    path for a URL prefix (so `https://a.example` never matches `https://a.example.evil/`), or the
    same host and port for a host name (`hooks.example.com` admits only the scheme's default port,
    so a receiver's host never opens its other ports; `hooks.example.com:8443` admits that one)."""
    parts = urlsplit(url)
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    for entry in allow_list:
        if "://" not in entry:
            entry_host, entry_port = _host_entry(entry)
            if host == entry_host and port == (entry_port or _DEFAULT_PORTS.get(parts.scheme)):
                return True
            continue
        allowed = urlsplit(entry)
        if (parts.scheme, parts.netloc.lower()) != (allowed.scheme, allowed.netloc.lower()):
            continue
        if (parts.path or "/").startswith(allowed.path or "/"):
            return True
    return False


def _has_dot_segments(path: str) -> bool:
    return any(segment in (".", "..") for segment in unquote(path).split("/"))


def check_webhook_url(url: str, settings: Settings) -> None:
    """FAILED_PRECONDITION when webhooks are disabled; INVALID_ARGUMENT for a URL not allowed."""
    field = "webhook.url"
    if not settings.webhook_allowed_urls:
        raise FailedPrecondition(
            "this server sends no webhooks (its webhook allow-list is empty); submit without webhook "
            "or ask the operator to allow your receiver",
            reason="WEBHOOKS_DISABLED",
        )
    if len(url) > MAX_URL_CHARS or any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise InvalidArgument(
            f"webhook.url must be at most {MAX_URL_CHARS} characters without spaces or control characters",
            reason="INVALID_WEBHOOK_URL",
            field=field,
        )
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        parts.port  # noqa: B018  (raises for a port that is not a number)
    except ValueError:
        host = ""
    secure = parts.scheme == "https" or (
        parts.scheme == "http" and settings.webhook_allow_http_loopback and _is_loopback(host)
    )
    if (
        not secure
        or not host
        or parts.username is not None
        or parts.password is not None
        or _has_dot_segments(parts.path)
    ):
        raise InvalidArgument(
            "webhook.url must be an https:// URL with a host, no user name or password and no '.' or "
            "'..' path segments",
            reason="INVALID_WEBHOOK_URL",
            field=field,
        )
    if not _allowed(url, host, settings.webhook_allowed_urls):
        raise InvalidArgument(
            "webhook.url is not on this server's webhook allow-list; use an allowed receiver or ask the "
            "operator to add yours",
            reason="WEBHOOK_URL_NOT_ALLOWED",
            field=field,
        )


def read_webhook_secret(settings: Settings) -> bytes | None:
    """The signing key (None when webhooks are off); ValueError naming the setting if unusable."""
    path = settings.webhook_secret_file
    if not settings.webhook_allowed_urls or path is None:
        return None
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"webhook_secret_file {path}: cannot read it ({exc.strerror})") from None
    if not secret:
        raise ValueError(f"webhook_secret_file {path} is empty")
    return secret


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The O2U-Signature header value of `body` sent at `timestamp`."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1e6):06d}Z"


class WebhookDeliverer:
    """Sends this replica's share of the queued webhook events: one thread claims due deliveries
    while one of SENDERS sender threads is free, skipping those to a destination with
    PER_DESTINATION attempts under way, so a receiver that answers slowly (an attempt's exchange
    ends by webhook_timeout_seconds after it starts) holds at most PER_DESTINATION senders, and
    the others go on sending every other receiver's events."""

    def __init__(self, settings: Settings, store: JobStore, metrics: ServerMetrics) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics
        self._secret = b""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._free = threading.Semaphore(SENDERS)
        self._claimed: queue.SimpleQueue[Due | None] = queue.SimpleQueue()  # None: stop
        self._senders: list[threading.Thread] = []
        self._under_way: Counter[str] = Counter()  # attempts being sent, by destination
        self._under_way_lock = threading.Lock()

    def start(self) -> None:
        secret = read_webhook_secret(self._settings)
        if secret is None:
            return
        self._secret = secret
        # Daemon threads, as the claiming one: an attempt still running at exit (its claim expires
        # and another replica retries it) must not hold the process up.
        self._senders = [
            threading.Thread(target=self._send_claimed, name=f"o2u-webhook-sender-{n}", daemon=True)
            for n in range(SENDERS)
        ]
        for sender in self._senders:
            sender.start()
        self._thread = threading.Thread(target=self._run, name="o2u-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming, and wait up to webhook_timeout_seconds + 5 s for the attempts under way
        (each ends within the timeout); one still running then leaves its claim to expire."""
        self._stop.set()
        deadline = time.monotonic() + self._settings.webhook_timeout_seconds + 5
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for _ in self._senders:
            self._claimed.put(None)  # the end of the queue, once per sender
        for sender in self._senders:
            sender.join(timeout=max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._free.acquire(timeout=_POLL_SECONDS):
                continue  # every sender is busy
            due = None
            try:
                due = self._claim()
            except Exception:
                logger.exception("webhook delivery loop error; retrying")
            if due is None:
                self._free.release()
                self._stop.wait(_POLL_SECONDS)
                continue
            self._claimed.put(due)

    def _claim(self) -> Due | None:
        hold = self._settings.webhook_timeout_seconds + 30
        with self._under_way_lock:
            busy = [origin for origin, count in self._under_way.items() if count >= PER_DESTINATION]
        due = self._store.webhooks.claim(hold, excluding=busy)  # held on the database's clock
        if due is not None:
            with self._under_way_lock:
                self._under_way[destination(due.url)] += 1
        return due

    def _send_claimed(self) -> None:
        while (due := self._claimed.get()) is not None:
            try:
                self.attempt(due)
            except Exception:
                logger.exception("webhook delivery failed to record; its claim expires and it is retried")
            finally:
                origin = destination(due.url)
                with self._under_way_lock:
                    self._under_way[origin] -= 1
                    if not self._under_way[origin]:
                        del self._under_way[origin]
                self._free.release()

    def attempt(self, due: Due) -> None:
        """Send one claimed delivery and record the attempt."""
        try:
            check_webhook_url(due.url, self._settings)  # the allow-list may have shrunk since submit
        except ServiceError:
            status, outcome, error = 0, "not_allowed", "the URL is no longer on this server's allow-list"
        else:
            status, outcome, error = self._send(due.url, self._event(due))
        now = time.time()
        final = outcome in ("delivered", "not_allowed") or due.attempt >= self._settings.webhook_max_attempts
        retry_in = None
        if not final:
            backoff = self._settings.webhook_retry_seconds * 2 ** (due.attempt - 1)
            retry_in = min(backoff, _MAX_BACKOFF_SECONDS)
        attempt = WebhookAttempt(due.attempt, now, status, outcome, error, final)
        self._store.webhooks.record(due, attempt, retry_in)
        self._metrics.webhook_deliveries.labels(outcome=outcome).inc()
        logger.info(
            "webhook attempt",
            extra={"job_id": due.job_id, "attempt": due.attempt, "outcome": outcome, "http_status": status},
        )

    def _event(self, due: Due) -> bytes:
        """The CloudEvent of the delivery's job, as sent (the same id on every attempt)."""
        job = self._store.get_job(due.job_id)
        data: dict[str, object] = {
            "job_id": job.job_id,
            "state": job.state.value.upper(),
            "display_name": job.spec.display_name,
        }
        if job.error is not None:
            data["error"] = {"reason": job.error.reason, "message": job.error.message}
        if job.state.value == "succeeded":
            summary = self._store.results.summary(job.job_id)
            data["summary"] = {
                "num_samples": summary.num_samples,
                "num_classes": summary.num_classes,
                "num_suspected": summary.num_suspected,
                "estimated_noise_rate": summary.estimated_noise_rate,
            }
        event = {
            "specversion": "1.0",
            "id": due.delivery_id,
            "source": EVENT_SOURCE,
            "type": due.event_type,
            "subject": job.job_id,
            "time": _rfc3339(job.end_time or due.create_time),
            "datacontenttype": "application/json",
            "data": data,
        }
        return json.dumps(event, sort_keys=True).encode()

    def _send(self, url: str, body: bytes) -> tuple[int, str, str]:
        """POST the event once: (HTTP status or 0, outcome, error text)."""
        parts = urlsplit(url)
        timeout = self._settings.webhook_timeout_seconds
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            context = ssl.create_default_context()  # verifies the certificate and the host name
            connection = http.client.HTTPSConnection(parts.netloc, timeout=timeout, context=context)
        else:
            connection = http.client.HTTPConnection(parts.netloc, timeout=timeout)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        headers = {
            "Content-Type": "application/cloudevents+json",
            SIGNATURE_HEADER: sign(self._secret, int(time.time()), body),
            "User-Agent": "o2u-server-webhooks",
        }
        # The socket timeout bounds each read, not the attempt: a receiver that sends a byte now and
        # then would hold its sender for as long as it likes. At the deadline the socket is shut
        # down, which ends a read in progress.
        # Whichever comes first, the answer read in full or the deadline, decides (under `lock`).
        lock = threading.Lock()
        ended: list[str] = []  # "answered" or "expired"

        def expire() -> None:
            with lock:
                if ended:
                    return
                ended.append("expired")
            sock = connection.sock  # read once: close() may set it to None meanwhile
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        deadline = threading.Timer(timeout, expire)
        deadline.daemon = True
        deadline.start()
        try:
            connection.connect()  # its own timeout (per address tried) started with the deadline
            with lock:
                if ended:
                    raise TimeoutError
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read(64 * 1024)
            with lock:
                if not ended:
                    ended.append("answered")
        except (OSError, http.client.HTTPException) as exc:
            if ended == ["expired"] or isinstance(exc, TimeoutError):
                return 0, "timeout", f"no complete answer within {timeout:g} s"
            return 0, "network_error", type(exc).__name__
        finally:
            deadline.cancel()
            connection.close()
        if ended == ["expired"]:  # the shutdown reads as the end of the answer: it was cut short
            return 0, "timeout", f"no complete answer within {timeout:g} s"
        if 200 <= response.status < 300:
            return response.status, "delivered", ""
        return response.status, "http_error", f"HTTP {response.status}"
