"""The shared retry/deadline policy (cloudckpt.storage.retry), with a fake clock: no real sleeping."""

from __future__ import annotations

import asyncio
import errno

import pytest

from cloudckpt.errors import BackendError
from cloudckpt.storage import Deadline, RetryPolicy
from cloudckpt.storage.retry import Retrier, RetryDeadlineExceeded, classify_network_error


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def _retrier(clock: FakeClock, **policy: float) -> Retrier:
    return Retrier(
        RetryPolicy(**policy),  # type: ignore[arg-type]
        classify_network_error,
        sleep=clock.sleep,
        clock=clock,
    )


def test_transient_errors_are_retried_and_counted() -> None:
    clock = FakeClock()
    r = _retrier(clock, stall_timeout=60)
    fails = [ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("slow")]

    def call() -> str:
        if fails:
            raise fails.pop(0)
        return "ok"

    assert r.call(call, what="s3://b/k") == "ok"
    assert r.counter.total == 2
    assert r.counter.snapshot() == {"connection": 1, "timeout": 1}


def test_fatal_error_propagates_at_once_unchanged() -> None:
    clock = FakeClock()
    r = _retrier(clock)
    calls = 0

    def call() -> None:
        nonlocal calls
        calls += 1
        raise PermissionError(errno.EACCES, "AccessDenied")

    with pytest.raises(PermissionError, match="AccessDenied"):
        r.call(call, what="s3://b/k")
    assert calls == 1
    assert r.counter.total == 0


def test_persistent_failure_stops_within_stall_timeout() -> None:
    clock = FakeClock()
    r = _retrier(clock, stall_timeout=10, initial_backoff=0.5, max_backoff=2)

    def call() -> None:
        clock.now += 0.1  # each request takes a little time
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    with pytest.raises(RetryDeadlineExceeded) as info:
        r.call(call, what="s3://bucket/key")
    assert clock.now <= 10.0 + 0.1  # the stall timeout, plus the one request in flight at it
    msg = str(info.value)
    assert "s3://bucket/key" in msg and "stall timeout 10 s" in msg and "reset" in msg
    assert isinstance(info.value, BackendError) and isinstance(info.value, TimeoutError)
    assert isinstance(info.value.__cause__, ConnectionResetError)


def test_progress_on_a_shared_deadline_keeps_a_long_operation_alive() -> None:
    clock = FakeClock()
    r = _retrier(clock, stall_timeout=5, initial_backoff=0.1, max_backoff=0.2)
    deadline = r.deadline()
    # 100 requests of 1 s each: 100 s in all, far past the 5 s stall timeout, all succeed.
    for _ in range(100):
        clock.now += 1.0
        r.call(lambda: None, what="part", deadline=deadline)
    assert clock.now >= 100 and not deadline.expired


def test_max_attempts_caps_retries() -> None:
    clock = FakeClock()
    r = _retrier(clock, max_attempts=3, initial_backoff=0)
    calls = 0

    def call() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    with pytest.raises(RetryDeadlineExceeded, match="max_attempts=3"):
        r.call(call, what="gs://b/k")
    assert calls == 3


def test_backoff_is_jittered_and_capped() -> None:
    p = RetryPolicy(initial_backoff=1, max_backoff=4, multiplier=2)
    samples = [p.backoff(10) for _ in range(200)]
    assert all(0 <= s <= 4 for s in samples)
    assert len(set(samples)) > 100  # jitter: not one fixed value


def test_async_call_retries() -> None:
    r = Retrier(RetryPolicy(initial_backoff=0.001), classify_network_error)
    fails = [ConnectionResetError(errno.ECONNRESET, "reset")]

    async def call() -> int:
        if fails:
            raise fails.pop()
        return 7

    assert asyncio.run(r.acall(call, what="k")) == 7
    assert r.counter.total == 1


def test_policy_from_options_pops_its_keys_and_rejects_bad_values() -> None:
    opts = {"retry_stall_timeout": "12", "retry_max_attempts": 4, "endpoint_url": "http://x"}
    p = RetryPolicy.from_options(opts)
    assert (p.stall_timeout, p.max_attempts) == (12.0, 4)
    assert opts == {"endpoint_url": "http://x"}
    with pytest.raises(ValueError, match="retry_stall_timeout"):
        RetryPolicy.from_options({"retry_stall_timeout": "soon"})
    with pytest.raises(ValueError, match="stall_timeout must be > 0"):
        RetryPolicy(stall_timeout=0)


def test_deadline_remaining() -> None:
    clock = FakeClock()
    d = Deadline(3, clock=clock)
    clock.now = 2
    assert d.remaining() == 1
    d.progress()
    assert d.remaining() == 3
    clock.now = 6
    assert d.expired
