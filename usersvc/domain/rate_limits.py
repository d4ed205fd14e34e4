"""Token bucket arithmetic, the same for every limiter
(usersvc.adapters.ratelimit) and mirrored by its Redis script.

A bucket holds at most ``burst`` tokens and gains ``per_second`` of them
every second; a call takes one, and a call that finds less than one is
refused with the time until one will be there. An absent bucket is a full
one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Rate:
    """A bucket's refill rate (tokens a second) and size."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if self.per_second <= 0 or self.burst < 1:
            raise ValueError("a rate needs per_second > 0 and burst >= 1")

    @property
    def refill_seconds(self) -> float:
        """How long an empty bucket takes to fill up."""
        return self.burst / self.per_second


def take_token(rate: Rate, tokens: float, elapsed: float) -> tuple[float, float]:
    """One call against a bucket that held ``tokens`` ``elapsed`` seconds
    ago: (tokens left now, seconds to wait). The wait is 0.0 when the call
    took a token; otherwise nothing was taken and the wait is how long
    until a whole token is there. Raises nothing."""
    available = min(float(rate.burst), tokens + max(elapsed, 0.0) * rate.per_second)
    if available >= 1.0:
        return available - 1.0, 0.0
    return available, (1.0 - available) / rate.per_second


def rate_or_none(per_second: float, burst: int) -> Rate | None:
    """The Rate of a setting pair; None when ``per_second`` is 0 (limit off).
    Raises ValueError for a negative rate or a burst below 1."""
    if per_second == 0:
        return None
    return Rate(per_second, burst)
