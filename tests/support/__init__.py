"""Helpers every test tier shares: starting servers (servers.py), the
asyncio task guard (tasks.py). Importable as ``support`` because tests/ is on
sys.path (tests/conftest.py is the root conftest and tests/ is no package)."""
