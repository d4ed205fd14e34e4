"""The retry policy handed to gRPC: which methods, which codes, how often."""

from __future__ import annotations

import json

import pytest

from usersvc.client import retries


def test_only_refusals_are_retried_and_only_on_methods_safe_to_repeat() -> None:
    (method_config,) = retries.service_config()["methodConfig"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    # CANCELLED: what grpc core answers to a call it dropped at a server's stop.
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
    assert ("usersvc.v1.UserService", "GetUser") in names
    assert ("usersvc.v1.UserService", "CreateUser") in names
    for unsafe in ("Login", "RefreshToken", "Logout", "RevokeAllSessions"):
        assert ("usersvc.v1.AuthService", unsafe) not in names
    for unsafe in ("UpdateUser", "DeleteUser", "PurgeUser", "DisableUser", "ChangePassword"):
        assert ("usersvc.v1.UserService", unsafe) not in names


def test_one_attempt_means_no_retry_policy_at_all() -> None:
    config = retries.service_config(max_attempts=1)
    assert config["methodConfig"] == []
    assert "retryThrottling" not in config


def test_balancers_that_watch_health_watch_the_overall_status() -> None:
    for attempts in (1, 4):
        config = retries.service_config(max_attempts=attempts)
        assert config["healthCheckConfig"] == {"serviceName": ""}
    # Only a balancing policy given by the caller: round_robin through the
    # channel option would lose to one named in the service config.
    assert "loadBalancingConfig" not in retries.service_config()


@pytest.mark.parametrize("attempts", [0, 6])
def test_attempts_outside_what_grpc_allows_are_refused(attempts: int) -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        retries.service_config(max_attempts=attempts)


def test_the_channel_options_carry_the_config_as_json() -> None:
    options = dict(retries.channel_options())
    assert options["grpc.enable_retries"] == 1
    assert json.loads(options["grpc.service_config"]) == retries.service_config()


def test_a_lost_connection_is_dialled_again_within_two_seconds() -> None:
    options = dict(retries.channel_options())
    assert options["grpc.initial_reconnect_backoff_ms"] <= options["grpc.max_reconnect_backoff_ms"]
    assert options["grpc.max_reconnect_backoff_ms"] <= 2000
