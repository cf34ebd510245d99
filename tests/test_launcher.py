"""The forkserver run launcher (tenant_pipelines.launcher) under the real service: a run
succeeds in a forked worker, termination ends it CANCELED, a killed worker ends it FAILURE."""

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import test_runs
from conftest import Served, wait_for
from test_runs import SLOW_REVISION, final, request

from tenant_pipelines import launcher, registry, runs
from tenant_pipelines.launcher import (
    PID_TAG,
    PSTART_TAG,
    ForkserverRunLauncher,
    proc_start_time,
)

pytestmark = pytest.mark.slow

# The service-level fixtures of test_runs: a workspace context and a migration-file injector.
ctx = test_runs.ctx
revision = test_runs.revision


def _in_migrations(ctx: Any, run_id: str) -> bool:
    stats = ctx.instance.get_run_step_stats(run_id)
    return any(s.step_key == "tenant_migrations" and s.end_time is None for s in stats)


def test_shipped_instance_uses_the_forkserver_launcher(ctx: Any) -> None:
    assert isinstance(ctx.instance.run_launcher, ForkserverRunLauncher)


def test_run_succeeds_in_a_forked_worker(served: Served, ctx: Any) -> None:
    tenant = runs.create_tenant(ctx, served.settings, request(), "test")
    done = final(served, ctx, tenant.id)
    assert done.status == "active", done.status_reason
    run = ctx.instance.get_run_by_id(tenant.run_id)
    assert run.status.value == "SUCCESS"
    pid = int(run.tags[PID_TAG])
    assert run.tags[PSTART_TAG]
    # The worker exits with its run (the forkserver reaps it).
    wait_for(lambda: proc_start_time(pid) != run.tags[PSTART_TAG], what="worker exit")


def test_terminate_ends_the_run_canceled(served: Served, ctx: Any, revision: Any) -> None:
    slow = revision("auditing", "9998_slow.py", SLOW_REVISION)
    tenant = runs.create_tenant(ctx, served.settings, request(), "test")
    wait_for(lambda: _in_migrations(ctx, tenant.run_id), timeout=30, what="migration step")
    runs.terminate(ctx, tenant.run_id)
    wait_for(
        lambda: ctx.instance.get_run_by_id(tenant.run_id).is_finished,
        timeout=30,
        what="the run to finish",
    )
    assert ctx.instance.get_run_by_id(tenant.run_id).status.value == "CANCELED"
    slow.unlink()


def test_killed_worker_ends_the_run_failure(served: Served, ctx: Any, revision: Any) -> None:
    slow = revision("auditing", "9998_slow.py", SLOW_REVISION)
    tenant = runs.create_tenant(ctx, served.settings, request(), "test")
    wait_for(lambda: _in_migrations(ctx, tenant.run_id), timeout=30, what="migration step")
    run = ctx.instance.get_run_by_id(tenant.run_id)
    os.kill(int(run.tags[PID_TAG]), signal.SIGKILL)
    wait_for(
        lambda: ctx.instance.get_run_by_id(tenant.run_id).is_finished,
        timeout=30,
        what="the run to finish",
    )
    assert ctx.instance.get_run_by_id(tenant.run_id).status.value == "FAILURE"
    slow.unlink()
    # run_retries resumes it from the failed step; the tenant still ends active.
    done = final(served, ctx, tenant.id, timeout=90)
    wait_for(
        lambda: registry.get_tenant(served.settings, tenant.id).status == "active",
        timeout=90,
        what="the retried run to finish the tenant",
    )
    assert done.status in registry.FINAL_STATUSES


class _RecordingEvent(threading.Event):
    """An event whose waits return at once and are recorded (no wall-clock in the test)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return False


def test_dequeue_loop_honours_an_interval_below_half_a_second() -> None:
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import (
        QueuedRunCoordinatorDaemon,
    )

    launcher.use_exact_dequeue_interval()
    daemon = QueuedRunCoordinatorDaemon(interval_seconds=0.2)
    passes: list[float] = []

    def one_pass(_context: object) -> Iterator[None]:
        passes.append(time.monotonic())
        yield None

    daemon.run_iteration = one_pass  # type: ignore[method-assign]
    shutdown = _RecordingEvent()
    loop = daemon.core_loop(None, shutdown)  # type: ignore[arg-type]
    while len(passes) < 5:
        next(loop)
    # Dagster's own loop waits in 0.5 s slices whatever the interval; ours waits out the rest
    # of the interval, once per pass.
    assert shutdown.waits and all(w is not None and 0 < w <= 0.2 for w in shutdown.waits)
    assert len(shutdown.waits) >= len(passes) - 1


def test_run_storage_reads_its_schema_once_instead_of_on_every_run_query() -> None:
    import uuid

    import sqlalchemy as sa
    from conftest import pg_database
    from dagster import instance_for_test

    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    def catalog(found: list[str]) -> list[str]:
        return [s for s in found if "pg_catalog" in s or "pg_attribute" in s]

    with pg_database(f"tp_dg_{uuid.uuid4().hex[:10]}") as url:
        # dagster-postgres speaks psycopg2 (docs/production.md).
        url = url.replace("+psycopg:", "+psycopg2:")
        overrides = {"storage": {"postgres": {"postgres_url": url}}}
        with instance_for_test(overrides=overrides) as instance:
            sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
            try:
                instance.get_run_records()
                instance.get_run_records()
                uncached = list(statements)
                launcher.pool_storage(instance, max_overflow=0)
                statements.clear()
                for _ in range(3):
                    instance.get_run_records()
            finally:
                sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)
    # Dagster alone reflects the runs table's columns before every runs query...
    assert len(catalog(uncached)) >= 2
    # ...and no more once the columns are known: one statement per query.
    assert catalog(statements) == [] and len(statements) == 3, statements
