"""Settings (usersvc.config): what each USERSVC_* variable accepts and refuses,
the checks across variables, the OTEL_* check made before serving, and the
documentation generated from the declarations.

A new variable needs no new test here to be read, bounded and documented:
the tests over ``declared()`` cover every declaration. Add a test for what
its declaration cannot say (a check across variables, a special format).
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest

from usersvc import config
from usersvc.config import (
    OTHER_VARIABLES,
    Settings,
    SettingsError,
    Variable,
    declared,
    default_of,
    markdown,
)
from usersvc.observability.tracing import (
    TracingConfigError,
    check_tracing_environment,
    configure_tracing,
    tracing_requested,
)

ROOT = Path(__file__).resolve().parents[2]
SECRET_32 = "s" * 32
DIRECT = "postgresql+asyncpg://usersvc_app@db.internal:5432/usersvc"
POOLED = "postgresql+asyncpg://usersvc_app@pgbouncer.internal:6432/usersvc"
MTLS = {
    "TLS_CERT_FILE": "/tls/cert.pem",
    "TLS_KEY_FILE": "/tls/key.pem",
    "TLS_CLIENT_CA_FILE": "/tls/ca.pem",
}


def settings_from(**env: str) -> Settings:
    return Settings.from_env({f"USERSVC_{name}": value for name, value in env.items()})


def problems_of(**env: str) -> list[str]:
    with pytest.raises(SettingsError) as info:
        settings_from(**env)
    return info.value.problems


def declared_where(kind: str) -> list[tuple[str, str, Variable]]:
    return [entry for entry in declared() if entry[2].type == kind]


def ids(entries: list[tuple[str, str, Variable]]) -> list[str]:
    return [name for name, _, _ in entries]


def bounds(variable: Variable) -> tuple[float, float]:
    assert variable.lo is not None
    assert variable.hi is not None
    return variable.lo, variable.hi


BOUNDED = [entry for entry in declared() if entry[2].lo is not None]
SECRETS = [entry for entry in declared() if entry[2].secret]


# -- the declarations ------------------------------------------------------------------------


def test_every_variable_has_a_unique_name_and_a_meaning() -> None:
    names = [name for name, _, _ in declared()]

    assert len(names) == len(set(names))
    assert all(name.startswith("USERSVC_") and name.isupper() for name in names)
    assert all(variable.doc for _, _, variable in declared())


def test_the_environment_variable_names_follow_the_attributes_unless_declared_otherwise() -> None:
    renamed = {
        attribute: name for name, attribute, _ in declared() if name[8:].lower() != attribute
    }

    assert renamed == {
        "jwt_private_key_pem": "USERSVC_JWT_PRIVATE_KEY",
        "environment": "USERSVC_ENV",
    }


def test_an_empty_environment_gives_the_keyword_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_settings_are_made_with_keyword_arguments_too() -> None:
    settings = Settings(db_pool_size=3, environment="production", data_dir=Path("/srv"))

    assert (settings.db_pool_size, settings.is_production, settings.data_dir) == (
        3,
        True,
        Path("/srv"),
    )


@pytest.mark.parametrize(("name", "attribute", "variable"), BOUNDED, ids=ids(BOUNDED))
def test_every_bounded_default_lies_within_its_bounds(
    name: str, attribute: str, variable: Variable
) -> None:
    lo, hi = bounds(variable)
    assert lo <= default_of(attribute) <= hi


@pytest.mark.parametrize(("name", "attribute", "variable"), BOUNDED, ids=ids(BOUNDED))
def test_a_value_beyond_its_bounds_is_refused_naming_the_variable(
    name: str, attribute: str, variable: Variable
) -> None:
    lo, hi = bounds(variable)
    for value in (lo - 1, hi + 1):
        problems = problems_of(**{name[8:]: str(value)})
        assert problems[0].startswith(f"{name} must be between {lo} and {hi}, got ")


@pytest.mark.parametrize(("name", "attribute", "variable"), BOUNDED, ids=ids(BOUNDED))
def test_a_value_that_is_not_a_number_is_refused_and_the_default_kept(
    name: str, attribute: str, variable: Variable
) -> None:
    assert problems_of(**{name[8:]: "many"}) == [
        f"{name} must be {'an integer' if variable.type == 'integer' else 'a number'}, got 'many'"
    ]


@pytest.mark.parametrize(
    ("name", "attribute", "variable"),
    declared_where("boolean"),
    ids=ids(declared_where("boolean")),
)
def test_booleans_accept_the_usual_words_and_refuse_others(
    name: str, attribute: str, variable: Variable
) -> None:
    # A revocation URL, so that transaction pooling may be turned on.
    base = {"USERSVC_REVOCATION_DATABASE_URL": DIRECT}
    for word in ("true", "YES", "1", "on"):
        assert getattr(Settings.from_env({**base, name: word}), attribute) is True
    for word in ("false", "No", "0", "off"):
        assert getattr(Settings.from_env({**base, name: word}), attribute) is False
    assert problems_of(**{name[8:]: "maybe"}) == [f"{name} must be true or false, got 'maybe'"]


@pytest.mark.parametrize(
    ("name", "attribute", "variable"),
    declared_where("choice"),
    ids=ids(declared_where("choice")),
)
def test_choices_are_matched_in_any_case_and_spelled_as_declared(
    name: str, attribute: str, variable: Variable
) -> None:
    assert default_of(attribute) in variable.choices
    for option in variable.choices:
        environ = {name: option.swapcase(), "USERSVC_JWT_HS256_SECRET": SECRET_32}
        if option != "HS256":
            del environ["USERSVC_JWT_HS256_SECRET"]
        if option == "production":
            environ |= {"USERSVC_DATABASE_URL": DIRECT, "USERSVC_JWT_PRIVATE_KEY_FILE": "/k.pem"}
        assert getattr(Settings.from_env(environ), attribute) == option
    [problem] = problems_of(**{name[8:]: "other"})
    assert problem == f"{name} must be one of {', '.join(variable.choices)}, got 'other'"


@pytest.mark.parametrize(("name", "attribute", "variable"), SECRETS, ids=ids(SECRETS))
def test_secrets_have_no_default_and_stay_out_of_the_repr(
    name: str, attribute: str, variable: Variable
) -> None:
    [spec] = [spec for spec in fields(Settings) if spec.name == attribute]

    assert (spec.default, spec.default_factory, spec.repr) == (None, MISSING, False)
    assert "hunter2" not in repr(Settings(**{attribute: "redis://:hunter2@x/hunter2"}))


def test_every_attribute_is_a_declared_variable_but_the_message_size() -> None:
    variables = {attribute for _, attribute, _ in declared()}

    assert {spec.name for spec in fields(Settings)} - variables == {"max_message_bytes"}


def test_a_blank_variable_counts_as_unset() -> None:
    assert settings_from(DB_POOL_SIZE="  ", LISTEN_ADDR="", JWT_ISSUER=" ") == Settings()


def test_values_are_stripped_of_surrounding_spaces() -> None:
    settings = settings_from(DB_POOL_SIZE=" 7 ", JWT_ISSUER=" issuer ", DATA_DIR=" /srv/u ")

    assert (settings.db_pool_size, settings.jwt_issuer) == (7, "issuer")
    assert settings.data_dir == Path("/srv/u")


# -- every bad variable, named; exit code 2 -----------------------------------------------------

BAD = {
    "BCRYPT_ROUNDS": "3",
    "WORKERS": "zero",
    "LOG_LEVEL": "loud",
    "DB_POOL_PRE_PING": "perhaps",
    "TRUSTED_PROXIES": "proxy.internal",
    "REDIS_URL": "http://:hunter2@cache:6379",
    "LISTEN_ADDR": "localhost",
}


def test_every_bad_variable_is_named_at_once() -> None:
    problems = problems_of(**BAD)

    assert len(problems) == len(BAD)
    for name in BAD:
        assert sum(f"USERSVC_{name}" in problem for problem in problems) == 1, name


def test_the_command_exits_2_naming_every_bad_variable_and_no_secret(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "USERSVC_DATA_DIR": str(tmp_path),
        **{f"USERSVC_{name}": value for name, value in BAD.items()},
    }
    result = subprocess.run(
        [sys.executable, "-m", "usersvc", "serve"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
        timeout=60,
    )

    assert result.returncode == 2
    assert all(f"USERSVC_{name}" in result.stderr for name in BAD), result.stderr
    assert "hunter2" not in result.stderr
    assert "Traceback" not in result.stderr


# -- database ----------------------------------------------------------------------------------


def test_the_database_monitor_probes_every_half_second_by_default() -> None:
    settings = settings_from()

    assert (settings.db_probe_interval_seconds, settings.db_probe_timeout_seconds) == (0.5, 1.0)


def test_the_probe_is_read_from_the_environment_and_zero_turns_it_off() -> None:
    settings = settings_from(DB_PROBE_INTERVAL_SECONDS="0.25", DB_PROBE_TIMEOUT_SECONDS="2")

    assert (settings.db_probe_interval_seconds, settings.db_probe_timeout_seconds) == (0.25, 2.0)
    assert settings_from(DB_PROBE_INTERVAL_SECONDS="0").db_probe_interval_seconds == 0


@pytest.mark.parametrize(
    "name", ["DATABASE_URL", "MIGRATION_DATABASE_URL", "REVOCATION_DATABASE_URL"]
)
def test_a_database_url_for_another_driver_refuses_to_start(name: str) -> None:
    assert problems_of(**{name: "postgresql://db.internal/usersvc"}) == [
        f"USERSVC_{name} must start with postgresql+asyncpg:// "
        "(SQLAlchemy URL for the asyncpg driver)"
    ]


def test_transaction_pooling_is_off_and_the_revocation_url_unset_by_default() -> None:
    settings = settings_from(DATABASE_URL=DIRECT)

    assert (settings.db_transaction_pooling, settings.revocation_database_url) == (False, None)


def test_transaction_pooling_with_a_revocation_url_is_accepted() -> None:
    configured = settings_from(
        DATABASE_URL=POOLED, DB_TRANSACTION_POOLING="true", REVOCATION_DATABASE_URL=DIRECT
    )

    assert configured.db_transaction_pooling is True
    assert configured.revocation_database_url == DIRECT


def test_transaction_pooling_without_a_revocation_url_refuses_to_start() -> None:
    [problem] = problems_of(DATABASE_URL=POOLED, DB_TRANSACTION_POOLING="true")

    assert "requires USERSVC_REVOCATION_DATABASE_URL" in problem


def test_database_urls_are_not_in_the_settings_repr() -> None:
    secret_url = "postgresql+asyncpg://app:s3cret-pw@db.internal/usersvc"
    settings = settings_from(
        DATABASE_URL=secret_url,
        MIGRATION_DATABASE_URL=secret_url,
        REVOCATION_DATABASE_URL=secret_url,
    )

    assert settings.revocation_database_url == secret_url
    assert "s3cret-pw" not in repr(settings)


# -- server, workers and metrics -----------------------------------------------------------------


def test_defaults_are_one_process_a_thousand_calls_no_metrics_and_fifty_ms_of_margin() -> None:
    settings = settings_from()

    assert (settings.workers, settings.max_concurrent_rpcs, settings.metrics_addr) == (
        1,
        1000,
        None,
    )
    assert settings.deadline_margin_ms == 50


def test_workers_metrics_and_limits_come_from_the_environment() -> None:
    settings = settings_from(
        WORKERS="4",
        METRICS_ADDR="0.0.0.0:9090",
        LISTEN_ADDR="0.0.0.0:50051",
        MAX_CONCURRENT_RPCS="64",
        DEADLINE_MARGIN_MS="120",
    )

    assert (settings.workers, settings.metrics_addr, settings.listen_addr) == (
        4,
        "0.0.0.0:9090",
        "0.0.0.0:50051",
    )
    assert (settings.max_concurrent_rpcs, settings.deadline_margin_ms) == (64, 120)


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"METRICS_ADDR": "9090"}, "USERSVC_METRICS_ADDR must be host:port, got '9090'"),
        ({"LISTEN_ADDR": "host:port"}, "USERSVC_LISTEN_ADDR must be host:port"),
        ({"LISTEN_ADDR": "[::1]:65536"}, "USERSVC_LISTEN_ADDR must be host:port"),
        ({"DEADLINE_MARGIN_MS": "0.5"}, "USERSVC_DEADLINE_MARGIN_MS must be an integer"),
        (
            {"WORKERS": "2", "LISTEN_ADDR": "127.0.0.1:0"},
            "USERSVC_LISTEN_ADDR needs a fixed port with 2 workers",
        ),
    ],
)
def test_bad_addresses_and_worker_settings_are_refused(env: dict[str, str], problem: str) -> None:
    assert problem in problems_of(**env)[0]


def test_worker_checks_also_judge_a_worker_count_from_the_command_line() -> None:
    settings = settings_from(**MTLS, LISTEN_ADDR="[::]:50051", MTLS_LISTEN_ADDR="0.0.0.0:0")

    assert settings.worker_checks(1) == []
    assert settings.worker_checks(3) == [
        "USERSVC_MTLS_LISTEN_ADDR needs a fixed port with 3 workers"
    ]


def test_split_host_port_takes_bracketed_ipv6_and_refuses_the_rest() -> None:
    assert config.split_host_port("[::1]:50051") == ("::1", 50051)
    assert config.split_host_port("127.0.0.1:0") == ("127.0.0.1", 0)
    assert config.split_host_port(":50051") is None
    assert config.split_host_port("localhost") is None


# -- passwords ---------------------------------------------------------------------------------


def test_bcrypt_leaves_one_cpu_to_the_event_loop_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config, "usable_cpus", lambda: 2)
    assert settings_from().bcrypt_max_threads == 1
    monkeypatch.setattr(config, "usable_cpus", lambda: 8)
    assert settings_from().bcrypt_max_threads == 7
    assert Settings().bcrypt_max_threads == 7


def test_a_single_cpu_still_gets_one_bcrypt_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "usable_cpus", lambda: 1)
    assert settings_from().bcrypt_max_threads == 1


def test_usable_cpus_follows_the_affinity_mask() -> None:
    assert config.usable_cpus() == len(os.sched_getaffinity(0))


def test_bcrypt_threads_are_niced_by_default_and_configurable() -> None:
    assert settings_from().bcrypt_nice == 10
    assert settings_from(BCRYPT_NICE="0").bcrypt_nice == 0
    assert settings_from(BCRYPT_MAX_THREADS="3").bcrypt_max_threads == 3


# -- brute force and rate limits ---------------------------------------------------------------


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
    settings = settings_from(TRUSTED_PROXIES="10.0.0.0/8, 192.0.2.7 ,fd00::/8,")
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
    assert "USERSVC_LOGIN_LOCKOUT_MAX_SECONDS (60) must not be shorter" in problem


def test_zero_requests_a_second_is_allowed_and_means_no_limit() -> None:
    settings = settings_from(RATE_LIMIT_RPS="0", AUTH_RATE_LIMIT_RPS="0")
    assert (settings.rate_limit_rps, settings.auth_rate_limit_rps) == (0, 0)


def test_a_redis_url_of_another_scheme_refuses_to_start() -> None:
    (problem,) = problems_of(REDIS_URL="http://127.0.0.1:6379")
    assert problem.startswith("USERSVC_REDIS_URL must start with one of redis://")


def test_the_redis_url_stays_out_of_the_settings_repr() -> None:
    settings = settings_from(REDIS_URL="redis://:hunter2@cache:6379/0")
    assert settings.redis_url == "redis://:hunter2@cache:6379/0"
    assert "hunter2" not in repr(settings)


# -- tokens: algorithm, HS256 secret, keys -----------------------------------------------------


def test_eddsa_is_the_default_algorithm() -> None:
    assert settings_from().jwt_algorithm == "EdDSA"


def test_hs256_with_a_32_byte_secret_is_accepted() -> None:
    settings = settings_from(JWT_ALGORITHM="hs256", JWT_HS256_SECRET=SECRET_32)
    assert (settings.jwt_algorithm, settings.jwt_hs256_secret) == ("HS256", SECRET_32)


def test_an_hs256_secret_shorter_than_32_bytes_refuses_to_start() -> None:
    [problem] = problems_of(JWT_ALGORITHM="HS256", JWT_HS256_SECRET="x" * 31)
    assert "USERSVC_JWT_HS256_SECRET must be at least 32 bytes, got 31" in problem


def test_the_secret_length_counts_bytes_not_characters() -> None:
    # 16 characters of two bytes each.
    settings = settings_from(JWT_ALGORITHM="HS256", JWT_HS256_SECRET="é" * 16)
    assert settings.jwt_hs256_secret == "é" * 16


def test_the_refusal_never_repeats_the_secret() -> None:
    secret = "short-but-secret-value"
    problems = problems_of(JWT_ALGORITHM="HS256", JWT_HS256_SECRET=secret)
    assert problems
    assert not any(secret in problem for problem in problems)


def test_the_secret_is_not_in_the_settings_repr() -> None:
    secret = "a-secret-that-is-long-enough-to-be-used-here"
    settings = settings_from(JWT_ALGORITHM="HS256", JWT_HS256_SECRET=secret)
    assert secret not in repr(settings)


def test_the_secret_is_taken_verbatim_with_its_spaces() -> None:
    secret = " " + SECRET_32 + " "
    assert settings_from(JWT_ALGORITHM="HS256", JWT_HS256_SECRET=secret).jwt_hs256_secret == secret


def test_hs256_without_a_secret_refuses_to_start() -> None:
    [problem] = problems_of(JWT_ALGORITHM="HS256")
    assert "USERSVC_JWT_HS256_SECRET" in problem


def test_a_secret_without_hs256_refuses_to_start() -> None:
    [problem] = problems_of(JWT_HS256_SECRET=SECRET_32)
    assert "USERSVC_JWT_ALGORITHM" in problem


def test_hs256_with_an_ed25519_signing_key_refuses_to_start() -> None:
    [problem] = problems_of(
        JWT_ALGORITHM="HS256", JWT_HS256_SECRET=SECRET_32, JWT_PRIVATE_KEY_FILE="/k.pem"
    )
    assert "USERSVC_JWT_VERIFICATION_KEY_FILES" in problem


def test_an_unknown_algorithm_refuses_to_start() -> None:
    [problem] = problems_of(JWT_ALGORITHM="RS256")
    assert "EdDSA, HS256" in problem


def test_a_key_inline_and_in_a_file_refuses_to_start() -> None:
    [problem] = problems_of(
        JWT_PRIVATE_KEY="-----BEGIN PRIVATE KEY-----", JWT_PRIVATE_KEY_FILE="/k"
    )
    assert problem == "set only one of USERSVC_JWT_PRIVATE_KEY and USERSVC_JWT_PRIVATE_KEY_FILE"


def test_verification_key_files_are_a_comma_separated_list() -> None:
    settings = settings_from(JWT_VERIFICATION_KEY_FILES=" /keys/old.pem, /keys/older.pem ,")
    assert settings.jwt_verification_key_files == (
        Path("/keys/old.pem"),
        Path("/keys/older.pem"),
    )


def test_a_refresh_lifetime_shorter_than_the_access_lifetime_refuses_to_start() -> None:
    [problem] = problems_of(ACCESS_TOKEN_TTL_SECONDS="3600", REFRESH_TOKEN_TTL_SECONDS="600")
    assert problem.startswith("USERSVC_REFRESH_TOKEN_TTL_SECONDS (600) must not be shorter")


# -- production ---------------------------------------------------------------------------------


def test_production_refuses_to_start_without_a_database_url_or_a_signing_key() -> None:
    problems = problems_of(ENV="production")

    assert len(problems) == 2
    assert "USERSVC_JWT_PRIVATE_KEY_FILE (no generated keys in production)" in problems[0]
    assert "requires USERSVC_DATABASE_URL" in problems[1]


def test_production_starts_with_a_database_url_and_a_key_file() -> None:
    settings = settings_from(ENV="Production", DATABASE_URL=DIRECT, JWT_PRIVATE_KEY_FILE="/k.pem")
    assert settings.is_production


def test_production_with_hs256_needs_no_ed25519_key() -> None:
    settings = settings_from(
        ENV="production",
        DATABASE_URL=DIRECT,
        JWT_ALGORITHM="HS256",
        JWT_HS256_SECRET=SECRET_32,
    )
    assert settings.is_production


# -- TLS and service identities ------------------------------------------------------------------


def test_tls_needs_both_the_certificate_and_the_key() -> None:
    [problem] = problems_of(TLS_CERT_FILE="/tls/cert.pem")
    assert "USERSVC_TLS_KEY_FILE" in problem


def test_a_client_ca_needs_tls() -> None:
    [problem] = problems_of(TLS_CLIENT_CA_FILE="/tls/ca.pem")
    assert "USERSVC_TLS_CERT_FILE" in problem


def test_an_mtls_port_needs_a_client_ca() -> None:
    [problem] = problems_of(
        TLS_CERT_FILE="/tls/cert.pem",
        TLS_KEY_FILE="/tls/key.pem",
        MTLS_LISTEN_ADDR="127.0.0.1:50052",
    )
    assert "USERSVC_TLS_CLIENT_CA_FILE" in problem


def test_the_mtls_port_must_differ_from_the_main_one() -> None:
    problems = problems_of(**MTLS, LISTEN_ADDR="0.0.0.0:50051", MTLS_LISTEN_ADDR="0.0.0.0:50051")
    assert problems == ["USERSVC_MTLS_LISTEN_ADDR must differ from USERSVC_LISTEN_ADDR"]


def test_an_mtls_address_that_is_not_host_and_port_is_refused_once() -> None:
    problems = problems_of(**MTLS, MTLS_LISTEN_ADDR="mtls")
    assert problems == ["USERSVC_MTLS_LISTEN_ADDR must be host:port, got 'mtls'"]


def test_a_complete_mtls_configuration_is_accepted() -> None:
    settings = settings_from(
        **MTLS,
        MTLS_LISTEN_ADDR="0.0.0.0:50052",
        SERVICE_IDENTITIES="spiffe://corp/billing=service",
    )
    assert settings.mtls_listen_addr == "0.0.0.0:50052"
    assert settings.tls_client_ca_file == Path("/tls/ca.pem")


def test_service_identities_map_uris_and_dns_names_to_roles() -> None:
    settings = settings_from(
        **MTLS, SERVICE_IDENTITIES="spiffe://corp/billing=service; orders.internal=service+admin"
    )
    assert settings.service_identities == {
        "spiffe://corp/billing": frozenset({"service"}),
        "orders.internal": frozenset({"service", "admin"}),
    }


def test_dns_identities_are_lower_cased_and_uris_kept() -> None:
    settings = settings_from(
        **MTLS, SERVICE_IDENTITIES="Orders.Internal=service;spiffe://corp/Billing=service"
    )
    assert set(settings.service_identities) == {"orders.internal", "spiffe://corp/Billing"}


def test_an_identity_containing_an_equals_sign_splits_at_the_last_one() -> None:
    settings = settings_from(**MTLS, SERVICE_IDENTITIES="urn:x?a=b=service")
    assert settings.service_identities == {"urn:x?a=b": frozenset({"service"})}


@pytest.mark.parametrize("entry", ["spiffe://corp/billing", "=service", "orders.internal="])
def test_a_malformed_identity_entry_refuses_to_start(entry: str) -> None:
    [problem] = problems_of(**MTLS, SERVICE_IDENTITIES=entry)
    assert "identity=role+role" in problem


def test_an_unknown_role_refuses_to_start() -> None:
    [problem] = problems_of(**MTLS, SERVICE_IDENTITIES="orders.internal=service+root")
    assert "unknown role(s) root" in problem


def test_an_identity_listed_twice_refuses_to_start() -> None:
    [problem] = problems_of(**MTLS, SERVICE_IDENTITIES="a.internal=service;A.internal=admin")
    assert "listed twice" in problem


def test_service_identities_without_a_client_ca_refuse_to_start() -> None:
    [problem] = problems_of(SERVICE_IDENTITIES="orders.internal=service")
    assert "USERSVC_TLS_CLIENT_CA_FILE" in problem


def test_settings_with_service_identities_stay_hashable() -> None:
    first, second = (
        settings_from(**MTLS, SERVICE_IDENTITIES="orders.internal=service") for _ in range(2)
    )
    assert hash(first) == hash(second)


# -- OTEL_*: read by the OpenTelemetry SDK, checked before serving ---------------------------


@pytest.mark.parametrize(
    ("environ", "requested"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "usersvc"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": " None "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, True),
    ],
)
def test_tracing_is_on_only_when_the_otel_variables_ask_for_it(
    environ: dict[str, str], requested: bool
) -> None:
    assert tracing_requested(environ) is requested


def test_the_otel_check_names_the_exporters_and_needs_no_import() -> None:
    assert check_tracing_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == ["otlp"]
    assert check_tracing_environment({"OTEL_TRACES_EXPORTER": "console,otlp"}) == [
        "console",
        "otlp",
    ]
    with pytest.raises(TracingConfigError, match="OTEL_TRACES_EXPORTER: jaeger"):
        check_tracing_environment({"OTEL_TRACES_EXPORTER": "jaeger"})


def test_otel_variables_that_do_not_turn_tracing_on_are_not_judged() -> None:
    # A protocol set for another program's exporter must not stop usersvc.
    assert check_tracing_environment({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) == []
    assert (
        check_tracing_environment({"OTEL_TRACES_EXPORTER": "zipkin", "OTEL_SDK_DISABLED": "true"})
        == []
    )


def test_an_exporter_usersvc_does_not_ship_is_refused_by_name() -> None:
    pytest.importorskip("opentelemetry.sdk")
    with pytest.raises(TracingConfigError, match="OTEL_TRACES_EXPORTER: zipkin"):
        configure_tracing({"OTEL_TRACES_EXPORTER": "otlp,zipkin"})


def test_an_otlp_protocol_other_than_grpc_is_refused() -> None:
    pytest.importorskip("opentelemetry.sdk")
    with pytest.raises(TracingConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        configure_tracing(
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
        )


# -- documentation ------------------------------------------------------------------------------


def test_docs_configuration_md_is_generated_from_the_declarations() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text()

    assert committed == markdown(), (
        "docs/configuration.md is stale: python -m usersvc.config --markdown "
        "> docs/configuration.md"
    )


def test_the_generated_table_has_a_row_per_variable_with_its_bounds() -> None:
    rows = [line for line in markdown().splitlines() if line.startswith("| `USERSVC_")]

    assert len(rows) == len(declared())
    assert "| `USERSVC_BCRYPT_ROUNDS` | integer | `12` | 4..16 |" in markdown()
    assert "| `USERSVC_DATABASE_URL` | string, secret | unset: " in markdown()


def test_python_m_usersvc_config_prints_the_markdown(capsys: pytest.CaptureFixture[str]) -> None:
    assert config._main(["--markdown"]) == 0
    assert capsys.readouterr().out == markdown()
    assert config._main([]) == 2


# Variables of the test suites, documented with them, not settings.
NOT_SETTINGS = ("USERSVC_TEST_", "USERSVC_CONTRACT_", "USERSVC_BENCH_")
OTHER_NAMES = {name for name, _ in OTHER_VARIABLES}


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def documented_defaults(markdown_text: str) -> list[tuple[str, str]]:
    """(variable, default cell) of every table row naming `USERSVC_*`
    variables in its first cell, in tables with a "default" column."""
    rows: list[tuple[str, str]] = []
    lines = markdown_text.splitlines()
    for index, line in enumerate(lines[:-1]):
        if not (line.startswith("|") and re.match(r"\|\s*:?-{3,}", lines[index + 1])):
            continue
        header = [cell.lower() for cell in _cells(line)]
        if "default" not in header:
            continue
        column = header.index("default")
        for row in lines[index + 2 :]:
            if not row.startswith("|"):
                break
            cells = _cells(row)
            names = re.findall(r"`(USERSVC_[A-Z0-9_]+)`", cells[0])
            defaults = cells[column].split(" / ")
            if len(defaults) != len(names):
                defaults = [cells[column]] * len(names)
            rows += zip(names, defaults, strict=True)
    return rows


def _same_default(cell: str, attribute: str) -> bool:
    [spec] = [spec for spec in fields(Settings) if spec.name == attribute]
    value: Any = default_of(attribute)
    literal = re.search(r"`([^`]*)`", cell)
    if cell.lower().startswith(("unset", "empty", "none")):
        return value is None or value in ((), {})
    if literal is None:
        # Words, e.g. "usable CPUs minus 1": a default computed at start.
        return spec.default_factory is not MISSING
    if literal.group(1).startswith("USERSVC_"):
        # Falls back to another variable.
        return value is None
    text = literal.group(1)
    if isinstance(value, bool):
        return text.lower() == str(value).lower()
    if isinstance(value, int | float):
        return float(text) == value
    if isinstance(value, Path):
        return Path(text) == value
    return bool(text == value)


def test_the_readme_and_docs_tables_name_declared_variables_with_their_defaults() -> None:
    attributes = {name: attribute for name, attribute, _ in declared()}
    documents = [ROOT / "README.md"] + [
        path for path in sorted((ROOT / "docs").glob("*.md")) if path.name != "configuration.md"
    ]
    wrong = []
    readme_rows = 0
    for document in documents:
        for name, cell in documented_defaults(document.read_text()):
            readme_rows += document.name == "README.md"
            if name.startswith(NOT_SETTINGS) or name in OTHER_NAMES:
                continue
            if name not in attributes:
                wrong.append(f"{document.name}: {name} is not a variable of usersvc/config.py")
            elif not _same_default(cell, attributes[name]):
                wrong.append(
                    f"{document.name}: {name} defaults to {default_of(attributes[name])!r} "
                    f"in usersvc/config.py, not {cell!r}"
                )

    assert readme_rows > 0, "README.md has no variable table with a default column"
    assert wrong == []


def test_the_table_check_sees_a_wrong_default_and_an_unknown_variable() -> None:
    table = (
        "| variable | meaning | default |\n|---|---|---|\n"
        "| `USERSVC_DB_POOL_SIZE` / `USERSVC_DB_MAX_OVERFLOW` | pool | `20` / `11` |\n"
        "| `USERSVC_NO_SUCH` | nothing | unset |\n"
        "| `USERSVC_TLS_CERT_FILE` / `USERSVC_TLS_KEY_FILE` | TLS | unset: plaintext |\n"
    )
    rows = documented_defaults(table)

    assert [name for name, _ in rows] == [
        "USERSVC_DB_POOL_SIZE",
        "USERSVC_DB_MAX_OVERFLOW",
        "USERSVC_NO_SUCH",
        "USERSVC_TLS_CERT_FILE",
        "USERSVC_TLS_KEY_FILE",
    ]
    assert _same_default(rows[0][1], "db_pool_size")
    assert not _same_default(rows[1][1], "db_max_overflow")
    assert _same_default(rows[3][1], "tls_cert_file")
    assert not _same_default("`12`", "bcrypt_max_threads")
    assert _same_default("usable CPUs minus 1", "bcrypt_max_threads")
    assert not _same_default("unset", "bcrypt_rounds")
