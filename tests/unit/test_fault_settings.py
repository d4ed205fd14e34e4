"""The database-monitor and deadline settings (usersvc.config.Settings.from_env)."""

from __future__ import annotations

import pytest

from usersvc.config import Settings, SettingsError


def settings_from(**env: str) -> Settings:
    return Settings.from_env({f"USERSVC_{name}": value for name, value in env.items()})


def problems_of(**env: str) -> list[str]:
    with pytest.raises(SettingsError) as info:
        settings_from(**env)
    return info.value.problems


def test_the_defaults_probe_every_half_second_and_keep_fifty_ms_of_margin() -> None:
    settings = settings_from()

    assert (settings.db_probe_interval_seconds, settings.db_probe_timeout_seconds) == (0.5, 1.0)
    assert settings.deadline_margin_ms == 50


def test_the_probe_and_the_margin_are_read_from_the_environment() -> None:
    settings = settings_from(
        DB_PROBE_INTERVAL_SECONDS="0.25", DB_PROBE_TIMEOUT_SECONDS="2", DEADLINE_MARGIN_MS="120"
    )

    assert (settings.db_probe_interval_seconds, settings.db_probe_timeout_seconds) == (0.25, 2.0)
    assert settings.deadline_margin_ms == 120


def test_a_probe_interval_of_zero_turns_the_monitor_off() -> None:
    assert settings_from(DB_PROBE_INTERVAL_SECONDS="0").db_probe_interval_seconds == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DB_PROBE_INTERVAL_SECONDS", "-1"),
        ("DB_PROBE_TIMEOUT_SECONDS", "0"),
        ("DB_PROBE_TIMEOUT_SECONDS", "soon"),
        ("DEADLINE_MARGIN_MS", "-5"),
        ("DEADLINE_MARGIN_MS", "0.5"),
    ],
)
def test_an_unusable_value_is_refused_naming_the_variable(name: str, value: str) -> None:
    problems = problems_of(**{name: value})

    assert len(problems) == 1
    assert f"USERSVC_{name}" in problems[0]
