"""Transient failures, the backoff between tries, and the one loop that retries them."""

from __future__ import annotations

import dataclasses
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from ..._errors import StepLogError

__all__ = ["RetryPolicy", "TransientError", "parse_retry_after", "retrying"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with jitter between tries of a transient failure.

    The n-th wait (n from 0) is drawn uniformly from ``[d/2, d]`` with
    ``d = min(cap, base * 2**n)``; a server's ``Retry-After`` replaces it (at most
    ``max_retry_after`` seconds).
    """

    base: float = 0.25
    cap: float = 10.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before try ``attempt + 1``."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_retry_after))
        d = min(self.cap, self.base * float(2 ** min(attempt, 62)))
        return d / 2 + rand() * d / 2


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class TransientError(Exception):
    """A request that may succeed if tried again (connection error, deadline, 408/429/5xx)."""

    def __init__(self, message: str, *, retry_after: float | None = None, maybe_applied: bool = True) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.maybe_applied = maybe_applied
        """False when the request cannot have reached the server (the connection was refused)."""


async def retrying(
    fn: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    deadline: float,
    what: str,
    server: str,
    on_transient: Callable[[TransientError], None] | None = None,
) -> T:
    """``await fn()``, retried on :class:`TransientError` until ``deadline`` (anyio clock); then a StepLogError.

    ``on_transient`` sees each transient failure before the wait (``create_run`` uses it to
    remember that a run may have been created).
    """
    attempt = 0
    while True:
        try:
            return await fn()
        except TransientError as exc:
            if on_transient is not None:
                on_transient(exc)
            wait = policy.delay(attempt, exc.retry_after)
            attempt += 1
            if anyio.current_time() + wait > deadline:
                raise StepLogError(
                    f"{what}: the MLflow tracking server at {server} did not answer in time "
                    f"({attempt} tries): {exc}. Check that the server is running and the URL is right"
                ) from exc
            await anyio.sleep(wait)
