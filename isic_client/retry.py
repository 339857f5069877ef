"""The one retry policy for ISIC traffic: 429/5xx + transport errors, Retry-After, capped backoff, jitter."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import requests

log = logging.getLogger(__name__)

MAX_TIMEOUT = 3600.0  # seconds; a longer (connect or read) timeout is a mistake, not a policy


# --------------------------------------------------------------------------- errors
class IsicError(Exception):
    """Base of every error this package raises."""


class IsicApiError(IsicError):
    """The server answered, but not with what we asked for (4xx, or 5xx/429 after all retries)."""

    def __init__(self, status: int, url: str, message: str) -> None:
        self.status, self.url, self.message = status, url, message
        super().__init__(f"HTTP {status} from {url}: {message}")


class IsicTransportError(IsicError):
    """No usable response after all retries (connection refused/reset, timeout, truncated body)."""

    def __init__(self, url: str, attempts: int, cause: BaseException) -> None:
        self.url, self.attempts, self.cause = url, attempts, cause
        super().__init__(f"{type(cause).__name__} for {url} after {attempts} attempt(s): {cause}")


class IsicTimeoutError(IsicTransportError):
    """The server accepted no connection or sent nothing within the (connect, read) timeout."""


class InsecureTokenError(IsicError, ValueError):
    """A token would go over plain http to a host that is not this machine."""


def check_timeout(timeout: object) -> tuple[float, float]:
    """(connect, read) seconds, both finite and in (0, MAX_TIMEOUT]; a single number is used for both.

    requests waits forever on `timeout=None` (and on inf), so a hung server would hang the pipeline."""
    pair = (timeout, timeout) if isinstance(timeout, (int, float)) else timeout
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"timeout must be seconds or a (connect, read) pair of seconds, got {timeout!r}")
    out = []
    for t in pair:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 < t <= MAX_TIMEOUT:
            raise ValueError(f"timeout {timeout!r}: each value must be a finite number of seconds in "
                             f"(0, {MAX_TIMEOUT:g}]")
        out.append(float(t))
    return out[0], out[1]


class TruncatedBody(IsicError):
    """A body shorter (or longer) than its Content-Length / the API's `files.full.size`."""

    def __init__(self, url: str, expected: int, got: int) -> None:
        self.url, self.expected, self.got = url, expected, got
        super().__init__(f"{url}: expected {expected} bytes, got {got}")


# Failures worth another GET: the request is idempotent, so repeating it is always safe.
RETRYABLE_EXCEPTIONS: tuple[type[BaseException], ...] = (
    requests.ConnectionError,  # includes ConnectTimeout
    requests.Timeout,  # ReadTimeout
    requests.exceptions.ChunkedEncodingError,  # urllib3 IncompleteRead: body shorter than Content-Length
    requests.exceptions.ContentDecodingError,
    TruncatedBody,
)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent/garbled."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter; a server's Retry-After wins over the computed delay.

    `sleep` and `rng` are injectable so tests run instantly and deterministically."""

    max_retries: int = 5  # retries after the first attempt
    backoff_base: float = 1.0  # seconds before the first retry (before jitter)
    backoff_cap: float = 30.0  # no computed delay exceeds this
    statuses: tuple[int, ...] = (429, 500, 502, 503, 504)
    retry_after_max: float = 300.0  # trust the server's Retry-After up to this many seconds
    jitter: float = 0.5  # delay drawn uniformly from [d * (1 - jitter), d]
    seed: int | None = 0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)
    rng: random.Random | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff_base < 0 or self.backoff_cap < 0:
            raise ValueError("max_retries, backoff_base and backoff_cap must be >= 0")
        if not all(math.isfinite(x) for x in (self.backoff_base, self.backoff_cap, self.retry_after_max)):
            raise ValueError("backoff_base, backoff_cap and retry_after_max must be finite")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be in [0, 1]")
        if self.rng is None:
            object.__setattr__(self, "rng", random.Random(self.seed))

    def replace(self, **changes: object) -> RetryPolicy:
        """A copy with some fields changed (a fresh RNG unless `rng` is given)."""
        changes.setdefault("rng", None)
        return replace(self, **changes)  # type: ignore[arg-type]

    def backoff(self, attempt: int) -> float:
        """Delay before retry number `attempt + 1` (attempt counts from 0)."""
        d = min(self.backoff_cap, self.backoff_base * (2.0 ** attempt))
        assert self.rng is not None
        # Jitter spreads a thundering herd of workers that all failed at the same moment.
        return d * (1.0 - self.jitter * self.rng.random())

    def delay_for(self, attempt: int, retry_after: str | None = None) -> float:
        """Retry-After (capped at retry_after_max) if the server sent one, else the jittered backoff."""
        ra = parse_retry_after(retry_after)
        if ra is not None:
            return min(ra, self.retry_after_max)
        return self.backoff(attempt)

    def execute(self, send: Callable[[], requests.Response], url: str) -> requests.Response:
        """Call `send` (an idempotent GET) until it returns a non-retryable status or retries run out.

        Returns the last response (the caller decides what a non-2xx means); raises IsicTimeoutError /
        IsicTransportError when the last attempt still failed in transport."""
        attempt = 0
        while True:
            try:
                resp = send()
            except RETRYABLE_EXCEPTIONS as exc:
                if attempt >= self.max_retries:
                    err = IsicTimeoutError if isinstance(exc, requests.Timeout) else IsicTransportError
                    raise err(url, attempt + 1, exc) from exc
                delay = self.backoff(attempt)
                log.warning("%s for %s; retry %d/%d in %.2f s", type(exc).__name__, url, attempt + 1,
                            self.max_retries, delay)
            else:
                if resp.status_code not in self.statuses or attempt >= self.max_retries:
                    return resp
                delay = self.delay_for(attempt, resp.headers.get("Retry-After"))
                log.warning("HTTP %d for %s; retry %d/%d in %.2f s", resp.status_code, url, attempt + 1,
                            self.max_retries, delay)
                resp.close()
            self.sleep(delay)
            attempt += 1


# The named default: 5 retries, 1-2-4-8-16 s (jittered down by up to half), capped at 30 s; Retry-After
# honoured up to 5 min. isic-cli waits far longer (15 retries up to 120 s each); a pipeline run should
# fail within a minute or so per request and report it instead.
ISIC_RETRY = RetryPolicy()
