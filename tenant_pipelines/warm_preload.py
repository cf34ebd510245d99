"""Imported ONCE by the run-worker forkserver (:mod:`tenant_pipelines.launcher`).

Everything a run worker would otherwise import after it starts: ``import dagster`` loads its
submodules lazily, so without the explicit imports below each worker still spent 0.45-0.6 s
importing SQLAlchemy, Alembic, the storage modules, rich, structlog and upath.

Import only. Every run worker is a fork of the process that ran this module, so nothing here
may open a database connection, start a thread, create a gRPC channel or read settings that
can change: that state would be shared by (or stale in) every run. Our own code follows the
same rule (engines and tracer providers are created lazily), which is why it is preloaded
too; a deploy restarts the daemon and with it the forkserver.
"""

import dagster
import dagster._cli.api
import dagster._core.definitions.repository_definition.repository_data_builder
import dagster._core.execution.api
import dagster._core.executor.in_process
import dagster._core.executor.multiprocess
import dagster._core.instance.factory
import dagster._core.storage.event_log.sqlite
import dagster._core.storage.noop_compute_log_manager
import dagster._core.storage.runs.sqlite
import dagster._core.storage.schedules.sqlite
import dagster._core.system_config.composite_descent
import dagster._daemon.auto_run_reexecution.auto_run_reexecution
import dagster._daemon.controller  # noqa: F401
import dagster_postgres  # noqa: F401  (production storage)
import fsspec  # type: ignore[import-untyped]  # noqa: F401
import psycopg2.extras  # type: ignore[import-untyped]  # noqa: F401  (dagster-postgres)
import rich.console  # noqa: F401
import structlog  # noqa: F401
import upath
import upath.core
import upath.implementations.local  # noqa: F401

import tenant_pipelines.definitions
import tenant_pipelines.delivery  # noqa: F401  (imported by a step)
