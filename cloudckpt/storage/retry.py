"""One retry and deadline policy for every cloud backend (S3, GCS, ...).

Store-agnostic: a backend supplies a *classifier* that says whether an exception is worth
retrying; this module supplies the rest:

- :class:`RetryPolicy` — exponential backoff with full jitter, an optional attempt cap, and a
  *stall timeout*: an operation fails once it has made no progress for that many seconds.
- :class:`Deadline` — the clock of one operation (a ``write_object``, a ``read_into``, a whole
  save): :meth:`Deadline.progress` restarts the stall clock whenever a request succeeds, so a
  long upload that keeps moving never times out, and a store that answers 503 forever fails in
  ``stall_timeout`` seconds instead of hanging.
- :class:`RetryCounter` — thread-safe counts of retries by reason, for log lines and stats.
- :class:`Retrier` — runs a call (sync or async) under the above.

Backends should turn the store client's own retries down (or off) so that this policy, not the
client's, decides how long a failing request is retried.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import BackendError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: HTTP statuses that mean "try again later" on every object store we know.
RETRYABLE_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

#: errno values of transient network failures.
RETRYABLE_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EAGAIN,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETRESET,
    }
)

#: A classifier returns a short reason (``"503"``, ``"reset"``, ``"timeout"``) when the
#: exception is transient and the call should be retried, or ``None`` when it is fatal.
Classifier = Callable[[BaseException], "str | None"]


def is_retryable_status(status: int | None) -> bool:
    """Whether an HTTP status means the request may succeed if sent again."""
    return status is not None and int(status) in RETRYABLE_HTTP_STATUSES


def classify_network_error(exc: BaseException) -> str | None:
    """The reason for a transient transport failure (reset, refused, timeout), else ``None``.

    Backends call this from their own classifier for exceptions that are not store answers.
    """
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, ConnectionError):
        return "connection"
    if isinstance(exc, OSError) and exc.errno in RETRYABLE_ERRNOS:
        return errno.errorcode.get(exc.errno or 0, "oserror").lower()
    # aiohttp / botocore / urllib3 transport errors, matched by name so that this module
    # needs none of them installed.
    for cls in type(exc).__mro__:
        name = cls.__name__
        if name in (
            "ServerDisconnectedError",
            "ClientConnectionError",
            "ClientPayloadError",
            "ClientOSError",
            "ServerTimeoutError",
            "EndpointConnectionError",
            "ConnectionClosedError",
            "ReadTimeoutError",
            "ConnectTimeoutError",
            "IncompleteReadError",
            "ResponseStreamingError",
            "ProtocolError",
        ):
            return "connection"
    return None


class RetryDeadlineExceeded(BackendError, TimeoutError):
    """An operation made no progress for its stall timeout (or ran out of attempts)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How to retry one request and when to give up on the operation it belongs to.

    ``stall_timeout``: seconds without progress after which the operation fails.
    ``max_attempts``: attempts per request (``None``: limited by the stall timeout only).
    Backoff before attempt ``n`` (``n >= 1``) is uniform in
    ``[0, min(max_backoff, initial_backoff * multiplier**(n-1))]`` ("full jitter").
    ``request_timeout``: seconds one request may take; backends hand it to their client as
    its connect/read timeout, so a hung connection becomes a retryable timeout.
    """

    stall_timeout: float = 60.0
    max_attempts: int | None = None
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    request_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be > 0 seconds, got {self.stall_timeout}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 or None, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError(
                "backoff must be >= 0 and multiplier >= 1, got "
                f"initial_backoff={self.initial_backoff}, max_backoff={self.max_backoff}, "
                f"multiplier={self.multiplier}"
            )
        if self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {self.request_timeout}")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to sleep before retry number ``attempt`` (1 for the first retry)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** max(attempt - 1, 0))
        return (rng or random).uniform(0.0, cap)

    @staticmethod
    def option_names() -> tuple[str, ...]:
        """The storage options :meth:`from_options` reads."""
        return tuple(RETRY_OPTION_FIELDS)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> RetryPolicy:
        """A policy from storage options; pops ``retry_*`` keys so the client never sees them.

        Keys: ``retry_stall_timeout``, ``retry_max_attempts``, ``retry_initial_backoff``,
        ``retry_max_backoff``, ``retry_request_timeout``.
        """
        kwargs: dict[str, Any] = {}
        for key, name in RETRY_OPTION_FIELDS.items():
            if key in options:
                value = options.pop(key)
                try:
                    kwargs[name] = (
                        None
                        if value is None
                        else (int(value) if name == "max_attempts" else float(value))
                    )
                except (TypeError, ValueError):
                    raise ValueError(
                        f"storage option {key!r} must be a number, got {value!r}"
                    ) from None
        return cls(**kwargs)


RETRY_OPTION_FIELDS = {
    "retry_stall_timeout": "stall_timeout",
    "retry_max_attempts": "max_attempts",
    "retry_initial_backoff": "initial_backoff",
    "retry_max_backoff": "max_backoff",
    "retry_multiplier": "multiplier",
    "retry_request_timeout": "request_timeout",
}
RETRY_OPTIONS = frozenset(RETRY_OPTION_FIELDS)
"""The storage options :meth:`RetryPolicy.from_options` takes."""


class Deadline:
    """The clock of one operation: fails it after ``stall_timeout`` seconds without progress.

    Shared by every request of the operation (threads or tasks); each success calls
    :meth:`progress`. ``clock`` is injectable for tests.
    """

    def __init__(
        self, stall_timeout: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stall_timeout = float(stall_timeout)
        self._clock = clock
        self.started = clock()
        self._last = self.started

    def progress(self) -> None:
        """Something succeeded: restart the stall clock."""
        self._last = self._clock()

    def remaining(self) -> float:
        """Seconds left before the operation counts as stalled (never negative)."""
        return max(0.0, self._last + self.stall_timeout - self._clock())

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def elapsed(self) -> float:
        return self._clock() - self.started


class RetryCounter:
    """Thread-safe retry counts by reason; ``total`` for a log line, ``snapshot`` for detail."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, reason: str) -> None:
        with self._lock:
            self._counts[reason] += 1

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def __repr__(self) -> str:
        return f"RetryCounter({self.snapshot()})"


class Retrier:
    """Runs calls under a :class:`RetryPolicy`, a classifier, and a shared :class:`RetryCounter`.

    ``call``/``acall`` take a ``what`` (the URI or key, for messages) and optionally a
    :class:`Deadline` shared with other calls of the same operation; without one, each call
    gets its own. A fatal exception propagates unchanged at once. A transient one is retried
    after a jittered backoff until it succeeds, attempts run out, or the deadline passes; then
    :class:`RetryDeadlineExceeded` is raised (chained to the last error) naming ``what``, the
    attempts and the time spent.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        classify: Classifier,
        counter: RetryCounter | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.classify = classify
        self.counter = counter if counter is not None else RetryCounter()
        self._sleep = sleep
        self._clock = clock

    def deadline(self) -> Deadline:
        """A fresh deadline for one operation under this policy."""
        return Deadline(self.policy.stall_timeout, clock=self._clock)

    def _next_delay(self, exc: BaseException, attempt: int, deadline: Deadline, what: str) -> float:
        """The sleep before the next attempt, or raise if ``exc`` is fatal or time is up."""
        reason = self.classify(exc)
        if reason is None:
            raise exc
        out_of_attempts = (
            self.policy.max_attempts is not None and attempt >= self.policy.max_attempts
        )
        delay = self.policy.backoff(attempt)
        if out_of_attempts or deadline.remaining() <= delay:
            limit = (
                f"max_attempts={self.policy.max_attempts}"
                if out_of_attempts
                else f"stall timeout {deadline.stall_timeout:g} s without progress"
            )
            raise RetryDeadlineExceeded(
                f"{what}: gave up after {attempt} attempts in {deadline.elapsed():.1f} s "
                f"({limit}); last error: {_describe(exc)}. The store is failing or "
                "throttling; retry later, or raise the retry_stall_timeout storage option"
            ) from exc
        self.counter.add(reason)
        logger.info(
            "%s: transient error (%s), retry %d in %.2f s: %s",
            what,
            reason,
            attempt,
            delay,
            _describe(exc),
        )
        return delay

    def call(
        self,
        fn: Callable[[], T],
        *,
        what: str,
        deadline: Deadline | None = None,
    ) -> T:
        """``fn()`` with retries; progress is recorded on ``deadline`` on success."""
        deadline = deadline or self.deadline()
        attempt = 0
        while True:
            attempt += 1
            try:
                result = fn()
            except Exception as exc:
                self._sleep(self._next_delay(exc, attempt, deadline, what))
                continue
            deadline.progress()
            return result

    async def acall(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        what: str,
        deadline: Deadline | None = None,
    ) -> T:
        """``await fn()`` with retries (``fn`` makes a fresh awaitable per attempt)."""
        deadline = deadline or self.deadline()
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await fn()
            except Exception as exc:
                await asyncio.sleep(self._next_delay(exc, attempt, deadline, what))
                continue
            deadline.progress()
            return result


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(exc).__name__}: {text}"
