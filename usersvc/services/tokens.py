"""Access tokens: JWTs (RFC 9068 profile) signed with Ed25519 (or HS256).

Other services verify them offline with the key set from ``jwks_json``. Keys
are named by their RFC 7638 thumbprint, so a kid never names two different
keys. The key ring holds one signing key and any number of verification keys
(rotation); each verification key carries its own algorithm, and a token is
checked only with the algorithm of the key its kid names, never with the
algorithm the token claims (RFC 8725 section 2.1). The accepted algorithms are
therefore exactly those of the configured keys.

Keys come from the ring and nowhere else. ``jku``, ``x5u``, ``jwk`` and ``x5c``
headers are ignored in the strict sense: never fetched, never used to pick or
build a key (RFC 8725 section 3.10). A token signed by an attacker's key that
points at that key is refused because its kid names none of ours; a token we
signed stays valid if someone could add such a header, which they cannot
without breaking the signature, since the header is signed too.

HS256 (``USERSVC_JWT_ALGORITHM=HS256``) signs with a shared secret of at least
32 bytes. Nothing about a secret is publishable, so GetJwks then lists only
the Ed25519 verification keys still configured: usually none, an empty set.
Every verifier of HS256 tokens must hold the secret, which is why EdDSA is the
default.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import os
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from usersvc.config import MIN_HS256_SECRET_BYTES, Settings
from usersvc.domain.errors import TokenExpired, TokenInvalid
from usersvc.domain.models import Principal, PrincipalKind, User

EDDSA = "EdDSA"
HS256 = "HS256"
ACCESS_TOKEN_TYPE = "at+jwt"  # noqa: S105 (a media type, not a secret)
# RFC 9068 names the media type application/at+jwt; "at+jwt" is its short form.
_ACCEPTED_TYPES = frozenset({ACCESS_TOKEN_TYPE, "application/" + ACCESS_TOKEN_TYPE})
_REQUIRED_CLAIMS = ("exp", "iat", "nbf", "sub", "jti", "iss", "aud", "sid", "roles")
DEV_KEY_FILENAME = "jwt-ed25519.pem"
# Far above any token we issue; stops a caller from making us parse megabytes.
MAX_TOKEN_LENGTH = 8192


class KeyConfigError(ValueError):
    """The configured signing key cannot be used (raised at start-up)."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# RFC 7638 section 3.2 (oct) and RFC 8037 section 2 (OKP).
_THUMBPRINT_MEMBERS = {"OKP": ("crv", "kty", "x"), "oct": ("k", "kty")}


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url) of a JWK of type OKP (members
    crv, kty, x) or oct (k, kty). Raises KeyError when a member is missing or
    the key type is another."""
    required = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str
    algorithm: str
    # An Ed25519 public key, or the HS256 shared secret.
    key: Ed25519PublicKey | bytes = field(repr=False)
    # What GetJwks publishes; None for secret keys, which are never published.
    public_jwk: Mapping[str, str] | None

    @classmethod
    def ed25519(cls, public_key: Ed25519PublicKey) -> VerificationKey:
        """The verification key (kid: RFC 7638 thumbprint) of ``public_key``.
        Raises nothing."""
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}
        kid = jwk_thumbprint(jwk)
        return cls(kid, EDDSA, public_key, {**jwk, "kid": kid, "alg": EDDSA, "use": "sig"})


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    algorithm: str
    private_key: Ed25519PrivateKey | bytes = field(repr=False)
    verification: VerificationKey

    @classmethod
    def ed25519(cls, private_key: Ed25519PrivateKey) -> SigningKey:
        """The signing key (kid: RFC 7638 thumbprint) of ``private_key``.
        Raises nothing."""
        verification = VerificationKey.ed25519(private_key.public_key())
        return cls(verification.kid, EDDSA, private_key, verification)

    @classmethod
    def hs256(cls, secret: bytes) -> SigningKey:
        """The HS256 key of ``secret``; its kid is the RFC 7638 thumbprint
        of the oct JWK, which says nothing a token's own MAC does not (both
        are SHA-256 based). Raises KeyConfigError for a secret shorter than
        32 bytes (RFC 7518 section 3.2)."""
        if len(secret) < MIN_HS256_SECRET_BYTES:
            raise KeyConfigError(f"an HS256 secret needs at least {MIN_HS256_SECRET_BYTES} bytes")
        kid = jwk_thumbprint({"kty": "oct", "k": _b64url(secret)})
        return cls(kid, HS256, secret, VerificationKey(kid, HS256, secret, None))


_PAGE_TOKEN_KEY_LABEL = b"usersvc page-token key v1"


def page_token_key(secret: bytes) -> bytes:
    """The HMAC key of ListUsers page tokens derived from a signing key's
    secret (an Ed25519 private key's raw bytes, or the HS256 secret): one
    more purpose of the key material that is already loaded and rotated,
    separated from token signing by the label. Raises nothing."""
    return hmac.new(_PAGE_TOKEN_KEY_LABEL, secret, hashlib.sha256).digest()


def _secret_of(private_key: Ed25519PrivateKey | bytes) -> bytes:
    if isinstance(private_key, bytes):
        return private_key
    return private_key.private_bytes_raw()


class KeyRing:
    """The key that signs new tokens and every key that verifies tokens.
    Its methods raise nothing.

    ``page_token_keys`` tag ListUsers page tokens: the first (from the
    signing key) tags new ones; the others come from ``retired_secrets``
    (private keys of previous signing keys kept as verification key files)
    and keep tokens issued before a rotation valid."""

    def __init__(
        self,
        signing_key: SigningKey,
        verification_keys: Iterable[VerificationKey] = (),
        *,
        retired_secrets: Iterable[bytes] = (),
    ) -> None:
        self.signing_key = signing_key
        keys = {signing_key.kid: signing_key.verification}
        keys.update((key.kid, key) for key in verification_keys)
        self._keys: dict[str, VerificationKey] = keys
        self.page_token_keys: tuple[bytes, ...] = tuple(
            dict.fromkeys(
                page_token_key(secret)
                for secret in (_secret_of(signing_key.private_key), *retired_secrets)
            )
        )

    def verification_key(self, kid: str) -> VerificationKey | None:
        return self._keys.get(kid)

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    @property
    def algorithms(self) -> frozenset[str]:
        return frozenset(key.algorithm for key in self._keys.values())

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """RFC 7517 key set of the publishable keys, signing key first."""
        published = [dict(k.public_jwk) for k in self._keys.values() if k.public_jwk is not None]
        return {"keys": published}


LoggerLike = logging.Logger | logging.LoggerAdapter[Any]


def load_key_ring(settings: Settings, logger: LoggerLike) -> KeyRing:
    """The key ring from settings. It signs with the HS256 secret when
    ``jwt_algorithm`` is HS256, else with the Ed25519 PKCS#8 PEM in
    ``jwt_private_key_pem`` or ``jwt_private_key_file`` (in development,
    without either, a key generated once under ``data_dir`` and reused). Every
    file of ``jwt_verification_key_files`` adds a key that only verifies.

    Raises KeyConfigError for an unreadable, encrypted or non-Ed25519 key, a
    short or missing HS256 secret, and when production has no key configured.
    """
    loaded = [_load_verification_key(path) for path in settings.jwt_verification_key_files]
    if settings.jwt_algorithm == HS256:
        if settings.jwt_hs256_secret is None:
            raise KeyConfigError("USERSVC_JWT_ALGORITHM=HS256 requires USERSVC_JWT_HS256_SECRET")
        signing = SigningKey.hs256(settings.jwt_hs256_secret.encode("utf-8"))
    else:
        signing = SigningKey.ed25519(_load_ed25519_signing_key(settings, logger))
    return KeyRing(
        signing,
        [key for key, _ in loaded],
        retired_secrets=[secret for _, secret in loaded if secret is not None],
    )


def _load_ed25519_signing_key(settings: Settings, logger: LoggerLike) -> Ed25519PrivateKey:
    if settings.jwt_private_key_pem:
        pem = settings.jwt_private_key_pem
        # A PEM squeezed into one environment line often arrives with
        # literal "\n" sequences instead of line breaks.
        if "\n" not in pem and "\\n" in pem:
            pem = pem.replace("\\n", "\n")
        key = _parse_ed25519_pem(pem.encode("utf-8"), "USERSVC_JWT_PRIVATE_KEY")
    elif settings.jwt_private_key_file is not None:
        path = settings.jwt_private_key_file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeyConfigError(
                f"USERSVC_JWT_PRIVATE_KEY_FILE: cannot read {path}: {exc.strerror}"
            ) from None
        key = _parse_ed25519_pem(data, f"USERSVC_JWT_PRIVATE_KEY_FILE ({path})")
    elif settings.is_production:
        raise KeyConfigError(
            "production requires USERSVC_JWT_PRIVATE_KEY or USERSVC_JWT_PRIVATE_KEY_FILE"
        )
    else:
        key = _development_key(settings.data_dir / DEV_KEY_FILENAME, logger)
    return key


def _load_verification_key(path: Path) -> tuple[VerificationKey, bytes | None]:
    """A verification key from a PEM file holding an Ed25519 public key
    (``openssl pkey -pubout``) or private key (the previous signing key
    file, unchanged), with the private key's raw bytes in the latter case."""
    source = f"USERSVC_JWT_VERIFICATION_KEY_FILES ({path})"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyConfigError(f"{source}: cannot read the file: {exc.strerror}") from None
    if b"PUBLIC KEY-----" not in data:
        private_key = _parse_ed25519_pem(data, source)
        return VerificationKey.ed25519(private_key.public_key()), private_key.private_bytes_raw()
    try:
        public_key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyConfigError(f"{source}: not a PEM public or private key") from None
    if not isinstance(public_key, Ed25519PublicKey):
        kind = type(public_key).__name__.removesuffix("PublicKey") or "unknown"
        raise KeyConfigError(f"{source}: key type {kind}, but usersvc verifies Ed25519 (EdDSA)")
    return VerificationKey.ed25519(public_key), None


def generate_key_file(path: Path) -> str:
    """Write a new Ed25519 private key (PKCS#8 PEM, mode 0600) to ``path``
    and return its kid.

    Raises FileExistsError when ``path`` exists (a key is never overwritten:
    tokens signed by it would stop verifying), OSError when it cannot be
    written.
    """
    key = Ed25519PrivateKey.generate()
    _write_new_key_file(path, key)
    return SigningKey.ed25519(key).kid


def _write_new_key_file(path: Path, key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Written to a private (0600) temporary file, then linked into place:
    # the key is never readable by others, a reader never sees half of it,
    # and the link fails rather than replace a file that is already there.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".jwt-key-")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(pem)
        os.link(tmp_name, path)
    finally:
        os.unlink(tmp_name)


def _parse_ed25519_pem(pem: bytes, source: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise KeyConfigError(
            f"{source}: the key is encrypted; provide an unencrypted PKCS#8 PEM"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyConfigError(
            f"{source}: not a PEM private key (expected '-----BEGIN PRIVATE KEY-----'; "
            "create one with: openssl genpkey -algorithm ed25519)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        kind = type(key).__name__.removesuffix("PrivateKey") or "unknown"
        raise KeyConfigError(
            f"{source}: key type {kind}, but usersvc signs tokens with Ed25519 (EdDSA): "
            "create one with: openssl genpkey -algorithm ed25519"
        )
    return key


def _development_key(path: Path, logger: LoggerLike) -> Ed25519PrivateKey:
    """The key stored at ``path``, created (mode 0600) on first use. Tokens
    then survive restarts, which a key made fresh at every start would not."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = _create_development_key(path)
        logger.warning(
            "generated a development JWT signing key at %s; "
            "set USERSVC_JWT_PRIVATE_KEY_FILE for any real deployment",
            path,
        )
        return key
    except OSError as exc:
        raise KeyConfigError(f"cannot read the development key {path}: {exc.strerror}") from None
    logger.warning(
        "using the development JWT signing key at %s; "
        "set USERSVC_JWT_PRIVATE_KEY_FILE for any real deployment",
        path,
    )
    return _parse_ed25519_pem(data, str(path))


def _create_development_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            _write_new_key_file(path, key)
        except FileExistsError:
            # A second process starting at the same moment won the link.
            return _parse_ed25519_pem(path.read_bytes(), str(path))
    except OSError as exc:
        raise KeyConfigError(f"cannot write the development key {path}: {exc.strerror}") from None
    return key


@dataclass(frozen=True, slots=True)
class _CachedPrincipal:
    principal: Principal
    expires_at: float
    # The key that verified it: the entry counts only while that key is in
    # the ring (a kid is a thumbprint, so the same kid is the same key).
    kid: str


class TokenService:
    """Issues and verifies access tokens."""

    def __init__(
        self,
        key_ring: KeyRing,
        *,
        issuer: str,
        audience: str,
        access_ttl_seconds: int,
        clock: Callable[[], float] = time.time,
        leeway_seconds: float = 5.0,
        cache_size: int = 10_000,
    ) -> None:
        self._keys = key_ring
        self._issuer = issuer
        self._audience = audience
        self._ttl = access_ttl_seconds
        self._clock = clock
        self._leeway = leeway_seconds
        self._cache_size = cache_size
        # Verifying EdDSA costs ~140 us; a token is verified once and its
        # Principal reused until it expires. Keyed by the whole token string,
        # so a hit is a token whose signature was already checked.
        self._cache: OrderedDict[str, _CachedPrincipal] = OrderedDict()

    @property
    def access_ttl_seconds(self) -> int:
        return self._ttl

    def issue_access_token(self, user: User, *, session_id: str) -> tuple[str, int]:
        """A signed access token for ``user`` in session ``session_id`` and
        its lifetime in seconds. Raises nothing."""
        now = int(self._clock())
        claims = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": str(user.id),
            "exp": now + self._ttl,
            "iat": now,
            "nbf": now,
            "jti": uuid.uuid4().hex,
            "sid": session_id,
            "roles": list(user.roles),
        }
        signing = self._keys.signing_key
        token = jwt.encode(
            claims,
            signing.private_key,
            algorithm=signing.algorithm,
            headers={"typ": ACCESS_TOKEN_TYPE, "kid": signing.kid},
        )
        return token, self._ttl

    def verify_access_token(self, token: str) -> Principal:
        """The caller a valid token names.

        Raises TokenExpired for a genuine token past ``exp``, TokenInvalid
        for anything else wrong with it; never any other exception.
        """
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise TokenInvalid()
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            if self._keys.verification_key(cached.kid) is None:
                # Its key left the ring: the token is judged afresh (and
                # refused, unless it names a key that is still there).
                del self._cache[token]
            elif now < cached.expires_at + self._leeway:
                self._cache.move_to_end(token)
                return cached.principal
            else:
                del self._cache[token]
                raise TokenExpired()
        principal, expires_at, kid = self._verify(token, now)
        self._cache[token] = _CachedPrincipal(principal, expires_at, kid)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal

    def jwks_json(self) -> str:
        """The public verification keys as an RFC 7517 JWK set (empty when
        only an HS256 secret is configured). Raises nothing."""
        return json.dumps(self._keys.jwks(), sort_keys=True)

    @property
    def key_ring(self) -> KeyRing:
        return self._keys

    def replace_key_ring(self, key_ring: KeyRing) -> None:
        """Sign and verify with ``key_ring`` from now on (keys reloaded
        without a restart). Cached verdicts of keys no longer in it stop
        counting. Raises nothing."""
        self._keys = key_ring

    def _verify(self, token: str, now: float) -> tuple[Principal, float, str]:
        try:
            header = jwt.get_unverified_header(token)
            key = self._key_for(header)
            payload = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": list(_REQUIRED_CLAIMS),
                    # Times are checked below against the injected clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
            principal, expires_at = self._principal(payload, now)
            return principal, expires_at, key.kid
        except (TokenExpired, TokenInvalid):
            raise
        except jwt.PyJWTError:
            raise TokenInvalid() from None
        except Exception:
            # Whatever a hostile token provokes in a parser (bad base64, odd
            # JSON types) is the token's fault, never an internal error.
            raise TokenInvalid() from None

    def _key_for(self, header: Mapping[str, Any]) -> VerificationKey:
        # Keys come from our ring only: jku, x5u, jwk and x5c headers are
        # never followed. "crit" and "b64" change how a JWS is read; we
        # issue neither, so a token carrying them is not ours.
        if "crit" in header or "b64" in header:
            raise TokenInvalid()
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYPES:
            raise TokenInvalid()
        kid = header.get("kid")
        key = self._keys.verification_key(kid) if isinstance(kid, str) else None
        if key is None or header.get("alg") != key.algorithm:
            raise TokenInvalid()
        return key

    def _principal(self, payload: Mapping[str, Any], now: float) -> tuple[Principal, float]:
        exp, iat, nbf = (_number(payload[name]) for name in ("exp", "iat", "nbf"))
        if now >= exp + self._leeway:
            raise TokenExpired()
        if nbf > now + self._leeway or iat > now + self._leeway:
            raise TokenInvalid()
        subject, session_id, token_id = (_text(payload[name]) for name in ("sub", "sid", "jti"))
        uuid.UUID(subject)  # ValueError -> TokenInvalid: subjects are user ids
        roles = payload["roles"]
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise TokenInvalid()
        principal = Principal(
            kind=PrincipalKind.USER,
            subject=subject,
            roles=frozenset(roles),
            session_id=session_id,
            token_id=token_id,
        )
        return principal, exp


def _number(value: object) -> float:
    # bool is an int to Python but not a NumericDate to RFC 7519; NaN (which
    # Python's json accepts) would compare false with every time.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenInvalid()
    number = float(value)
    if not math.isfinite(number):
        raise TokenInvalid()
    return number


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TokenInvalid()
    return value
