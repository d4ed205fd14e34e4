"""What an imported row must be: a bcrypt hash the service can verify, and
the fields CreateUser accepts (usersvc.domain.bulk_import,
usersvc.services.bulk_import.validate_row)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import bcrypt
import pytest

from usersvc.domain.bulk_import import ImportedUser, bcrypt_hash_problem
from usersvc.services.bulk_import import ImportRow, ImportRowError, validate_row

# bcrypt.hashpw(b"secret-pass", bcrypt.gensalt(4))
HASH = "$2b$04$Svru9xUp63Tg3ojPEEy/buT7mQ9cR71FGvUmXAJSjrBpPfx/2rjB6"
PASSWORD = b"secret-pass"
ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def clock() -> datetime:
    return NOW


def row(**fields: object) -> ImportRow:
    values: dict[str, object] = {"email": "ann@example.com", "password_hash": HASH}
    values.update(fields)
    return ImportRow(**values)  # type: ignore[arg-type]


def refusal(result: ImportedUser | ImportRowError) -> tuple[str, str]:
    assert isinstance(result, ImportRowError), result
    return result.field, result.reason


def with_char(value: str, index: int, char: str) -> str:
    return value[:index] + char + value[index + 1 :]


# -- bcrypt hashes -----------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["$2a$", "$2b$", "$2y$"])
def test_the_three_bcrypt_variants_are_accepted(prefix: str) -> None:
    assert bcrypt_hash_problem(prefix + HASH[4:]) is None


@pytest.mark.parametrize("cost", ["04", "12", "16"])
def test_costs_from_4_to_16_are_accepted(cost: str) -> None:
    assert bcrypt_hash_problem(HASH[:4] + cost + HASH[6:]) is None


@pytest.mark.parametrize("cost", ["00", "03", "17", "31", "32", "99"])
def test_costs_outside_4_to_16_are_refused(cost: str) -> None:
    problem = bcrypt_hash_problem(HASH[:4] + cost + HASH[6:])
    assert problem == f"bcrypt cost must be 04..16, got {cost}"


@pytest.mark.parametrize(
    "value",
    [
        "$2x$" + HASH[4:],  # the broken crypt_blowfish variant
        "$2$04$" + HASH[7:] + "x",  # no variant letter
        "$3b$" + HASH[4:],
        HASH[:-1],
        HASH + "a",
        "",
        with_char(HASH, 20, "+"),
        with_char(HASH, 20, "-"),
        with_char(HASH, 3, "!"),
        HASH[:4] + "\u0660\u0664" + HASH[6:],  # Arabic-Indic digits "04"
        with_char(HASH, 30, "\u00e9"),
    ],
    ids=[
        "2x",
        "no-variant",
        "3b",
        "59-chars",
        "61-chars",
        "empty",
        "plus",
        "dash",
        "bad-separator",
        "non-ascii-digits",
        "non-ascii-letter",
    ],
)
def test_strings_that_are_not_bcrypt_hashes_are_refused(value: str) -> None:
    assert bcrypt_hash_problem(value) is not None


def test_every_hash_bcrypt_writes_is_accepted() -> None:
    hashes = [bcrypt.hashpw(b"pw-%d" % n, bcrypt.gensalt(4)).decode() for n in range(20)]

    assert [bcrypt_hash_problem(h) for h in hashes] == [None] * 20


@pytest.mark.parametrize("char", ALPHABET)
def test_a_salt_is_accepted_exactly_when_bcrypt_can_use_it(char: str) -> None:
    # The salt's last character carries 4 spare bits; bcrypt refuses a
    # salt with any of them set. Whatever the validator accepts, a login
    # with the right password then verifies.
    salt = bcrypt.gensalt(4).decode()
    candidate = with_char(salt, len(salt) - 1, char)
    try:
        stored = bcrypt.hashpw(PASSWORD, candidate.encode()).decode()
    except ValueError:
        usable = False
        stored = candidate + "." * 31
    else:
        usable = bcrypt.checkpw(PASSWORD, stored.encode())

    assert (bcrypt_hash_problem(stored) is None) == usable


@pytest.mark.parametrize("char", ALPHABET)
def test_a_hash_is_accepted_only_in_the_form_bcrypt_writes(char: str) -> None:
    # The hash's last character carries 2 spare bits, written as zero: a
    # hash with them set never matches, so it is refused.
    candidate = with_char(HASH, 59, char)

    accepted = bcrypt_hash_problem(candidate) is None

    assert accepted == (char == HASH[59] or ALPHABET.index(char) % 4 == 0)
    assert not accepted or char == HASH[59] or not bcrypt.checkpw(PASSWORD, candidate.encode())


def test_a_refusal_never_quotes_the_hash() -> None:
    for value in (HASH[:-1], "$2x$" + HASH[4:], HASH[:4] + "03" + HASH[6:]):
        problem = bcrypt_hash_problem(value)
        assert problem is not None
        assert value not in problem
        assert HASH[7:29] not in problem


def test_an_imported_user_never_shows_its_hash_in_repr() -> None:
    user = ImportedUser("a@example.com", HASH, "", ("user",), {})

    assert HASH not in repr(user)
    assert HASH not in repr(row())


# -- rows ----------------------------------------------------------------------------------


def test_a_valid_row_is_normalised_like_create_user_and_keeps_its_hash() -> None:
    result = validate_row(
        row(
            email="  Ann@Example.COM ",
            display_name="  Ann  ",
            roles=("admin",),
            labels={"team": "payments"},
        ),
        index=0,
        clock=clock,
    )

    assert result == ImportedUser(
        email="ann@example.com",
        password_hash=HASH,
        display_name="Ann",
        roles=("admin", "user"),
        labels={"team": "payments"},
    )


def test_every_known_role_may_be_imported() -> None:
    result = validate_row(row(roles=("admin", "service", "user")), index=0, clock=clock)

    assert isinstance(result, ImportedUser)
    assert result.roles == ("admin", "service", "user")


def test_a_row_with_a_bad_email_is_refused_as_invalid_argument() -> None:
    result = validate_row(row(email="not-an-email"), index=7, clock=clock)

    assert isinstance(result, ImportRowError)
    assert (result.row, result.field, result.reason) == (7, "email", "INVALID_ARGUMENT")


def test_a_row_with_a_bad_hash_is_refused_as_invalid_password_hash() -> None:
    assert refusal(validate_row(row(password_hash="plain"), index=0, clock=clock)) == (
        "password_hash",
        "INVALID_PASSWORD_HASH",
    )


def test_the_first_bad_field_in_field_order_is_the_one_reported() -> None:
    result = validate_row(
        row(email="bad", password_hash="plain", display_name="x" * 201), index=0, clock=clock
    )

    assert refusal(result) == ("email", "INVALID_ARGUMENT")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"display_name": "d" * 201}, "display_name"),
        ({"display_name": "a\x00b"}, "display_name"),
        ({"roles": ("user", "root")}, "roles[1]"),
        ({"roles": ("user",) * 17}, "roles"),
        ({"labels": {"Team": "x"}}, "labels"),
        ({"labels": {"team": "v" * 257}}, "labels.team"),
        ({"labels": {f"k{i}": "v" for i in range(65)}}, "labels"),
    ],
)
def test_fields_create_user_refuses_are_refused_on_import(
    fields: dict[str, object], field: str
) -> None:
    assert refusal(validate_row(row(**fields), index=0, clock=clock)) == (
        field,
        "INVALID_ARGUMENT",
    )


def test_a_past_create_time_is_kept() -> None:
    moment = datetime(2019, 3, 4, 5, 6, 7, tzinfo=UTC)

    result = validate_row(row(create_time=moment), index=0, clock=clock)

    assert isinstance(result, ImportedUser)
    assert result.create_time == moment


@pytest.mark.parametrize(
    "moment",
    [
        NOW + timedelta(seconds=1),
        datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime.min.replace(tzinfo=UTC),
    ],
    ids=["future", "before-1970", "not-a-time"],
)
def test_a_create_time_outside_1970_to_now_is_refused(moment: datetime) -> None:
    assert refusal(validate_row(row(create_time=moment), index=0, clock=clock)) == (
        "create_time",
        "INVALID_ARGUMENT",
    )
