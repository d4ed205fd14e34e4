"""The key, TLS and service-identity settings (usersvc.config.Settings.from_env)."""

from __future__ import annotations

from pathlib import Path

import pytest

from usersvc.config import Settings, SettingsError

SECRET_32 = "s" * 32


def settings_from(**env: str) -> Settings:
    return Settings.from_env({f"USERSVC_{name}": value for name, value in env.items()})


def problems_of(**env: str) -> list[str]:
    with pytest.raises(SettingsError) as info:
        settings_from(**env)
    return info.value.problems


# -- algorithm and HS256 secret ------------------------------------------------------------


def test_eddsa_is_the_default_algorithm() -> None:
    assert settings_from().jwt_algorithm == "EdDSA"


def test_hs256_with_a_32_byte_secret_is_accepted() -> None:
    settings = settings_from(JWT_ALGORITHM="HS256", JWT_HS256_SECRET=SECRET_32)
    assert (settings.jwt_algorithm, settings.jwt_hs256_secret) == ("HS256", SECRET_32)


def test_the_algorithm_name_is_case_insensitive() -> None:
    assert settings_from(JWT_ALGORITHM="hs256", JWT_HS256_SECRET=SECRET_32).jwt_algorithm == "HS256"


def test_an_hs256_secret_shorter_than_32_bytes_refuses_to_start() -> None:
    [problem] = problems_of(JWT_ALGORITHM="HS256", JWT_HS256_SECRET="x" * 31)
    assert "at least 32 bytes, got 31" in problem


def test_the_secret_length_counts_bytes_not_characters() -> None:
    # 16 characters of two bytes each.
    settings = settings_from(JWT_ALGORITHM="HS256", JWT_HS256_SECRET="é" * 16)
    assert settings.jwt_hs256_secret == "é" * 16


def test_the_refusal_never_repeats_the_secret() -> None:
    secret = "short-but-secret-value"
    problems = problems_of(JWT_ALGORITHM="HS256", JWT_HS256_SECRET=secret)
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


def test_production_with_hs256_needs_no_ed25519_key() -> None:
    settings = settings_from(
        ENV="production",
        DATABASE_URL="postgresql+asyncpg://db/usersvc",
        JWT_ALGORITHM="HS256",
        JWT_HS256_SECRET=SECRET_32,
    )
    assert settings.is_production


def test_verification_key_files_are_a_comma_separated_list() -> None:
    settings = settings_from(JWT_VERIFICATION_KEY_FILES=" /keys/old.pem, /keys/older.pem ,")
    assert settings.jwt_verification_key_files == (
        Path("/keys/old.pem"),
        Path("/keys/older.pem"),
    )


# -- TLS ---------------------------------------------------------------------------------


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
    problems = problems_of(
        TLS_CERT_FILE="/tls/cert.pem",
        TLS_KEY_FILE="/tls/key.pem",
        TLS_CLIENT_CA_FILE="/tls/ca.pem",
        LISTEN_ADDR="0.0.0.0:50051",
        MTLS_LISTEN_ADDR="0.0.0.0:50051",
    )
    assert any("must differ" in problem for problem in problems)


def test_a_complete_mtls_configuration_is_accepted() -> None:
    settings = settings_from(
        TLS_CERT_FILE="/tls/cert.pem",
        TLS_KEY_FILE="/tls/key.pem",
        TLS_CLIENT_CA_FILE="/tls/ca.pem",
        MTLS_LISTEN_ADDR="0.0.0.0:50052",
        SERVICE_IDENTITIES="spiffe://corp/billing=service",
    )
    assert settings.mtls_listen_addr == "0.0.0.0:50052"
    assert settings.tls_client_ca_file == Path("/tls/ca.pem")


# -- service identities ------------------------------------------------------------------------

MTLS = {
    "TLS_CERT_FILE": "/tls/cert.pem",
    "TLS_KEY_FILE": "/tls/key.pem",
    "TLS_CLIENT_CA_FILE": "/tls/ca.pem",
}


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
