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

import hashlib
import hmac
import json
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from usersvc.domain.errors import TokenExpired, TokenInvalid
from usersvc.domain.keys import (
    MIN_HS256_SECRET_BYTES,
    KeyConfigError,
    b64url,
    ed25519_jwk,
    jwk_thumbprint,
)
from usersvc.domain.models import Principal, PrincipalKind, User

EDDSA = "EdDSA"
HS256 = "HS256"
ACCESS_TOKEN_TYPE = "at+jwt"  # noqa: S105 (a media type, not a secret)
# RFC 9068 names the media type application/at+jwt; "at+jwt" is its short form.
_ACCEPTED_TYPES = frozenset({ACCESS_TOKEN_TYPE, "application/" + ACCESS_TOKEN_TYPE})
_REQUIRED_CLAIMS = ("exp", "iat", "nbf", "sub", "jti", "iss", "aud", "sid", "roles")
# Far above any token we issue; stops a caller from making us parse megabytes.
MAX_TOKEN_LENGTH = 8192


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
        jwk = ed25519_jwk(raw)
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
        kid = jwk_thumbprint({"kty": "oct", "k": b64url(secret)})
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


def key_ring_of(
    signing: Ed25519PrivateKey | bytes,
    verification: Iterable[Ed25519PublicKey] = (),
    *,
    retired_secrets: Iterable[bytes] = (),
) -> KeyRing:
    """The ring that signs with ``signing`` (an Ed25519 private key, or the
    HS256 secret as bytes) and also verifies with each key of
    ``verification``; ``retired_secrets`` (raw private keys of previous
    signing keys) keep their page tokens valid. Raises KeyConfigError for an
    HS256 secret shorter than 32 bytes."""
    key = SigningKey.hs256(signing) if isinstance(signing, bytes) else SigningKey.ed25519(signing)
    return KeyRing(
        key,
        [VerificationKey.ed25519(public) for public in verification],
        retired_secrets=retired_secrets,
    )


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
