"""ListUsers filter and order_by parsing (usersvc.domain.filtering)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usersvc.domain.errors import InvalidArgument
from usersvc.domain.filtering import (
    MAX_FILTER_LENGTH,
    MAX_FILTER_TERMS,
    format_filter,
    parse_filter,
    parse_order_by,
)
from usersvc.domain.listing import Comparison, Filter, FilterField, Op, Ordering, SortField
from usersvc.domain.models import UserState


def parse_error(text: str) -> str:
    """The description of the single "filter" violation ``text`` causes."""
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(text)
    (violation,) = caught.value.violations
    assert violation.field == "filter"
    return violation.description


# -- accepted filters --------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_an_empty_filter_matches_everything(text: str) -> None:
    assert parse_filter(text) == Filter()


def test_the_api_example_parses_into_three_terms() -> None:
    parsed = parse_filter(
        'state = STATE_ACTIVE AND email:"@example.com" AND labels.team = "payments"'
    )
    assert parsed.terms == (
        Comparison(FilterField.STATE, Op.EQ, UserState.ACTIVE),
        Comparison(FilterField.EMAIL, Op.HAS, "@example.com"),
        Comparison(FilterField.LABELS, Op.EQ, "payments", label_key="team"),
    )


@pytest.mark.parametrize(
    ("text", "op"),
    [
        ('display_name = "Ann"', Op.EQ),
        ('display_name != "Ann"', Op.NE),
        ('display_name < "Ann"', Op.LT),
        ('display_name <= "Ann"', Op.LE),
        ('display_name > "Ann"', Op.GT),
        ('display_name >= "Ann"', Op.GE),
        ('display_name : "Ann"', Op.HAS),
    ],
)
def test_every_operator_applies_to_display_name(text: str, op: Op) -> None:
    assert parse_filter(text).terms == (Comparison(FilterField.DISPLAY_NAME, op, "Ann"),)


def test_spacing_around_operators_is_optional() -> None:
    assert parse_filter('email="a@b.co"AND display_name:"x"') == parse_filter(
        'email = "a@b.co"  AND  display_name : "x"'
    )


def test_email_literals_are_lower_cased() -> None:
    assert parse_filter('email = "Ann@Example.COM"').terms[0].value == "ann@example.com"


def test_display_name_literals_keep_their_case() -> None:
    assert parse_filter('display_name = "Ann"').terms[0].value == "Ann"


def test_string_escapes_give_quotes_and_backslashes() -> None:
    assert parse_filter(r'display_name = "say \"hi\" \\o/"').terms[0].value == 'say "hi" \\o/'


def test_strings_may_hold_non_ascii_text() -> None:
    assert parse_filter('display_name:"Zoë 山田"').terms[0].value == "Zoë 山田"


@pytest.mark.parametrize(
    ("literal", "state"),
    [
        ("STATE_ACTIVE", UserState.ACTIVE),
        ("STATE_DISABLED", UserState.DISABLED),
        ("STATE_DELETED", UserState.DELETED),
        ('"STATE_ACTIVE"', UserState.ACTIVE),
    ],
)
def test_state_takes_enum_names(literal: str, state: UserState) -> None:
    assert parse_filter(f"state != {literal}").terms == (
        Comparison(FilterField.STATE, Op.NE, state),
    )


def test_roles_has_a_role() -> None:
    assert parse_filter('roles:"admin"').terms == (Comparison(FilterField.ROLES, Op.HAS, "admin"),)


def test_create_time_takes_an_rfc3339_timestamp_as_utc() -> None:
    (term,) = parse_filter('create_time >= "2024-05-01T02:30:00+02:00"').terms
    assert term == Comparison(
        FilterField.CREATE_TIME, Op.GE, datetime(2024, 5, 1, 0, 30, tzinfo=UTC)
    )


def test_create_time_keeps_microseconds_and_drops_finer_digits() -> None:
    (term,) = parse_filter('create_time < "2024-05-01T00:00:00.123456789Z"').terms
    assert term.value == datetime(2024, 5, 1, 0, 0, 0, 123456, tzinfo=UTC)


def test_labels_key_star_means_the_key_is_present() -> None:
    assert parse_filter("labels.team:*").terms == (
        Comparison(FilterField.LABELS, Op.HAS, None, label_key="team"),
    )


def test_labels_has_a_key() -> None:
    assert parse_filter('labels:"team"').terms == (Comparison(FilterField.LABELS, Op.HAS, "team"),)


def test_has_on_a_label_value_is_equality() -> None:
    assert parse_filter('labels.team:"payments"') == parse_filter('labels.team = "payments"')


def test_label_keys_may_contain_dots_and_dashes() -> None:
    (term,) = parse_filter('labels.app.k8s-io != "x"').terms
    assert (term.label_key, term.op) == ("app.k8s-io", Op.NE)


def test_twenty_terms_are_allowed() -> None:
    text = " AND ".join(['email:"a"'] * MAX_FILTER_TERMS)
    assert len(parse_filter(text).terms) == MAX_FILTER_TERMS


def test_a_filter_of_the_maximum_length_is_accepted() -> None:
    text = 'display_name:"' + "x" * (MAX_FILTER_LENGTH - 16) + '"'
    assert len(text) == MAX_FILTER_LENGTH - 1
    assert parse_filter(text).terms[0].op is Op.HAS


# -- refused filters -----------------------------------------------------------------


def test_a_filter_longer_than_2048_characters_is_refused() -> None:
    assert "2048" in parse_error('display_name:"' + "x" * MAX_FILTER_LENGTH + '"')


def test_more_than_twenty_terms_are_refused() -> None:
    text = " AND ".join(['email:"a"'] * (MAX_FILTER_TERMS + 1))
    assert f"at most {MAX_FILTER_TERMS}" in parse_error(text)


def test_an_unknown_field_is_named_with_its_position() -> None:
    description = parse_error('email:"a" AND emial = "b"')
    assert "position 14" in description
    assert "'emial'" in description


def test_lowercase_and_is_refused_with_a_hint() -> None:
    assert "AND" in parse_error('email:"a" and display_name:"b"')


@pytest.mark.parametrize("keyword", ["OR", "NOT", "or"])
def test_or_and_not_are_refused_as_unsupported(keyword: str) -> None:
    assert "not supported" in parse_error(f'email:"a" {keyword} email:"b"')


def test_comparisons_must_be_joined_by_and() -> None:
    assert "expected AND" in parse_error('email:"a" display_name:"b"')


def test_parentheses_are_refused() -> None:
    assert "parentheses" in parse_error('(email:"a")')


def test_negation_is_refused() -> None:
    assert "negation" in parse_error('-email:"a"')


def test_single_quotes_are_refused() -> None:
    assert "double quotes" in parse_error("email = 'a'")


def test_an_unterminated_string_is_refused() -> None:
    assert "unterminated" in parse_error('email = "abc')


def test_an_unknown_escape_is_refused() -> None:
    assert "escape" in parse_error(r'email = "a\nb"')


def test_a_control_character_in_a_string_is_refused() -> None:
    assert "control" in parse_error('display_name = "a\x00b"')


def test_a_missing_operator_is_refused() -> None:
    assert "expected an operator" in parse_error('email "a"')


def test_a_missing_value_is_refused() -> None:
    assert "expected a value" in parse_error("email =")


def test_a_dangling_and_is_refused() -> None:
    assert "field name" in parse_error('email:"a" AND')


def test_a_bare_word_is_not_a_string() -> None:
    assert "double-quoted" in parse_error("email = abc")


def test_state_refuses_ordering_operators() -> None:
    assert "= and !=" in parse_error("state < STATE_ACTIVE")


def test_state_refuses_unknown_values() -> None:
    assert "STATE_ACTIVE" in parse_error("state = STATE_UNSPECIFIED")


@pytest.mark.parametrize("text", ['roles = "admin"', 'roles != "admin"', 'roles < "admin"'])
def test_roles_refuses_operators_other_than_has(text: str) -> None:
    assert "roles" in parse_error(text)


def test_roles_refuses_an_empty_role() -> None:
    assert "empty" in parse_error('roles:""')


@pytest.mark.parametrize(
    "literal",
    [
        "2024-05-01T00:00:00",  # no offset
        "2024-05-01",
        "2024-13-01T00:00:00Z",
        "2024-02-30T00:00:00Z",
        "2024-05-01T24:00:00Z",
        "2024-05-01T00:00:00+25:00",
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "\uff12\uff10\uff12\uff14-05-01T00:00:00Z",  # full-width digits
    ],
)
def test_create_time_refuses_anything_but_an_rfc3339_timestamp(literal: str) -> None:
    assert "timestamp" in parse_error(f'create_time > "{literal}"')


def test_create_time_refuses_has() -> None:
    assert "not :" in parse_error('create_time:"2024-05-01T00:00:00Z"')


def test_star_is_only_allowed_on_label_keys() -> None:
    assert "labels.<key>:*" in parse_error("email:*")


def test_star_needs_the_has_operator() -> None:
    assert "':'" in parse_error("labels.team = *")


@pytest.mark.parametrize("text", ['labels.team < "x"', 'labels.team >= "x"'])
def test_label_values_support_only_equality(text: str) -> None:
    assert "=, != and :" in parse_error(text)


@pytest.mark.parametrize("text", ['labels.Team = "x"', 'labels.9a = "x"', 'labels. = "x"'])
def test_invalid_label_keys_are_refused(text: str) -> None:
    assert "label key" in parse_error(text)


def test_labels_without_a_key_supports_only_has() -> None:
    assert "labels" in parse_error('labels = "team"')


def test_labels_has_refuses_an_invalid_key() -> None:
    assert "label key" in parse_error('labels:"Not A Key"')


# -- canonical text ---------------------------------------------------------------


def test_format_filter_writes_the_canonical_spelling() -> None:
    parsed = parse_filter(
        'state="STATE_DELETED"  AND labels.team:"x" AND create_time>"2024-01-01T01:00:00+01:00"'
    )
    assert format_filter(parsed) == (
        'state = STATE_DELETED AND labels.team = "x" AND create_time > "2024-01-01T00:00:00+00:00"'
    )


_strings = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Co", "Zl", "Zp")), max_size=12)
_keys = st.from_regex(r"[a-z][a-z0-9_.-]{0,10}", fullmatch=True)
_times = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(9998, 1, 1), timezones=st.just(UTC)
)
_terms = st.one_of(
    st.builds(
        Comparison,
        st.just(FilterField.EMAIL),
        st.sampled_from(list(Op)),
        _strings.map(str.lower),
    ),
    st.builds(Comparison, st.just(FilterField.DISPLAY_NAME), st.sampled_from(list(Op)), _strings),
    st.builds(
        Comparison,
        st.just(FilterField.STATE),
        st.sampled_from([Op.EQ, Op.NE]),
        st.sampled_from(list(UserState)),
    ),
    st.builds(Comparison, st.just(FilterField.ROLES), st.just(Op.HAS), _strings.filter(bool)),
    st.builds(
        Comparison,
        st.just(FilterField.CREATE_TIME),
        st.sampled_from([Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE]),
        _times,
    ),
    st.builds(Comparison, st.just(FilterField.LABELS), st.just(Op.HAS), _keys),
    st.builds(Comparison, st.just(FilterField.LABELS), st.just(Op.HAS), st.none(), label_key=_keys),
    st.builds(
        Comparison,
        st.just(FilterField.LABELS),
        st.sampled_from([Op.EQ, Op.NE]),
        _strings,
        label_key=_keys,
    ),
)


@given(st.lists(_terms, min_size=1, max_size=MAX_FILTER_TERMS))
def test_formatting_then_parsing_gives_the_same_filter(terms: list[Comparison]) -> None:
    original = Filter(tuple(terms))
    assert parse_filter(format_filter(original)) == original


@given(st.text(max_size=300))
def test_arbitrary_text_either_parses_or_raises_invalid_argument(text: str) -> None:
    try:
        parse_filter(text)
    except InvalidArgument as exc:
        fields = [v.field for v in exc.violations]
    else:
        fields = ["filter"]
    assert fields == ["filter"]


_filter_alphabet = st.sampled_from(
    list("emaildisplay_nstaterolcrtimelbs.=!<>:*\" \\AND_ORT-()'0123456789Z+")
)


@given(st.text(_filter_alphabet, max_size=120))
def test_filter_like_text_either_parses_or_raises_invalid_argument(text: str) -> None:
    try:
        parse_filter(text)
    except InvalidArgument as exc:
        fields = [v.field for v in exc.violations]
    else:
        fields = ["filter"]
    assert fields == ["filter"]


# -- order_by ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ordering"),
    [
        ("", Ordering()),
        ("   ", Ordering()),
        ("create_time", Ordering(SortField.CREATE_TIME)),
        ("email", Ordering(SortField.EMAIL)),
        ("display_name desc", Ordering(SortField.DISPLAY_NAME, descending=True)),
        ("  email   DESC ", Ordering(SortField.EMAIL, descending=True)),
        ("create_time asc", Ordering(SortField.CREATE_TIME)),
    ],
)
def test_order_by_accepts_one_field_and_a_direction(text: str, ordering: Ordering) -> None:
    assert parse_order_by(text) == ordering


@pytest.mark.parametrize(
    "text",
    [
        "name",
        "email desc extra",
        "email sideways",
        "email, create_time",
        "desc",
        "Email",
        "email" + " " * 200,
    ],
)
def test_order_by_refuses_anything_else_on_field_order_by(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_order_by(text)
    assert [v.field for v in caught.value.violations] == ["order_by"]


@given(st.text(max_size=60))
def test_order_by_never_raises_anything_but_invalid_argument(text: str) -> None:
    try:
        parse_order_by(text)
    except InvalidArgument as exc:
        fields = [v.field for v in exc.violations]
    else:
        fields = ["order_by"]
    assert fields == ["order_by"]


@pytest.mark.parametrize(
    ("text", "op", "value"),
    [
        ("email_verified = true", Op.EQ, True),
        ('email_verified = "false"', Op.EQ, False),
        ("email_verified != true", Op.NE, True),
    ],
)
def test_email_verified_compares_with_a_boolean(text: str, op: Op, value: bool) -> None:
    assert parse_filter(text) == Filter((Comparison(FilterField.EMAIL_VERIFIED, op, value),))


@pytest.mark.parametrize(
    "text", ["email_verified = yes", "email_verified < true", "email_verified : true"]
)
def test_email_verified_with_another_literal_or_operator_is_invalid(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_filter(text)


def test_an_email_verified_filter_formats_back_to_itself() -> None:
    parsed = parse_filter('email_verified = "true" AND state = STATE_ACTIVE')

    assert parse_filter(format_filter(parsed)) == parsed
