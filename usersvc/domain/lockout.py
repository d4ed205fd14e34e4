"""Temporary account locks after repeated failed logins: the arithmetic.

The state lives in the users row (failed_login_count, lock_count,
locked_until) so that every replica sees the same count; the repository
applies this policy in one UPDATE statement, and this module says what that
statement must compute (the unit tests' fakes and an integration test hold
the two to the same numbers).

- A wrong password on an account that is not locked counts, once checked
  (a right one never does, however many arrive at once); the failure that
  brings the count to ``max_failures`` locks the account at once. Counting
  is one atomic statement, so concurrent failures on several replicas end
  in exactly the state the same failures one after the other would leave.
  Guesses already being checked when the lock falls are answered, and
  refused even when right: between two locks at most ``max_failures`` plus
  the guesses in flight at that moment are checked (bcrypt's thread pool
  bounds those per replica).
- A lock lasts ``lockout_seconds`` the first time and twice as long on each
  repeat, never longer than ``max_lockout_seconds``.
- While locked, attempts are refused without being counted and do not
  extend the lock.
- A successful login clears everything: the count, the lock and the
  repeat count (so the owner's next mistyping starts again at the first
  length). Without a success the repeat count never decays: an account
  under sustained attack stays at the longest lock.
"""

from __future__ import annotations

from dataclasses import dataclass

# 2**30 times even one second is far beyond any allowed maximum, and capping
# the exponent keeps PostgreSQL's power() from overflowing on an account
# locked many times.
MAX_DOUBLINGS = 30


@dataclass(frozen=True, slots=True)
class LockoutPolicy:
    max_failures: int = 5
    lockout_seconds: int = 60
    max_lockout_seconds: int = 3600

    def __post_init__(self) -> None:
        if self.max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        if not 0 < self.lockout_seconds <= self.max_lockout_seconds:
            raise ValueError("need 0 < lockout_seconds <= max_lockout_seconds")

    def lock_seconds(self, previous_locks: int) -> int:
        """How long the next lock lasts after ``previous_locks`` earlier
        locks since the last successful login. Raises nothing."""
        doublings = min(max(previous_locks, 0), MAX_DOUBLINGS)
        return min(self.lockout_seconds << doublings, self.max_lockout_seconds)
