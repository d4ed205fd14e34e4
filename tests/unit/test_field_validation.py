"""Field normalisation and validation (usersvc.domain.validation)."""

from __future__ import annotations

import uuid

import pytest
from fakes import as_mtls_service, as_user
from hypothesis import given
from hypothesis import strategies as st

from usersvc.domain.errors import FieldViolation, InvalidArgument, WeakPassword
from usersvc.domain.models import ANONYMOUS
from usersvc.domain.validation import (
    normalize_display_name,
    normalize_email,
    normalize_labels,
    normalize_roles,
    parse_user_id,
    raise_for_violations,
    validate_request_id,
)


def email_errors(value: str, field: str = "email") -> list[FieldViolation]:
    errors: list[FieldViolation] = []
    normalize_email(value, field=field, errors=errors)
    return errors


# -- email -----------------------------------------------------------------------


def test_emails_are_lower_cased_and_stripped() -> None:
    errors: list[FieldViolation] = []
    assert normalize_email("  Ann.Lee@Example.COM\n", field="email", errors=errors) == (
        "ann.lee@example.com"
    )
    assert errors == []


@pytest.mark.parametrize(
    "email",
    [
        "a@b.co",
        "first.last+tag@sub.example.org",
        "o'brien@example.ie",
        "用户@例子.广告",
        "x@xn--bcher-kva.example",
        "a" * 64 + "@example.com",
    ],
)
def test_plausible_addresses_are_accepted(email: str) -> None:
    assert email_errors(email) == []


@pytest.mark.parametrize(
    ("email", "words"),
    [
        ("", "required"),
        ("ann", "one '@'"),
        ("a@b@example.com", "one '@'"),
        ("@example.com", "before '@'"),
        ("ann@", "domain"),
        ("ann@localhost", "'.'"),
        ("a b@example.com", "whitespace"),
        ("ann@exa\x00mple.com", "control"),
        (".ann@example.com", "'.'"),
        ("ann.@example.com", "'.'"),
        ("a..nn@example.com", "'..'"),
        ("a(n)n@example.com", "not allowed"),
        ("ann@-example.com", "'-'"),
        ("ann@exam_ple.com", "letters, digits"),
        ("ann@example..com", "1..63"),
        ("ann@1.2.3.4", "number"),
        ("a" * 65 + "@example.com", "64 bytes"),
        ("ü" * 33 + "@example.com", "64 bytes"),
        ("a@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + "." + "e" * 60 + ".com", "254"),
    ],
)
def test_implausible_addresses_are_refused(email: str, words: str) -> None:
    (violation,) = email_errors(email)
    assert violation.field == "email"
    assert words in violation.description


def test_email_violations_use_the_callers_field_path() -> None:
    assert [v.field for v in email_errors("nope", "requests[3].email")] == ["requests[3].email"]


# -- display name -----------------------------------------------------------------


def test_display_names_are_stripped() -> None:
    errors: list[FieldViolation] = []
    assert normalize_display_name("  Ann Lee ", field="n", errors=errors) == "Ann Lee"
    assert errors == []


def test_a_display_name_of_200_characters_is_accepted() -> None:
    errors: list[FieldViolation] = []
    normalize_display_name("x" * 200, field="n", errors=errors)
    assert errors == []


def test_a_display_name_over_200_characters_is_refused() -> None:
    errors: list[FieldViolation] = []
    normalize_display_name("x" * 201, field="user.display_name", errors=errors)
    assert [v.field for v in errors] == ["user.display_name"]


@pytest.mark.parametrize("name", ["Ann\nLee", "Ann\x00", "Ann\u2028Lee", "\ud800"])
def test_control_characters_in_display_names_are_refused(name: str) -> None:
    errors: list[FieldViolation] = []
    normalize_display_name(name, field="n", errors=errors)
    assert "control" in errors[0].description


# -- roles ------------------------------------------------------------------------


def test_roles_always_include_user_sorted_and_deduplicated() -> None:
    errors: list[FieldViolation] = []
    assert normalize_roles(["service", "admin", "admin"], field="roles", errors=errors) == (
        "admin",
        "service",
        "user",
    )
    assert errors == []


def test_no_roles_means_user() -> None:
    assert normalize_roles([], field="roles", errors=[]) == ("user",)


def test_unknown_roles_are_refused_by_index() -> None:
    errors: list[FieldViolation] = []
    normalize_roles(["user", "root"], field="roles", errors=errors)
    assert [v.field for v in errors] == ["roles[1]"]


def test_more_than_sixteen_roles_are_refused() -> None:
    errors: list[FieldViolation] = []
    normalize_roles(["user"] * 17, field="roles", errors=errors)
    assert "16" in errors[0].description


# -- labels -----------------------------------------------------------------------


def test_valid_labels_are_kept() -> None:
    errors: list[FieldViolation] = []
    labels = {"team": "payments", "app.k8s-io_x": "", "a": "v" * 256}
    assert normalize_labels(labels, field="labels", errors=errors) == labels
    assert errors == []


@pytest.mark.parametrize("key", ["", "Team", "9team", "-team", "a" * 64, "te am", "tëam"])
def test_invalid_label_keys_are_refused(key: str) -> None:
    errors: list[FieldViolation] = []
    normalize_labels({key: "v"}, field="labels", errors=errors)
    assert [v.field for v in errors] == ["labels"]


def test_a_label_value_over_256_characters_is_refused_under_its_key() -> None:
    errors: list[FieldViolation] = []
    normalize_labels({"team": "v" * 257}, field="user.labels", errors=errors)
    assert [v.field for v in errors] == ["user.labels.team"]


def test_a_label_value_with_control_characters_is_refused() -> None:
    errors: list[FieldViolation] = []
    normalize_labels({"team": "a\tb"}, field="labels", errors=errors)
    assert [v.field for v in errors] == ["labels.team"]


def test_more_than_64_labels_are_refused() -> None:
    errors: list[FieldViolation] = []
    normalize_labels({f"k{i}": "v" for i in range(65)}, field="labels", errors=errors)
    assert "64" in errors[0].description


# -- request ids ------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["", "abc-123", "x" * 128, "retry 1 of 3"])
def test_request_ids_may_be_empty_or_printable(request_id: str) -> None:
    errors: list[FieldViolation] = []
    validate_request_id(request_id, field="request_id", errors=errors)
    assert errors == []


@pytest.mark.parametrize("request_id", ["x" * 129, "a\nb", "a\x00"])
def test_long_or_unprintable_request_ids_are_refused(request_id: str) -> None:
    errors: list[FieldViolation] = []
    validate_request_id(request_id, field="request_id", errors=errors)
    assert [v.field for v in errors] == ["request_id"]


# -- user ids ---------------------------------------------------------------------


def test_me_names_the_calling_user() -> None:
    user_id = uuid.uuid4()
    assert parse_user_id("me", "id", as_user(user_id)) == user_id


def test_a_canonical_uuid_is_parsed() -> None:
    user_id = uuid.uuid4()
    assert parse_user_id(str(user_id).upper(), "id", ANONYMOUS) == user_id


@pytest.mark.parametrize(
    "text",
    ["", "ME", "123", "{12345678-1234-1234-1234-123456789abc}", "12345678123412341234123456789abc"],
)
def test_anything_else_is_an_invalid_id_on_the_given_field(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_user_id(text, "ids[2]", as_user(uuid.uuid4()))
    assert [v.field for v in caught.value.violations] == ["ids[2]"]


def test_me_from_an_mtls_service_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_user_id("me", "id", as_mtls_service())
    assert "not a user account" in caught.value.violations[0].description


# -- raising ------------------------------------------------------------------------


def test_no_violations_raise_nothing() -> None:
    raise_for_violations([], [])


def test_only_password_violations_raise_weak_password() -> None:
    with pytest.raises(WeakPassword):
        raise_for_violations([], [FieldViolation("password", "too short")])


def test_other_violations_win_and_carry_the_password_ones_too() -> None:
    with pytest.raises(InvalidArgument) as caught:
        raise_for_violations(
            [FieldViolation("email", "bad")], [FieldViolation("password", "too short")]
        )
    assert type(caught.value) is InvalidArgument
    assert [v.field for v in caught.value.violations] == ["email", "password"]


@given(st.text(max_size=300), st.dictionaries(st.text(max_size=70), st.text(max_size=300)))
def test_normalising_arbitrary_input_only_ever_appends_violations(
    text: str, labels: dict[str, str]
) -> None:
    errors: list[FieldViolation] = []
    normalize_email(text, field="email", errors=errors)
    normalize_display_name(text, field="display_name", errors=errors)
    normalize_roles([text], field="roles", errors=errors)
    normalize_labels(labels, field="labels", errors=errors)
    validate_request_id(text, field="request_id", errors=errors)
    assert {v.field.split("[")[0].split(".")[0] for v in errors} <= {
        "email",
        "display_name",
        "roles",
        "labels",
        "request_id",
    }


# -- canonical emails and invisible characters ---------------------------------------


def _email(value: str) -> tuple[str, list[str]]:
    from usersvc.domain.validation import normalize_email

    errors: list[FieldViolation] = []
    email = normalize_email(value, field="email", errors=errors)
    return email, [violation.description for violation in errors]


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("Zoe\u0308@Example.com", "zo\u00eb@example.com"),
        ("\uff41\uff4e\uff4e@example.com", "ann@example.com"),
        ("ann@xn--bcher-kva.de", "ann@b\u00fccher.de"),
        ("ann@B\u00dcCHER.de", "ann@b\u00fccher.de"),
        ("\u0391\u0392\u0393@example.gr", "\u03b1\u03b2\u03b3@example.gr"),
    ],
)
def test_emails_take_one_canonical_form(given: str, canonical: str) -> None:
    assert _email(given) == (canonical, [])


@pytest.mark.parametrize(
    "value",
    [
        "\u0430lice@example.com",
        "alice@ex\u0430mple.com",
        "\u03bfmega@example.com",
        "al\u200bice@example.com",
        "al\u202eice@example.com",
        "a@xn--zz-invalid.com",
    ],
)
def test_look_alike_and_invisible_emails_are_refused(value: str) -> None:
    _, problems = _email(value)
    assert problems


@pytest.mark.parametrize("char", ["\u200e", "\u202e", "\u2066", "\u200b", "\u2060", "\ufeff"])
def test_display_names_refuse_bidi_and_zero_width_characters(char: str) -> None:
    from usersvc.domain.validation import normalize_display_name

    errors: list[FieldViolation] = []
    normalize_display_name(f"a{char}b", field="display_name", errors=errors)
    assert [v.field for v in errors] == ["display_name"]
