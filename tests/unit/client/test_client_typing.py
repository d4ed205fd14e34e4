"""Callers type-check against the client: mypy --strict on a small caller
sees generated message types (from the .pyi files), not Any. The project's
own mypy run skips generated/, so this is also where the client is checked
against the real stub types."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

CALLER = """
from __future__ import annotations

from usersvc.client import PasswordLogin, UsersvcClient, UsersvcError


async def caller() -> None:
    async with UsersvcClient.connect("localhost:50051", credentials=PasswordLogin("a", "b")) as c:
        user = await c.get_user()
        reveal_type(user)
        page = await c.list_users(page_size=10)
        reveal_type(page.next_page_token)
        async for listed in c.iter_users():
            reveal_type(listed.labels)
        login = await c.login("a", "b")
        reveal_type(login.expires_in)
        try:
            await c.delete_user(user.id, etag=user.etag)
        except UsersvcError as error:
            reveal_type(error.field_violations)
"""

CONFIG = """
[mypy]
strict = True
# googleapis-common-protos ships no type information.
[mypy-google.rpc.*]
ignore_missing_imports = True
"""


def test_a_strictly_typed_caller_sees_the_generated_message_types(tmp_path: Path) -> None:
    (tmp_path / "caller.py").write_text(CALLER)
    (tmp_path / "mypy.ini").write_text(CONFIG)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(tmp_path / "mypy.ini"),
            "--cache-dir",
            str(tmp_path / "cache"),
            str(tmp_path / "caller.py"),
        ],
        env={"MYPYPATH": f"{ROOT}{os.pathsep}{ROOT / 'generated'}", "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    revealed = [
        line.split('Revealed type is "')[1].rstrip('"')
        for line in result.stdout.splitlines()
        if "Revealed type" in line
    ]
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert errors == [], result.stdout
    assert revealed == [
        "usersvc_protos.v1.user_pb2.User",
        "str",
        "google.protobuf.internal.containers.ScalarMap[str, str]",
        "int",
        "tuple[usersvc.client.errors.FieldViolation, ...]",
    ], result.stdout
