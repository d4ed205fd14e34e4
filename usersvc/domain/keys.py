"""Rules about token keys that hold wherever a key is read or used: the
shortest HS256 secret, how a key is named (its kid), and the error for a key
that cannot be used."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping

# RFC 7518 section 3.2: an HS256 key must be at least as long as the hash.
MIN_HS256_SECRET_BYTES = 32


class KeyConfigError(ValueError):
    """The configured signing key cannot be used (raised at start-up)."""


def b64url(data: bytes) -> str:
    """``data`` in unpadded base64url (RFC 7515 section 2). Raises nothing."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# RFC 7638 section 3.2 (oct) and RFC 8037 section 2 (OKP).
_THUMBPRINT_MEMBERS = {"OKP": ("crv", "kty", "x"), "oct": ("k", "kty")}


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url) of a JWK of type OKP (members
    crv, kty, x) or oct (k, kty). Raises KeyError when a member is missing or
    the key type is another."""
    required = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def ed25519_jwk(raw_public_key: bytes) -> dict[str, str]:
    """The OKP JWK (RFC 8037) of a raw 32-byte Ed25519 public key, without
    kid. Raises nothing."""
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw_public_key)}
