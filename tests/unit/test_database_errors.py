"""The one translation of database failures (usersvc.adapters.database_errors)."""

from __future__ import annotations

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy import exc as sa_exc

from usersvc.adapters.database_errors import translate_database_errors
from usersvc.domain.errors import DatabaseUnavailable, EmailAlreadyExists, UserNotFound

EMAIL_TAKEN = {"uq_users_lower_email": EmailAlreadyExists}


class DriverError(Exception):
    def __init__(self, sqlstate: str, constraint_name: str | None = None) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate
        self.constraint_name = constraint_name


def violation(constraint_name: str) -> sa_exc.IntegrityError:
    return sa_exc.IntegrityError("INSERT ...", {}, DriverError("23505", constraint_name))


def test_a_violation_of_a_named_constraint_becomes_its_domain_error_chained() -> None:
    error = violation("uq_users_lower_email")
    with pytest.raises(EmailAlreadyExists) as caught, translate_database_errors(EMAIL_TAKEN):
        raise error
    assert caught.value.__cause__ is error


def test_a_violation_raised_by_the_driver_itself_is_matched_by_its_constraint_too() -> None:
    # The lanes (usersvc.adapters.pooled_driver) call asyncpg directly.
    error = asyncpg.exceptions.PostgresError.new(
        {"C": "23505", "M": "duplicate key", "n": "uq_users_lower_email"}
    )
    with pytest.raises(EmailAlreadyExists) as caught, translate_database_errors(EMAIL_TAKEN):
        raise error
    assert caught.value.__cause__ is error


def test_a_violation_of_another_constraint_passes_unchanged() -> None:
    error = violation("pk_users")
    with pytest.raises(sa_exc.IntegrityError) as caught, translate_database_errors(EMAIL_TAKEN):
        raise error
    assert caught.value is error


def test_a_lost_connection_becomes_database_unavailable() -> None:
    error = sa_exc.DBAPIError("SELECT 1", {}, DriverError("08006"))
    with pytest.raises(DatabaseUnavailable) as caught, translate_database_errors():
        raise error
    assert caught.value.__cause__ is error


def test_a_refused_connect_becomes_database_unavailable() -> None:
    with pytest.raises(DatabaseUnavailable), translate_database_errors():
        raise ConnectionRefusedError("connect")


def test_domain_errors_and_bugs_pass_unchanged() -> None:
    with pytest.raises(UserNotFound), translate_database_errors(EMAIL_TAKEN):
        raise UserNotFound()
    with pytest.raises(sa_exc.DBAPIError), translate_database_errors():
        raise sa_exc.DBAPIError("SELECT", {}, DriverError("42601"))
