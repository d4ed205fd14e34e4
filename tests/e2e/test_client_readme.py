"""The client example of docs/api.md, run word for word in a separate Python
process against a real server: only the address and the email change."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

from .conftest import RunningServer
from .helpers import new_email

ROOT = Path(__file__).resolve().parents[2]
README_TARGET = "localhost:50051"
README_EMAIL = "grace@example.com"


def readme_example() -> str:
    text = (ROOT / "docs" / "api.md").read_text()
    block = re.search(
        r"<!-- client:start -->\s*```python\n(.*?)```\s*<!-- client:end -->", text, re.DOTALL
    )
    assert block, "docs/api.md has no client example"
    return block.group(1)


async def test_the_readme_client_example_runs_in_another_process(
    primary: RunningServer, tmp_path: Path
) -> None:
    source = readme_example()
    assert README_TARGET in source
    assert README_EMAIL in source
    email = new_email("grace")
    script = tmp_path / "example.py"
    script.write_text(source.replace(README_TARGET, primary.address).replace(README_EMAIL, email))
    # Run from elsewhere, with the installed package: what another service sees.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The server runs in this event loop, so the child must be awaited, not
    # waited for with a blocking call.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()[-3000:]
    lines = stdout.decode().splitlines()
    assert lines[0] == f"{email} Grace Hopper"
    reason, request_id = lines[1].split()
    assert reason == "ETAG_MISMATCH"
    assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id
