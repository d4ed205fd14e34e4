"""The brute-force and rate-limit settings (usersvc.config.Settings.from_env)."""

from __future__ import annotations

import ipaddress

import pytest

from usersvc.config import Settings, SettingsError


def settings_from(**env: str) -> Settings:
    return Settings.from_env({f"USERSVC_{name}": value for name, value in env.items()})


def problems_of(**env: str) -> list[str]:
    with pytest.raises(SettingsError) as info:
        settings_from(**env)
    return info.value.problems


def test_the_defaults_lock_after_five_failures_and_limit_calls_in_process() -> None:
    settings = settings_from()
    assert (
        settings.login_max_failures,
        settings.login_lockout_seconds,
        settings.login_lockout_max_seconds,
    ) == (5, 60, 3600)
    assert (settings.rate_limit_rps, settings.rate_limit_burst) == (100.0, 200)
    assert (settings.auth_rate_limit_rps, settings.auth_rate_limit_burst) == (5.0, 10)
    assert (settings.trusted_proxies, settings.redis_url) == ((), None)


def test_trusted_proxies_are_addresses_and_networks_separated_by_commas() -> None:
    settings = settings_from(TRUSTED_PROXIES="10.0.0.0/8, 192.0.2.7 ,fd00::/8")
    assert settings.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("fd00::/8"),
    )


def test_a_trusted_proxy_that_is_not_an_address_refuses_to_start() -> None:
    assert problems_of(TRUSTED_PROXIES="10.0.0.1,proxy.internal") == [
        "USERSVC_TRUSTED_PROXIES: 'proxy.internal' is not an IP address or CIDR network"
    ]


def test_a_maximum_lock_shorter_than_the_first_refuses_to_start() -> None:
    (problem,) = problems_of(LOGIN_LOCKOUT_SECONDS="120", LOGIN_LOCKOUT_MAX_SECONDS="60")
    assert "USERSVC_LOGIN_LOCKOUT_MAX_SECONDS" in problem


def test_zero_requests_a_second_is_allowed_and_means_no_limit() -> None:
    assert settings_from(RATE_LIMIT_RPS="0", AUTH_RATE_LIMIT_RPS="0").rate_limit_rps == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LOGIN_MAX_FAILURES", "0"),
        ("LOGIN_LOCKOUT_SECONDS", "0"),
        ("RATE_LIMIT_RPS", "-1"),
        ("RATE_LIMIT_BURST", "0"),
        ("AUTH_RATE_LIMIT_BURST", "0"),
        ("REDIS_TIMEOUT_SECONDS", "0"),
    ],
)
def test_values_out_of_range_refuse_to_start(name: str, value: str) -> None:
    (problem,) = problems_of(**{name: value})
    assert problem.startswith(f"USERSVC_{name} must be between")


def test_a_redis_url_of_another_scheme_refuses_to_start() -> None:
    (problem,) = problems_of(REDIS_URL="http://127.0.0.1:6379")
    assert problem.startswith("USERSVC_REDIS_URL must start with one of redis://")


def test_the_redis_url_stays_out_of_the_settings_repr() -> None:
    settings = settings_from(REDIS_URL="redis://:hunter2@cache:6379/0")
    assert settings.redis_url == "redis://:hunter2@cache:6379/0"
    assert "hunter2" not in repr(settings)
