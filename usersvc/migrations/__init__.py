"""Alembic migration scripts (env.py, versions/), shipped inside the package
so that every install can run ``usersvc migrate``. Nothing here is imported
by the service: Alembic loads the files by path."""
