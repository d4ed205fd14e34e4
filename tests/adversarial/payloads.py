"""Classic SQL injection payloads, for PostgreSQL in particular.

Every one of them must be treated as data: stored verbatim where the field
accepts the text, refused with INVALID_ARGUMENT where it does not, and never
allowed to change a statement. The pg_sleep ones would stall a call that
concatenated them into SQL; the tests call with a deadline far below the
sleep, so "returned in time" proves the sleep never ran.
"""

from __future__ import annotations

SLEEP_SECONDS = 5

SQL_PAYLOADS: tuple[str, ...] = (
    "'",
    "''",
    '"',
    "\\'",
    "\\",
    "' OR '1'='1",
    "' OR 1=1 --",
    "' OR '1'='1' /*",
    '" OR ""="',
    "admin'--",
    "'; DROP TABLE users; --",
    '"; DROP TABLE users; --',
    "'); DROP TABLE users; --",
    f"'); SELECT pg_sleep({SLEEP_SECONDS}); --",
    f"'; SELECT pg_sleep({SLEEP_SECONDS}); --",
    f"' || pg_sleep({SLEEP_SECONDS}) || '",
    f"1 AND (SELECT 1 FROM pg_sleep({SLEEP_SECONDS})) IS NOT NULL",
    f"' AND 1=(SELECT 1 FROM pg_sleep({SLEEP_SECONDS}))--",
    "' UNION SELECT password_hash FROM users --",
    "' UNION ALL SELECT NULL,NULL,NULL--",
    "$$",
    f"$$; SELECT pg_sleep({SLEEP_SECONDS}); $$",
    "$tag$ x $tag$",
    "%",
    "_",
    "%_%",
    "\\%",
    "\x00",
    "a\x00' OR '1'='1",
    "\u2019 OR \u20181\u2019=\u20181",  # typographic quotes
    "\u02bc OR \u02bc1\u02bc=\u02bc1",  # modifier letter apostrophe
    "\uff07 OR \uff071\uff07=\uff071",  # fullwidth apostrophe
    "/*",
    "*/",
    "/* comment */",
    "--",
    "#",
    ";",
    "E'\\x27'",
    "U&'\\0027'",
    "'::text",
    "$1",
    "?",
    ":email",
    "%(email)s",
    "{}",
    "\\x00",
    "1e309",
    "NULL",
)


def survives_text_fields(payload: str) -> bool:
    """Whether a display name or label value may hold ``payload`` verbatim:
    no control characters (NUL among them) and nothing trimmed."""
    return payload == payload.strip() and all(ch.isprintable() for ch in payload)
