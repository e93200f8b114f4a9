import time

import pytest

from cache.errors import StoreUnavailableError
from cache.retry import RetryPolicy, call_with_retry


class Flaky:
    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def test_transient_errors_are_retried_until_success() -> None:
    fn = Flaky(3, ConnectionError("reset"))
    assert (
        call_with_retry(fn, RetryPolicy(total_s=5, initial_backoff_s=0.01), (ConnectionError,), "op") == "ok"
    )
    assert fn.calls == 4


def test_the_budget_bounds_the_time_then_store_unavailable() -> None:
    fn = Flaky(10**9, ConnectionError("refused"))
    policy = RetryPolicy(total_s=0.3, initial_backoff_s=0.01, max_backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="refused") as info:
        call_with_retry(fn, policy, (ConnectionError,), "op")
    assert 0.3 <= time.monotonic() - t0 < 0.5
    assert isinstance(info.value.__cause__, ConnectionError)
    assert fn.calls > 3  # backoff doubles but is capped, so it kept trying


def test_other_errors_are_not_retried() -> None:
    fn = Flaky(1, ValueError("bad request"))
    with pytest.raises(ValueError):
        call_with_retry(fn, RetryPolicy(), (ConnectionError,), "op")
    assert fn.calls == 1


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(initial_backoff_s=0)
    with pytest.raises(ValueError):
        RetryPolicy(initial_backoff_s=2, max_backoff_s=1)
