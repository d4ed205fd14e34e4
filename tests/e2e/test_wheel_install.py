"""The container image's install, without a container engine: the wheel is
built the way the Dockerfile builds it (from the files its build stage
copies, by the pinned setuptools, without build isolation), installed into a
fresh virtual environment, and then the Dockerfile's own commands run from
outside the source tree, with the Dockerfile's environment: ``usersvc
migrate`` on a fresh database, ``usersvc serve``, and its HEALTHCHECK
command until it reports SERVING.

Dependencies: the fresh venv has only the wheel installed (``--no-deps``);
a ``.pth`` line adds this project's venv site-packages *after* its own, so
the third-party packages resolve (no index is needed) while ``usersvc`` and
``usersvc_protos`` can only come from the wheel. A path listed in a ``.pth`` file
is appended to sys.path, but the ``.pth`` files inside it are not run, so
the editable install's import hook does not come along; the tests check
where the modules are imported from."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from clusters import free_port
from dockerfile import stage
from support.servers import serve_process

from usersvc.adapters import migrations

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE_SECONDS = 60.0
COMMAND_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class InstalledWheel:
    wheel: Path
    venv: Path
    workdir: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def _run(
    args: Sequence[str | Path], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )


def _check(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"{result.args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> InstalledWheel:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    # Exactly what the Dockerfile's build stage copies from the context.
    for name in stage("build").copied_sources():
        origin = PROJECT_ROOT / name.rstrip("/")
        if origin.is_dir():
            shutil.copytree(
                origin, source / origin.name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(origin, source / origin.name)
    dist = root / "dist"
    _check(
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-cache-dir",
                "--no-deps",
                "--no-build-isolation",
                "--wheel-dir",
                dist,
                source,
            ]
        )
    )
    (wheel,) = dist.glob("usersvc-*.whl")
    venv = root / "venv"
    _check(_run([sys.executable, "-m", "venv", "--without-pip", venv]))
    _check(
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                venv / "bin" / "python",
                "install",
                "--quiet",
                "--no-cache-dir",
                "--no-deps",
                "--no-index",
                wheel,
            ]
        )
    )
    purelib = Path(
        _check(
            _run(
                [
                    venv / "bin" / "python",
                    "-c",
                    "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                ]
            )
        ).stdout.strip()
    )
    (purelib / "zz_project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    workdir = root / "workdir"
    workdir.mkdir()
    return InstalledWheel(wheel, venv, workdir)


def _names(paths: Iterator[Path], root: Path) -> set[str]:
    return {
        path.relative_to(root).as_posix()
        for path in paths
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_the_wheel_carries_migrations_generated_code_data_and_type_marker(
    installed: InstalledWheel,
) -> None:
    with zipfile.ZipFile(installed.wheel) as archive:
        contents = set(archive.namelist())
    # The top-level alembic/ directory is installed as usersvc_migrations.
    migration_files = {
        f"usersvc_migrations/{name}"
        for name in _names((PROJECT_ROOT / "alembic").rglob("*"), PROJECT_ROOT / "alembic")
    }
    # generated/usersvc_protos/ is installed as usersvc_protos, never as `generated`.
    generated_files = _names(
        (PROJECT_ROOT / "generated" / "usersvc_protos").rglob("*"), PROJECT_ROOT / "generated"
    )
    package_files = _names((PROJECT_ROOT / "usersvc").rglob("*"), PROJECT_ROOT)

    assert {"usersvc_migrations/env.py", "usersvc_migrations/script.py.mako"} <= migration_files
    assert migration_files <= contents
    assert any(name.startswith("usersvc_migrations/versions/0001_") for name in contents)
    assert generated_files <= contents
    assert package_files <= contents
    assert "usersvc_protos/py.typed" in generated_files
    assert not [name for name in contents if name.startswith(("alembic/", "generated/"))]
    assert {"usersvc/py.typed", "usersvc/data/common_passwords.txt"} <= contents
    assert not [name for name in contents if name.startswith(("tests/", "protos/", "tools/"))]


def test_the_installed_package_is_imported_from_the_venv_not_the_source_tree(
    installed: InstalledWheel,
) -> None:
    result = _check(
        _run(
            [
                installed.bin / "python",
                "-c",
                "import importlib.util, usersvc, usersvc_protos, usersvc.adapters.migrations as m; "
                "assert importlib.util.find_spec('generated') is None; "
                "print(usersvc.__file__); print(usersvc_protos.__file__); "
                "print(m.script_location())",
            ],
            cwd=installed.workdir,
            env={"PATH": os.environ.get("PATH", "")},
        )
    )
    locations = result.stdout.split()
    assert len(locations) == 3
    for location in locations:
        assert Path(location).is_relative_to(installed.venv), location
        assert not Path(location).is_relative_to(PROJECT_ROOT), location


def test_the_wheels_declared_dependencies_are_all_installed(installed: InstalledWheel) -> None:
    # pip check in the fresh venv sees the wheel's metadata and, through the
    # .pth line, the pinned dependencies: a requirement the wheel declares
    # that constraints.txt does not satisfy fails here.
    _check(_run([sys.executable, "-m", "pip", "--python", installed.bin / "python", "check"]))


def _container_env(installed: InstalledWheel, database_url: str, key_file: Path) -> dict[str, str]:
    """The runtime stage's ENV, with the image's PATH pointing at this venv,
    plus what an operator supplies at `docker run`: a database and a key."""
    image_env = stage("runtime").env()
    host, _, _ = image_env["USERSVC_LISTEN_ADDR"].rpartition(":")
    env = {key: value for key, value in image_env.items() if key.startswith(("USERSVC_", "PYTHON"))}
    env.update(
        PATH=f"{installed.bin}{os.pathsep}{os.environ.get('PATH', '')}",
        USERSVC_LISTEN_ADDR=f"{host}:{free_port()}",
        USERSVC_DATABASE_URL=database_url,
        USERSVC_JWT_PRIVATE_KEY_FILE=str(key_file),
        USERSVC_BCRYPT_ROUNDS="4",
    )
    return env


async def _wait_until_healthy(
    healthcheck: list[str], env: dict[str, str], cwd: Path, server: asyncio.subprocess.Process
) -> subprocess.CompletedProcess[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_DEADLINE_SECONDS
    while loop.time() < deadline:
        if server.returncode is not None:
            pytest.fail(f"usersvc serve exited with {server.returncode}")
        # Each try waits up to its own --timeout for the server to answer.
        result = await asyncio.to_thread(_run, healthcheck, env=env, cwd=cwd)
        if result.returncode == 0:
            return result
    pytest.fail(f"not SERVING within {STARTUP_DEADLINE_SECONDS}s")


async def test_the_dockerfiles_commands_migrate_serve_and_pass_the_healthcheck(
    installed: InstalledWheel, empty_database_url: str
) -> None:
    runtime = stage("runtime")
    entrypoint, command = runtime.exec_form("ENTRYPOINT"), runtime.exec_form("CMD")
    healthcheck = runtime.healthcheck()
    assert [*entrypoint, *command] == ["usersvc", "serve"]
    assert healthcheck[:2] == ["usersvc", "healthcheck"]
    assert runtime.env()["USERSVC_LISTEN_ADDR"] == "0.0.0.0:50051"

    key_file = installed.workdir / "signing-key.pem"
    env = _container_env(installed, empty_database_url, key_file)
    cwd = installed.workdir
    assert shutil.which("usersvc", path=env["PATH"]) == str(installed.bin / "usersvc")
    _check(
        await asyncio.to_thread(
            _run, [*entrypoint, "keys", "generate", "--out", str(key_file)], env=env, cwd=cwd
        )
    )
    # Nothing is listening yet: the health check must be able to fail.
    refused = await asyncio.to_thread(_run, healthcheck, env=env, cwd=cwd)
    assert refused.returncode == 1, refused

    _check(await asyncio.to_thread(_run, [*entrypoint, "migrate"], env=env, cwd=cwd))
    assert await migrations.current_async(empty_database_url) == migrations.head()

    log = installed.workdir / "serve.log"
    # The image's own command line (the installed script found on PATH),
    # checked with the image's own health check command.
    async with serve_process(env, log, wait=False, cwd=cwd, command=entrypoint) as server:
        try:
            healthy = await _wait_until_healthy(healthcheck, env, cwd, server.process)
            assert healthy.stdout.strip() == "SERVING"
            assert await server.stop(signal.SIGTERM, COMMAND_TIMEOUT_SECONDS) == 0
        except BaseException:
            print(server.log_text())
            raise
