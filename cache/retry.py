"""Bounded retries with exponential backoff, kept apart from the stores that use them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from cache.errors import StoreUnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long a store keeps trying before it reports itself unavailable."""

    total_s: float = 10.0  # budget for all attempts of one call, sleeps included
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if self.total_s < 0 or self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(f"need total_s >= 0 and 0 < initial_backoff_s <= max_backoff_s, got {self}")


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    transient: tuple[type[BaseException], ...],
    what: str,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run `fn`, retrying `transient` errors with doubling backoff until `policy.total_s` is spent.

    Then raise StoreUnavailableError chained to the last error. A single attempt can still overrun the
    budget by its own socket timeout, so stores set socket timeouts well below `total_s`.
    """
    deadline = clock() + policy.total_s
    backoff = policy.initial_backoff_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except transient as e:
            left = deadline - clock()
            if left <= 0:
                raise StoreUnavailableError(
                    f"{what} failed {attempt} times over {policy.total_s:.1f} s: {e}; is the store running?"
                ) from e
            logger.warning("%s failed (attempt %s, %.2f s left): %s", what, attempt, left, e)
            time.sleep(min(backoff, left))
            backoff = min(backoff * 2, policy.max_backoff_s)
