"""Password rules (usersvc.domain.passwords)."""

from __future__ import annotations

import pytest

from usersvc.domain.errors import WeakPassword
from usersvc.domain.passwords import PasswordPolicy, common_passwords

policy = PasswordPolicy()


def problems(password: str, email: str | None = None) -> list[str]:
    return [v.description for v in policy.violations(password, field="pw", email=email)]


def test_the_bundled_list_holds_at_least_a_thousand_lower_case_entries_of_eight_bytes() -> None:
    entries = common_passwords()
    assert len(entries) >= 1000
    assert all(len(p.encode("utf-8")) >= 8 and p == p.lower() for p in entries)


@pytest.mark.parametrize("password", ["password", "12345678", "qwerty123", "iloveyou", "liverpool"])
def test_well_known_passwords_are_in_the_bundled_list(password: str) -> None:
    assert password in common_passwords()


def test_a_long_uncommon_password_is_accepted() -> None:
    assert problems("correct horse battery staple") == []


def test_no_composition_rules_apply() -> None:
    assert problems("lowercaseonlybutlong") == []


def test_seven_bytes_are_too_short() -> None:
    assert problems("xkcd-42") == ["must be at least 8 bytes long"]


def test_eight_bytes_are_enough() -> None:
    assert problems("xkcd-42!") == []


def test_an_empty_password_is_required() -> None:
    assert problems("") == ["is required"]


def test_seventy_two_bytes_are_accepted() -> None:
    assert problems("x" * 72) == []


def test_seventy_three_bytes_are_refused_not_truncated() -> None:
    assert problems("x" * 73) == ["must be at most 72 bytes long (UTF-8)"]


def test_the_limit_counts_utf8_bytes_not_characters() -> None:
    # 36 two-byte characters are 72 bytes; one more ASCII character is 73.
    assert problems("é" * 36) == []
    assert problems("é" * 36 + "x") == ["must be at most 72 bytes long (UTF-8)"]


def test_a_four_byte_character_counts_four_bytes() -> None:
    assert problems("😀" * 18) == []
    assert len(problems("😀" * 18 + "x")) == 1


def test_common_passwords_are_refused_whatever_their_case() -> None:
    assert problems("PassWord123") == ["is too common; choose another"]


def test_the_email_itself_is_refused() -> None:
    assert problems("Ann.Lee@example.com", email="ann.lee@example.com") == [
        "must not be the email address"
    ]


def test_the_local_part_of_the_email_is_refused() -> None:
    assert problems("annalee77", email="annalee77@example.com") == ["must not be the email address"]


def test_every_problem_is_reported() -> None:
    assert len(problems("pass", email="pass@example.com")) == 2


def test_an_unpaired_surrogate_is_refused_without_an_exception() -> None:
    assert problems("abc\ud800defgh") == ["must be valid Unicode text"]


def test_check_raises_weak_password_with_the_given_field() -> None:
    with pytest.raises(WeakPassword) as caught:
        policy.check("short", field="new_password")
    assert [v.field for v in caught.value.violations] == ["new_password"]


def test_check_passes_a_good_password() -> None:
    policy.check("a perfectly fine passphrase", field="password")


def test_a_custom_blocklist_replaces_the_bundled_one() -> None:
    custom = PasswordPolicy(frozenset({"hunter2hunter2"}))
    assert [v.description for v in custom.violations("Hunter2Hunter2", field="pw")] == [
        "is too common; choose another"
    ]
    assert custom.violations("password", field="pw") == []
