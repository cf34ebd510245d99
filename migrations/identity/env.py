"""Alembic environment for the identity migrations: shared with every module."""

from tenant_pipelines.migrate import run_env

run_env()
