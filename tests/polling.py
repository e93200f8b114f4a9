"""Waiting on state, never on a guessed sleep: the tests' one way to wait for another thread."""

from __future__ import annotations

import time
from collections.abc import Callable


def poll_until(condition: Callable[[], object], timeout_s: float = 30.0) -> None:
    """Return once `condition()` is true; fail the test if it is not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.005)
