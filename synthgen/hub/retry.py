"""Backoff for the Hub calls ``huggingface_hub`` sends only once (the commit, tag creation, info).

``huggingface_hub`` retries preupload, LFS upload and listing calls itself, but sends the commit
once: a single 429/5xx or dropped connection there fails the whole ``upload_folder``. The caller
decides whether a retry is safe (see :mod:`synthgen.hub.publish`); this module only says which
errors are transient and how long to wait, honouring the server's ``Retry-After``.
"""

from __future__ import annotations

import email.utils
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Optional, TypeVar

log = logging.getLogger("synthgen.hub")

T = TypeVar("T")
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx2 from 2.x on)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


TRANSPORT_ERRORS = _transport_errors()


def status_of(exc: BaseException) -> Optional[int]:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def is_transient(exc: BaseException) -> bool:
    """A rate limit, a server error, a timeout or a dropped connection: worth trying again."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # huggingface_hub wraps some errors
        seen.add(id(exc))
        status = status_of(exc)
        if status is not None:
            return status in RETRY_STATUS
        if isinstance(exc, TRANSPORT_ERRORS):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def retry_after(exc: BaseException) -> Optional[float]:
    """Seconds the server asked us to wait (``Retry-After``: delay-seconds or an HTTP date)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


@dataclass(frozen=True)
class Backoff:
    """``attempts`` tries in all; waits ``base``, 2x``base``, ... up to ``cap`` seconds, or what the
    server's ``Retry-After`` says (up to ``max_retry_after``)."""

    attempts: int = 6
    base: float = 2.0
    cap: float = 60.0
    max_retry_after: float = 600.0

    def delay(self, attempt: int, exc: BaseException) -> float:
        asked = retry_after(exc)
        if asked is not None:
            return min(asked, self.max_retry_after)
        return min(self.cap, self.base * 2**attempt)


def with_retries(
    call: Callable[[], T],
    backoff: Backoff,
    what: str,
    before_retry: Optional[Callable[[BaseException], Optional[T]]] = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``call``, retrying transient errors with ``backoff``.

    After each wait, ``before_retry(exc)`` may return a result instead of retrying (e.g. the
    change already landed although its response was lost) or raise to stop.
    """
    for attempt in range(backoff.attempts):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - filtered just below
            if not is_transient(exc) or attempt == backoff.attempts - 1:
                raise
            wait = backoff.delay(attempt, exc)
            log.warning("%s failed (%s); retrying in %.1f s [%d/%d]", what, _short(exc), wait, attempt + 1,
                        backoff.attempts - 1)
            sleep(wait)
            if before_retry is not None:
                landed = before_retry(exc)
                if landed is not None:
                    return landed
    raise AssertionError("unreachable")  # pragma: no cover


def _short(exc: BaseException) -> str:
    status = status_of(exc)
    return f"HTTP {status}" if status is not None else type(exc).__name__
