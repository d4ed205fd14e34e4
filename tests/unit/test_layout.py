"""The repository's layout and what installs from it: the top-level alembic/
directory of migration scripts must not hide the alembic library, and every
package on disk must be in the wheel's package list."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from usersvc.adapters import migrations

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "alembic"


def _packages_on_disk(directory: Path, name: str) -> set[str]:
    """``name`` and every subdirectory of ``directory`` that holds a file,
    as dotted package names."""
    found = {name}
    for path in directory.rglob("*"):
        if (
            path.is_dir()
            and path.name != "__pycache__"
            and any(child.is_file() for child in path.iterdir())
        ):
            found.add(".".join([name, *path.relative_to(directory).parts]))
    return found


def test_the_top_level_alembic_directory_is_not_a_regular_package() -> None:
    assert (SCRIPTS / "env.py").is_file()
    assert (SCRIPTS / "script.py.mako").is_file()
    assert not (SCRIPTS / "__init__.py").exists()


def test_import_alembic_from_the_repository_root_gets_the_library() -> None:
    # cwd is the first entry of sys.path for `python -c`, as for `alembic`
    # run through alembic.ini's prepend_sys_path: the library must still win.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import alembic, alembic.command, alembic.op, alembic.context; "
            "print(alembic.__file__); print(callable(alembic.command.upgrade))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    location, upgrade_is_callable = result.stdout.split()
    assert not Path(location).is_relative_to(ROOT / "alembic"), location
    assert upgrade_is_callable == "True"


def test_usersvc_migrate_finds_the_scripts_of_the_top_level_directory() -> None:
    assert migrations.script_location() == SCRIPTS.resolve()
    versions = sorted(path.name for path in (SCRIPTS / "versions").glob("*.py"))
    assert versions[0].startswith("0001_")
    assert migrations.head() is not None


def test_every_package_on_disk_is_in_the_wheels_package_list() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    package_dirs = config["package-dir"]
    on_disk = set()
    for package in {name for name in listed if "." not in name}:
        on_disk |= _packages_on_disk(ROOT / package_dirs.get(package, package), package)
    assert listed == on_disk
    assert package_dirs["usersvc_migrations"] == "alembic"
