"""Webhooks: every job's ``completed`` event, POSTed as JSON and signed.

Whichever transaction completes a job publishes the completed event, then (when
IMGPIPE_WEBHOOK_URL is set; imgpipe/aftercommit.py) sends the Celery task
``imgpipe.webhook`` with the event's JSON body to the control ``.bulk`` queue: delivery
never holds a database lock or delays a stage, and interactive control work goes first.
The task POSTs the body with

    X-Imgpipe-Timestamp: <unix seconds>
    X-Imgpipe-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>

and retries connection errors, timeouts, 408, 429 and 5xx with the retry policy
(imgpipe/retry.py: exponential backoff, full jitter) up to ``webhook_max_attempts``
deliveries; other 4xx answers are final (the receiver refused
the event). Each attempt is signed with a fresh timestamp, so receivers can reject
anything older than a few minutes. A receiver may see an event more than once: dedupe by
``job_id``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from imgpipe.errors import ConfigError
from imgpipe.retry import RetryPolicy
from imgpipe.settings import Settings

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WebhookResult",
    "deliver",
    "sign",
    "verify",
    "webhook_retry_policy",
]

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-Imgpipe-Timestamp"
SIGNATURE_HEADER = "X-Imgpipe-Signature"
REQUEST_TIMEOUT_S = 5.0
RETRY_STATUSES = frozenset({408, 425, 429})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer (final, not followed): the body is never re-sent elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256 over ``<timestamp>.<body>``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(
    secret: str, timestamp: str, body: bytes, signature: str, max_age_s: float = 300.0
) -> bool:
    """What a receiver does: constant-time compare, and refuse stale timestamps."""
    try:
        age_s = abs(time.time() - float(timestamp))
    except ValueError:
        return False
    return age_s <= max_age_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


@dataclass(frozen=True)
class WebhookResult:
    delivered: bool
    retry: bool
    detail: str


def _target(settings: Settings) -> tuple[str, str]:
    url, secret = settings.webhook_url, settings.webhook_secret
    if not url:
        raise ConfigError("IMGPIPE_WEBHOOK_URL is not set on the orchestrator; nothing to send")
    if urlparse(url).scheme not in ("http", "https"):
        raise ConfigError(f"IMGPIPE_WEBHOOK_URL {url!r} must be an http:// or https:// URL")
    if not secret:
        raise ConfigError(
            "IMGPIPE_WEBHOOK_URL is set but IMGPIPE_WEBHOOK_SECRET is not; receivers verify "
            "the HMAC signature, so set a shared secret on the orchestrator"
        )
    return url, secret


def deliver(settings: Settings, body: str, timeout_s: float = REQUEST_TIMEOUT_S) -> WebhookResult:
    """One signed POST. Raises ConfigError for a missing or unusable URL or secret."""
    url, secret = _target(settings)
    data = body.encode()
    timestamp = str(int(time.time()))
    request = urllib.request.Request(
        url,
        data=data,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "imgpipe-webhook/1",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(secret, timestamp, data),
        },
    )
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            return WebhookResult(True, False, f"HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        retry = exc.code in RETRY_STATUSES or exc.code >= 500
        return WebhookResult(False, retry, f"HTTP {exc.code} {exc.reason}")
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return WebhookResult(False, True, f"cannot reach {url}: {reason}")


def webhook_retry_policy(settings: Settings) -> RetryPolicy:
    """Backoff from IMGPIPE_RETRY_BACKOFF_S, capped at IMGPIPE_RETRY_BACKOFF_MAX_S and at
    300 s (below the broker's visibility timeout, so a waiting retry is never delivered
    twice), ``webhook_max_attempts`` deliveries."""
    base_s = max(settings.retry_backoff_s, 0.1)
    return RetryPolicy(
        base_s=base_s,
        cap_s=max(base_s, min(settings.retry_backoff_max_s, 300.0)),
        max_attempts=settings.webhook_max_attempts,
    )
