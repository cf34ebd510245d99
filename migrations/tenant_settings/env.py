"""Alembic environment for the tenant_settings migrations: shared with every module."""

from tenant_pipelines.migrate import run_env

run_env()
