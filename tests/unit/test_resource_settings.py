"""Settings of issue 4's resource bounds, least privilege and PgBouncer
support (usersvc.config.Settings.from_env)."""

from __future__ import annotations

import os

import pytest

from usersvc import config
from usersvc.config import Settings, SettingsError

DIRECT = "postgresql+asyncpg://usersvc_app@db.internal:5432/usersvc"
POOLED = "postgresql+asyncpg://usersvc_app@pgbouncer.internal:6432/usersvc"


def settings(**env: str) -> Settings:
    return Settings.from_env({f"USERSVC_{name}": value for name, value in env.items()})


def test_a_thousand_calls_may_be_in_progress_by_default() -> None:
    assert settings().max_concurrent_rpcs == 1000


def test_the_concurrency_limit_is_read_from_the_environment() -> None:
    assert settings(MAX_CONCURRENT_RPCS="64").max_concurrent_rpcs == 64


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_an_unusable_concurrency_limit_refuses_to_start(value: str) -> None:
    with pytest.raises(SettingsError, match="USERSVC_MAX_CONCURRENT_RPCS"):
        settings(MAX_CONCURRENT_RPCS=value)


def test_transaction_pooling_is_off_by_default() -> None:
    assert settings(DATABASE_URL=DIRECT).db_transaction_pooling is False


def test_transaction_pooling_with_a_revocation_url_is_accepted() -> None:
    configured = settings(
        DATABASE_URL=POOLED, DB_TRANSACTION_POOLING="true", REVOCATION_DATABASE_URL=DIRECT
    )

    assert configured.db_transaction_pooling is True
    assert configured.revocation_database_url == DIRECT


def test_transaction_pooling_without_a_revocation_url_refuses_to_start() -> None:
    with pytest.raises(SettingsError, match="USERSVC_REVOCATION_DATABASE_URL"):
        settings(DATABASE_URL=POOLED, DB_TRANSACTION_POOLING="true")


def test_the_revocation_url_defaults_to_none_meaning_the_service_url() -> None:
    assert settings(DATABASE_URL=DIRECT).revocation_database_url is None


def test_a_revocation_url_for_another_driver_refuses_to_start() -> None:
    with pytest.raises(SettingsError, match="USERSVC_REVOCATION_DATABASE_URL must start with"):
        settings(REVOCATION_DATABASE_URL="postgresql://db.internal/usersvc")


def test_the_revocation_url_is_not_in_the_settings_repr() -> None:
    secret_url = "postgresql+asyncpg://app:s3cret-pw@db.internal/usersvc"

    assert "s3cret-pw" not in repr(settings(REVOCATION_DATABASE_URL=secret_url))


def test_bcrypt_leaves_one_cpu_to_the_event_loop_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config, "usable_cpus", lambda: 2)
    assert settings().bcrypt_max_threads == 1
    monkeypatch.setattr(config, "usable_cpus", lambda: 8)
    assert settings().bcrypt_max_threads == 7


def test_a_single_cpu_still_gets_one_bcrypt_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "usable_cpus", lambda: 1)
    assert settings().bcrypt_max_threads == 1


def test_usable_cpus_follows_the_affinity_mask() -> None:
    assert config.usable_cpus() == len(os.sched_getaffinity(0))


def test_bcrypt_threads_are_niced_by_default_and_configurable() -> None:
    assert settings().bcrypt_nice == 10
    assert settings(BCRYPT_NICE="0").bcrypt_nice == 0
    with pytest.raises(SettingsError, match="USERSVC_BCRYPT_NICE"):
        settings(BCRYPT_NICE="20")
