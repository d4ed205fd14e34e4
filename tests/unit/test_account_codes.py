"""Codes as people see them: drawn from secrets, typed back in any case."""

from __future__ import annotations

import math

import pytest

from usersvc.domain.codes import CODE_ALPHABET, CODE_BITS, CODE_LENGTH, normalize_code
from usersvc.services.account_codes import new_code


def test_a_code_carries_at_least_forty_bits() -> None:
    assert len(set(CODE_ALPHABET)) == 32
    assert CODE_LENGTH * math.log2(len(CODE_ALPHABET)) == CODE_BITS >= 40


def test_the_alphabet_leaves_out_characters_people_confuse() -> None:
    assert not set(CODE_ALPHABET) & set("IO01")


def test_new_codes_are_made_of_the_alphabet_and_differ() -> None:
    codes = {new_code() for _ in range(200)}

    assert len(codes) == 200
    assert all(len(c) == CODE_LENGTH and set(c) <= set(CODE_ALPHABET) for c in codes)


def test_a_code_typed_in_lower_case_with_spaces_around_is_the_same_code() -> None:
    code = new_code()

    assert normalize_code(f"  {code.lower()} ") == code


@pytest.mark.parametrize("typed", ["", "ABCDEFG", "ABCDEFGHJ", "ABCDEFG0", "ABCDEFGI", "ABCD EFG"])
def test_text_that_cannot_be_a_code_is_refused(typed: str) -> None:
    assert normalize_code(typed) is None
