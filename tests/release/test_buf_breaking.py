"""`make buf-breaking` guards the released contract: `buf breaking` against
the image committed under protos/ passes for the current protos and fails,
naming the field, when a field is removed or renumbered."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUF = PROJECT_ROOT / "tools" / "node_modules" / ".bin" / "buf"
RELEASED_IMAGE = PROJECT_ROOT / "protos" / "usersvc-v1.binpb"
USER_PROTO = Path("protos") / "usersvc" / "v1" / "user.proto"

pytestmark = pytest.mark.skipif(
    not BUF.exists() and not os.environ.get("CI"),
    reason="buf is not installed (make installs it into tools/)",
)


def workspace(tmp_path: Path) -> Path:
    """A copy of the buf module (buf.yaml and the protos) to change."""
    shutil.copy2(PROJECT_ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(
        PROJECT_ROOT / "protos" / "usersvc",
        tmp_path / "protos" / "usersvc",
        ignore=shutil.ignore_patterns("*.binpb"),
    )
    return tmp_path


def edit(path: Path, pattern: str, replacement: str) -> None:
    text = path.read_text()
    changed, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count == 1, f"{pattern!r} matched {count} times in {path}"
    path.write_text(changed)


def buf_breaking(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), "breaking", "--against", str(RELEASED_IMAGE)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_released_image_is_committed_and_holds_the_v1_files() -> None:
    listed = subprocess.run(
        [str(BUF), "ls-files", str(RELEASED_IMAGE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    assert set(listed) >= {
        "usersvc/v1/user.proto",
        "usersvc/v1/user_service.proto",
        "usersvc/v1/auth_service.proto",
    }


def test_unchanged_protos_pass(tmp_path: Path) -> None:
    result = buf_breaking(workspace(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_comment_only_change_passes(tmp_path: Path) -> None:
    root = workspace(tmp_path)
    edit(root / USER_PROTO, r"^(\s*string etag = 10;)$", r"  // An extra comment.\n\1")
    result = buf_breaking(root)
    assert result.returncode == 0, result.stdout + result.stderr


def test_removing_a_field_fails_naming_it(tmp_path: Path) -> None:
    root = workspace(tmp_path)
    edit(root / USER_PROTO, r"^\s*string display_name = 3;\n", "")
    result = buf_breaking(root)
    assert result.returncode != 0
    assert '"display_name"' in result.stdout, result.stdout + result.stderr
    assert "deleted" in result.stdout


def test_renumbering_a_field_fails_naming_it(tmp_path: Path) -> None:
    root = workspace(tmp_path)
    edit(root / USER_PROTO, r"^(\s*string etag = )10;$", r"\g<1>99;")
    result = buf_breaking(root)
    assert result.returncode != 0
    assert '"etag"' in result.stdout, result.stdout + result.stderr
