"""Alembic environment for the control migrations: shared with every module."""

from tenant_pipelines.migrate import run_env

run_env()
