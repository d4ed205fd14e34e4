"""The log sweep of the e2e tier (tests/log_secrets.py) catches what it
exists to catch: each test plants a secret in a log line the way a careless
change would, through a real logger and the service's formatters."""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
from collections.abc import Iterator

import bcrypt
import pytest
from log_secrets import LogSweep, SecretLedger

from usersvc_protos.v1 import auth_service_pb2, user_service_pb2

LOGGER = "usersvc.test.sweep"


@pytest.fixture
def sweep() -> Iterator[LogSweep]:
    """A sweep of its own on a logger of its own, so nothing here touches
    the e2e tier's sweep or the root logger."""
    logger = logging.getLogger(LOGGER)
    logger.propagate = False
    own = LogSweep()
    own.start("planted", logger)
    try:
        yield own
    finally:
        own.close(logger)
        logger.propagate = True


def refresh_token() -> str:
    return "rt_" + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def kinds(sweep: LogSweep) -> list[str]:
    return sorted({finding.kind for finding in sweep.findings()})


def test_an_access_token_in_a_message_is_found(sweep: LogSweep) -> None:
    token = "opaque-access-token-" + secrets.token_hex(8)
    sweep.ledger.add_metadata([("authorization", f"Bearer {token}")])
    logging.getLogger(LOGGER).info("rejected token %s", token)

    assert kinds(sweep) == ["access token"]
    assert all(token in finding.line for finding in sweep.findings())


def test_a_password_hash_in_an_extra_field_is_found_without_being_recorded(
    sweep: LogSweep,
) -> None:
    digest = bcrypt.hashpw(b"not recorded anywhere", bcrypt.gensalt(rounds=4)).decode()
    logging.getLogger(LOGGER).warning("user loaded", extra={"row": {"password_hash": digest}})

    assert kinds(sweep) == ["bcrypt hash"]


def test_a_password_in_an_exception_text_is_found(sweep: LogSweep) -> None:
    password = "Pw-" + secrets.token_hex(8) + "!"
    sweep.ledger.add_message(auth_service_pb2.LoginRequest(password=password))
    try:
        raise ValueError(f"cannot check {password}")
    except ValueError:
        logging.getLogger(LOGGER).exception("login failed")

    assert kinds(sweep) == ["password"]
    assert all("Traceback" in finding.line for finding in sweep.findings())


def test_a_refresh_token_in_a_traceback_on_stderr_is_found(sweep: LogSweep) -> None:
    # An exception that escapes before logging is configured is printed by
    # Python itself, past the formatters' redaction.
    token = refresh_token()
    sweep.ledger.add_message(auth_service_pb2.RefreshTokenRequest(refresh_token=token))
    traceback = f"Traceback (most recent call last):\nValueError: bad token {token}\n"
    sweep.add_text("usersvc serve", traceback)

    assert [(f.kind, f.line) for f in sweep.findings()] == [
        ("refresh token", f"ValueError: bad token {token}")
    ]


def test_the_formatters_redaction_keeps_a_refresh_token_out_of_a_traceback(
    sweep: LogSweep,
) -> None:
    token = refresh_token()
    sweep.ledger.add("refresh token", token)
    try:
        raise ValueError(f"bad token {token}")
    except ValueError:
        logging.getLogger(LOGGER).exception("refresh failed")

    assert sweep.findings() == []
    assert any("[redacted refresh token]" in line.text for line in sweep.lines)


def test_the_stored_hash_of_a_refresh_token_is_found(sweep: LogSweep) -> None:
    token = refresh_token()
    sweep.ledger.add("refresh token", token)
    secret = base64.urlsafe_b64decode(token[3:] + "=")
    logging.getLogger(LOGGER).info("revoked %s", hashlib.sha256(secret).hexdigest())

    assert kinds(sweep) == ["refresh token hash"]


def test_a_password_from_a_nested_request_is_found_in_subprocess_output(
    sweep: LogSweep,
) -> None:
    password = "correct horse battery staple"
    batch = user_service_pb2.BatchCreateUsersRequest(
        requests=[user_service_pb2.CreateUserRequest(email="a@example.com", password=password)]
    )
    sweep.ledger.add_message(batch)
    sweep.add_text("usersvc serve", f'{{"msg":"x"}}\n{{"msg":"login {password}"}}\n'.encode())

    findings = sweep.findings()
    assert [(f.kind, f.source) for f in findings] == [("password", "usersvc serve")]


def test_a_signing_key_line_is_found_without_its_armour(sweep: LogSweep) -> None:
    body = base64.b64encode(secrets.token_bytes(48)).decode()
    pem = f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----"
    sweep.ledger.add("signing key", pem)
    logging.getLogger(LOGGER).error("cannot load key %s", body)

    assert kinds(sweep) == ["signing key"]


def test_clean_lines_and_short_strings_pass(sweep: LogSweep) -> None:
    sweep.ledger.add("password", "password")  # too short to search for honestly
    sweep.ledger.add("password", "Pw-" + secrets.token_hex(8) + "!")
    logger = logging.getLogger(LOGGER)
    logger.info("password policy refused a password", extra={"method": "/x/Y", "code": "OK"})
    logger.info("GetUser OK 1.2ms", extra={"request_id": secrets.token_hex(16)})

    assert len(sweep.lines) == 4  # two records, each as JSON and as text
    assert sweep.findings() == []


def test_a_line_is_only_checked_while_the_sweep_is_active(sweep: LogSweep) -> None:
    token = refresh_token()
    logger = logging.getLogger(LOGGER)
    sweep.pause(logger)
    logger.warning("outside the tier %s", token)
    assert sweep.lines == []


@pytest.mark.parametrize("length", [10, 11, 12, 46])
def test_a_secret_is_found_at_every_offset_of_the_text(length: int) -> None:
    # The text is sampled every few characters: no alignment may hide one.
    ledger = SecretLedger()
    secret = secrets.token_hex(length)[:length]
    ledger.add("password", secret)
    found = [list(ledger.search("." * offset + secret + "!")) for offset in range(8)]
    assert found == [[("password", secret)]] * 8


def test_a_refresh_token_shape_counts_alone_not_inside_a_longer_word() -> None:
    token = refresh_token()
    ledger = SecretLedger()
    assert list(ledger.search(token)) == [("refresh token", token)]
    assert list(ledger.search("x" + token)) == []
    assert list(ledger.search(token + "x")) == []


def test_the_search_stays_linear_with_many_secrets() -> None:
    ledger = SecretLedger()
    for _ in range(20_000):
        ledger.add("access token", secrets.token_urlsafe(40))
    planted = secrets.token_urlsafe(40)
    ledger.add("access token", planted)
    text = "\n".join(f"line {n} " + secrets.token_hex(60) for n in range(2_000))

    assert list(ledger.search(text + planted)) == [("access token", planted)]


def test_a_reset_code_from_a_response_is_found_in_any_case(sweep: LogSweep) -> None:
    from usersvc.services.account_codes import new_code

    code = new_code()
    sweep.ledger.add_message(user_service_pb2.CreatePasswordResetCodeResponse(code=code))
    logging.getLogger(LOGGER).info("reset requested with %s", code.lower())

    assert kinds(sweep) == ["code"]


def test_a_code_shaped_word_nobody_issued_passes(sweep: LogSweep) -> None:
    from usersvc.services.account_codes import new_code

    sweep.ledger.add_message(user_service_pb2.VerifyEmailRequest(code=new_code()))
    logging.getLogger(LOGGER).info("DATABASE state HEALTHY")

    assert kinds(sweep) == []
