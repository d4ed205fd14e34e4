"""Inputs that look alike must be alike, or be refused: emails in Unicode
NFKC with the domain in its IDNA Unicode form and lower case (before
uniqueness and every lookup), look-alike mixed-script addresses refused,
display names without bidi controls or zero-width characters; anonymous
sign-up retries scoped by the request; private key files that others may
read refused in production."""

from __future__ import annotations

import secrets
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path

import bcrypt
import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .helpers import (
    ResponseRecorder,
    World,
    auth_service_pb2,
    create_request,
    expect_error,
    expect_invalid,
    new_password,
    user_pb2,
    user_service_pb2,
)
from .test_process import Usersvc, read_log, usersvc  # noqa: F401 (fixture)

INVISIBLE = [
    "\u200e",
    "\u200f",
    "\u202a",
    "\u202b",
    "\u202c",
    "\u202d",
    "\u202e",
    "\u2066",
    "\u2067",
    "\u2068",
    "\u2069",
    "\u200b",
    "\u200c",
    "\u200d",
    "\u2060",
    "\ufeff",
]


def tag() -> str:
    return secrets.token_hex(3)


async def expect_taken(call: object) -> None:
    await expect_error(call, grpc.StatusCode.ALREADY_EXISTS, "EMAIL_ALREADY_EXISTS")  # type: ignore[arg-type]


# -- emails ----------------------------------------------------------------------------


async def test_composed_and_decomposed_spellings_are_one_address(
    world: World, recorder: ResponseRecorder
) -> None:
    composed = f"zo\u00eb-{tag()}@example.com"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    password = new_password(recorder)
    created = await world.admin.users.CreateUser(
        create_request(recorder, email=composed, password=password)
    )
    assert created.user.email == composed

    await expect_taken(world.anonymous.users.CreateUser(create_request(recorder, email=decomposed)))
    found = await world.admin.users.LookupUser(
        user_service_pb2.LookupUserRequest(email=decomposed.upper())
    )
    assert found.user.id == created.user.id
    login = await world.anonymous.auth.Login(
        auth_service_pb2.LoginRequest(email=decomposed, password=password)
    )
    assert login.user.id == created.user.id


async def test_full_width_letters_are_the_ascii_address(
    world: World, recorder: ResponseRecorder
) -> None:
    local = f"wide{tag()}"
    full_width = "".join(chr(ord(ch) + 0xFEE0) for ch in local) + "@example.com"
    created = await world.anonymous.users.CreateUser(create_request(recorder, email=full_width))
    assert created.user.email == f"{local}@example.com"
    await expect_taken(
        world.anonymous.users.CreateUser(create_request(recorder, email=f"{local}@EXAMPLE.com"))
    )


async def test_an_idn_domain_is_one_address_in_unicode_and_punycode(
    world: World, recorder: ResponseRecorder
) -> None:
    label = f"b\u00fccher{tag()}"
    unicode_form = f"ann@{label}.de"
    punycode_form = f"ann@{label.encode('idna').decode()}.de"
    assert punycode_form.startswith("ann@xn--")
    created = await world.admin.users.CreateUser(
        create_request(recorder, email=punycode_form.upper())
    )
    assert created.user.email == unicode_form
    await expect_taken(world.admin.users.CreateUser(create_request(recorder, email=unicode_form)))
    found = await world.admin.users.LookupUser(
        user_service_pb2.LookupUserRequest(email=punycode_form)
    )
    assert found.user.id == created.user.id


async def test_update_to_another_spelling_of_a_taken_email_is_refused(world: World) -> None:
    taken = f"ren\u00e9e-{tag()}@example.com"
    await world.seed_user(email=taken)
    request = user_service_pb2.UpdateUserRequest(
        user=user_pb2.User(id=world.alice.id, email=unicodedata.normalize("NFD", taken)),
        update_mask={"paths": ["email"]},
    )
    await expect_taken(world.alice.users.UpdateUser(request))


@pytest.mark.parametrize(
    "email",
    [
        "\u0430lice@example.com",  # Cyrillic a, then Latin
        "p\u0430yp\u0430l@example.com",
        "alice@ex\u0430mple.com",  # mixed in a domain label
        "\u03bfmega-o@example.com",  # Greek omicron, then Latin
        "al\u200bice@example.com",  # zero-width space
        "alice@xn--zz-invalid.com",  # not punycode
    ],
)
async def test_look_alike_or_invisible_addresses_are_refused(
    world: World, recorder: ResponseRecorder, email: str
) -> None:
    await expect_invalid(
        world.anonymous.users.CreateUser(create_request(recorder, email=email)), "email"
    )


async def test_imported_emails_are_normalised_before_uniqueness(world: World) -> None:
    taken = f"zo\u00eb-{tag()}@example.com"
    await world.seed_user(email=taken)
    fresh = f"\uff29\uff2d\uff30{tag()}@example.com"  # full-width IMP
    hashed = bcrypt.hashpw(b"Imported-password-1!", bcrypt.gensalt(4)).decode()

    async def rows() -> AsyncIterator[user_service_pb2.ImportUsersRequest]:
        yield user_service_pb2.ImportUsersRequest(
            users=[
                user_service_pb2.ImportedUser(
                    email=unicodedata.normalize("NFD", taken), password_hash=hashed
                ),
                user_service_pb2.ImportedUser(email=fresh, password_hash=hashed),
            ]
        )

    response = await world.admin.users.ImportUsers(rows())
    assert response.imported_count == 1
    assert [(e.row, e.reason) for e in response.errors] == [(0, "EMAIL_ALREADY_EXISTS")]
    found = await world.admin.users.LookupUser(
        user_service_pb2.LookupUserRequest(email=unicodedata.normalize("NFKC", fresh))
    )
    assert found.user.email == unicodedata.normalize("NFKC", fresh).lower()


# -- display names -----------------------------------------------------------------------


@pytest.mark.parametrize("char", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
async def test_display_names_with_bidi_or_zero_width_characters_are_refused(
    world: World, recorder: ResponseRecorder, char: str
) -> None:
    name = f"Ali{char}ce"
    await expect_invalid(
        world.anonymous.users.CreateUser(create_request(recorder, display_name=name)),
        "display_name",
    )
    request = user_service_pb2.UpdateUserRequest(
        user=user_pb2.User(id=world.alice.id, display_name=name),
        update_mask={"paths": ["display_name"]},
    )
    await expect_invalid(world.alice.users.UpdateUser(request), "user.display_name")


async def test_display_names_in_other_scripts_are_accepted(
    world: World, recorder: ResponseRecorder
) -> None:
    for name in ("Zoë Ünal", "Анна", "שרה כהן", "佐藤"):
        response = await world.anonymous.users.CreateUser(
            create_request(recorder, display_name=name)
        )
        assert response.user.display_name == name


# -- anonymous idempotency ---------------------------------------------------------------


async def test_another_sign_up_with_the_same_request_id_gets_its_own_user(
    world: World, recorder: ResponseRecorder
) -> None:
    request_id = f"signup-{tag()}"
    first = await world.anonymous.users.CreateUser(create_request(recorder, request_id=request_id))
    other = await world.anonymous.users.CreateUser(create_request(recorder, request_id=request_id))
    assert other.user.id != first.user.id
    assert other.user.email != first.user.email


async def test_a_sign_up_replayed_with_another_password_does_not_get_the_first_answer(
    world: World, recorder: ResponseRecorder
) -> None:
    request_id = f"signup-{tag()}"
    original = create_request(recorder, request_id=request_id, display_name="Victim")
    first = await world.anonymous.users.CreateUser(original)
    replay = user_service_pb2.CreateUserRequest()
    replay.CopyFrom(original)
    replay.password = new_password(recorder)
    await expect_invalid(world.anonymous.users.CreateUser(replay), "request_id")
    # The genuine retry still answers as the first call did.
    again = await world.anonymous.users.CreateUser(original)
    assert again.user.id == first.user.id


# -- key file permissions ----------------------------------------------------------------


def _key_file(path: Path, mode: int) -> Path:
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644], ids=["0640", "0604", "0644"])
async def test_production_refuses_a_key_file_others_may_read(
    usersvc: Usersvc,  # noqa: F811
    tmp_path: Path,
    mode: int,
) -> None:
    key = _key_file(tmp_path / "signing.pem", mode)
    result = await usersvc.with_env(
        USERSVC_ENV="production", USERSVC_JWT_PRIVATE_KEY_FILE=str(key)
    ).run("serve")
    assert result.returncode == 2, result.stderr
    assert str(key) in result.stderr
    assert f"{mode:04o}" in result.stderr


async def test_production_refuses_an_old_private_key_others_may_read(
    usersvc: Usersvc,  # noqa: F811
    tmp_path: Path,
) -> None:
    key = _key_file(tmp_path / "signing.pem", 0o600)
    old = _key_file(tmp_path / "old.pem", 0o644)
    result = await usersvc.with_env(
        USERSVC_ENV="production",
        USERSVC_JWT_PRIVATE_KEY_FILE=str(key),
        USERSVC_JWT_VERIFICATION_KEY_FILES=str(old),
    ).run("serve")
    assert result.returncode == 2, result.stderr
    assert str(old) in result.stderr


async def test_development_serves_with_a_warning_naming_the_key_file(
    usersvc: Usersvc,  # noqa: F811
    tmp_path: Path,
) -> None:
    key = _key_file(tmp_path / "signing.pem", 0o644)
    log = tmp_path / "server.log"
    async with usersvc.with_env(USERSVC_JWT_PRIVATE_KEY_FILE=str(key)).serving(log):
        text = read_log(log)
    assert str(key) in text
    assert "0644" in text
    assert "refused in production" in text
