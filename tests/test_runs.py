"""Provisioning through the real queue, daemon and run workers of a running service:
launch, retry from failure, cancel, one run per tenant, and the reconciling sensor."""

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import REPO, Served, uid, wait_for
from dagster import DagsterInstance

from tenant_pipelines import registry, runs
from tenant_pipelines.identity import counts
from tenant_pipelines.providers import tenant_engine

pytestmark = pytest.mark.slow

SLOW_REVISION = '''"""Slow on purpose (test).

Revision ID: auditing_9998
"""
from alembic import op

revision = "auditing_9998"
down_revision = "auditing_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SELECT pg_sleep(6)")


def downgrade() -> None:
    pass
'''

BROKEN_REVISION = (REPO / "docs" / "examples" / "broken_revision.py").read_text()


@pytest.fixture(scope="module")
def ctx(served: Served) -> Iterator[Any]:
    """A workspace context on the served instance, for launching runs from the test."""
    with pytest.MonkeyPatch.context() as mp:
        # The code server this context starts resolves the resources' TP_* variables.
        for key, value in served.settings.env().items():
            mp.setenv(key, value)
        mp.setenv("DAGSTER_HOME", str(served.data_dir / "dagster"))
        with DagsterInstance.get() as instance, runs.workspace(instance) as workspace:
            yield workspace


def request(**kw: Any) -> registry.TenantRequest:
    tenant_id = kw.pop("id", uid())
    return registry.TenantRequest(
        id=tenant_id,
        name="E2E",
        admin_email=f"admin@{tenant_id.replace('_', '-')}.example.com",
        **kw,
    )


def final(served: Served, ctx: Any, tenant_id: str, timeout: float = 60) -> registry.Tenant:
    """Wait until the tenant is in a final status and its run has finished too."""

    def done() -> registry.Tenant | None:
        t = registry.get_tenant(served.settings, tenant_id)
        if t.status not in registry.FINAL_STATUSES or not t.run_id:
            return None
        run = ctx.instance.get_run_by_id(t.run_id)
        return t if run is not None and run.is_finished else None

    return wait_for(done, timeout=timeout, what=f"{tenant_id} to reach a final status")


@pytest.fixture
def revision(served: Served) -> Iterator[Any]:
    """Drop a revision file into the served migrations; always removed afterwards."""
    placed: list[Path] = []

    def place(module: str, name: str, text: str) -> Path:
        path = served.migrations_dir / module / "versions" / name
        path.write_text(text)
        placed.append(path)
        return path

    yield place
    for path in placed:
        path.unlink(missing_ok=True)


def test_create_goes_through_queue_and_daemon_to_active(served: Served, ctx: Any) -> None:
    tenant = runs.create_tenant(ctx, served.settings, request(), "test")
    assert tenant.status == "requested" and tenant.run_id
    done = final(served, ctx, tenant.id)
    assert done.status == "active", done.status_reason
    history = runs.history(ctx.instance, tenant.id)
    assert len(history) == 1 and history[0]["status"] == "SUCCESS"
    assert history[0]["correlation_id"] == tenant.correlation_id
    steps = history[0]["steps"]
    assert [s["step"] for s in steps][0] == "tenant_validated"
    assert all(s["start"] and s["end"] and s["duration_s"] is not None for s in steps)


def test_history_caches_settled_runs_and_shows_a_new_run_at_once(
    served: Served, ctx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runs, "SETTLED_AFTER_S", 0.0)
    tenant = runs.create_tenant(ctx, served.settings, request(), "test")
    first = final(served, ctx, tenant.id)
    before = runs.history(ctx.instance, tenant.id)
    assert [r["run_id"] for r in before] == [first.run_id]
    assert runs.settled_runs.get(first.run_id) is before[0], "a finished run is kept"
    # The kept entry is what a fresh read of Dagster's storage gives.
    runs.settled_runs.clear()
    assert runs.history(ctx.instance, tenant.id) == before

    again = runs.activate(ctx, served.settings, tenant.id, "test")
    queued = runs.history(ctx.instance, tenant.id)
    assert [r["run_id"] for r in queued] == [again.run_id, first.run_id]
    second = final(served, ctx, tenant.id)
    done = runs.history(ctx.instance, tenant.id)
    assert [r["status"] for r in done] == ["SUCCESS", "SUCCESS"]
    assert done[0]["correlation_id"] == second.correlation_id
    assert done[0]["steps"] and all(s["status"] == "SUCCESS" for s in done[0]["steps"])
    assert runs.history(ctx.instance, tenant.id, limit=1) == done[:1]


def test_history_does_not_keep_a_run_that_is_not_settled(
    served: Served, ctx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runs, "SETTLED_AFTER_S", 3600.0)
    tenant = runs.create_tenant(ctx, served.settings, request(), "test")
    in_flight = runs.history(ctx.instance, tenant.id)
    assert [r["run_id"] for r in in_flight] == [tenant.run_id]
    assert runs.settled_runs.get(tenant.run_id or "") is None, "queued or running"
    final(served, ctx, tenant.id)
    # Finished, but not SETTLED_AFTER_S ago: its last events may still be on their way.
    assert runs.history(ctx.instance, tenant.id)[0]["status"] == "SUCCESS"
    assert runs.settled_runs.get(tenant.run_id or "") is None


def test_settled_runs_cache_is_bounded_and_keeps_the_recently_used() -> None:
    cache = runs._SettledRuns(2)
    cache.put("a", {"run_id": "a"})
    cache.put("b", {"run_id": "b"})
    assert cache.get("a") == {"run_id": "a"}
    cache.put("c", {"run_id": "c"})
    assert cache.get("b") is None, "the least recently used goes first"
    assert cache.get("a") and cache.get("c")


def test_retry_resumes_from_failed_migration(served: Served, ctx: Any, revision: Any) -> None:
    broken = revision("identity", "9999_broken.py", BROKEN_REVISION)
    tenant = runs.create_tenant(ctx, served.settings, request(), "test")
    failed = final(served, ctx, tenant.id)
    assert failed.status == "failed"
    reason = failed.status_reason or ""
    assert "identity" in reason and "identity_9999" in reason and "no_such_table" in reason
    first_run = failed.run_id
    broken.unlink()
    retried = runs.retry(ctx, served.settings, tenant.id, "test")
    assert retried.correlation_id != tenant.correlation_id
    done = final(served, ctx, tenant.id)
    assert done.status == "active", done.status_reason
    child = ctx.instance.get_run_by_id(done.run_id)
    assert child.parent_run_id == first_run
    executed = {s.step_key for s in ctx.instance.get_run_step_stats(done.run_id)}
    assert "tenant_database" not in executed and "tenant_validated" not in executed
    assert "tenant_migrations" in executed
    events = [e["event"] for e in registry.audit_trail(served.settings, tenant.id)]
    assert events.index("failed") < events.index("retry_requested") < events.index("completed")


def test_retry_is_refused_for_an_active_tenant(served: Served, ctx: Any) -> None:
    tenant = runs.create_tenant(ctx, served.settings, request(), "test")
    assert final(served, ctx, tenant.id).status == "active"
    with pytest.raises(registry.ConflictError):
        runs.retry(ctx, served.settings, tenant.id, "test")


def test_cancel_running_provisioning_then_retry_completes(
    served: Served, ctx: Any, revision: Any
) -> None:
    revision("auditing", "9998_slow.py", SLOW_REVISION)
    tenant = runs.create_tenant(ctx, served.settings, request(), "test")

    def in_migrations() -> bool:
        stats = ctx.instance.get_run_step_stats(tenant.run_id)
        return any(s.step_key == "tenant_migrations" and s.end_time is None for s in stats)

    wait_for(in_migrations, timeout=30, what="the migration step to start")
    runs.cancel(ctx, served.settings, tenant.id, "test")
    cancelled = final(served, ctx, tenant.id, timeout=30)
    assert cancelled.status == "cancelled"
    run = ctx.instance.get_run_by_id(tenant.run_id)
    wait_for(
        lambda: ctx.instance.get_run_by_id(tenant.run_id).is_finished,
        timeout=30,
        what="the run to finish",
    )
    assert ctx.instance.get_run_by_id(tenant.run_id).status.value == "CANCELED", run
    # The slow revision stays: the retry applies it (or finds it applied, when the
    # termination landed after its commit) and completes.
    runs.retry(ctx, served.settings, tenant.id, "test")
    done = final(served, ctx, tenant.id)
    assert done.status == "active", done.status_reason


def test_two_requests_for_one_tenant_run_one_at_a_time(served: Served, ctx: Any) -> None:
    tenant = runs.create_tenant(ctx, served.settings, request(), "test")
    second = runs.submit(ctx, tenant.id, tenant.correlation_id or "", "test")
    wait_for(
        lambda: all(ctx.instance.get_run_by_id(r).is_finished for r in (tenant.run_id, second)),
        timeout=60,
        what="both runs",
    )
    windows = []
    for run_id in (tenant.run_id, second):
        rec = ctx.instance.get_run_record_by_id(run_id)
        assert rec.dagster_run.status.value == "SUCCESS"
        windows.append((rec.start_time, rec.end_time))
    windows.sort()
    assert windows[0][1] <= windows[1][0], "the two runs overlapped"
    assert registry.get_tenant(served.settings, tenant.id).status == "active"
    t = registry.get_tenant(served.settings, tenant.id)
    with tenant_engine(served.settings, t).connect() as conn:
        assert counts(conn)["users"] == 1


def test_sensor_provisions_tenant_inserted_straight_into_catalog_once(
    served: Served, ctx: Any
) -> None:
    tenant_id = uid()
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    with registry.engine(served.settings).begin() as conn:
        conn.execute(
            registry.tenants.insert().values(
                id=tenant_id,
                name="Inserted by hand",
                provider="postgresql",
                strategy="database",
                server=registry.server_for(served.settings, "postgresql"),
                location=f"{served.settings.location_prefix}{tenant_id}",
                admin_email="ops@inserted.example.com",
                is_active=True,
                demo_data=False,
                modules=["identity", "tenant_settings", "auditing"],
                status="requested",
                credentials_state="pending",
                created_at=past,
                updated_at=past,
            )
        )
    done = final(served, ctx, tenant_id, timeout=60)
    assert done.status == "active", done.status_reason
    # Another sensor tick must not start a second run.
    import time

    time.sleep(7)
    assert len(runs.runs_of(ctx.instance, tenant_id)) == 1
    actors = {e["actor"] for e in registry.audit_trail(served.settings, tenant_id)}
    assert "sensor" in actors
    with registry.engine(served.settings).connect() as conn:
        assert conn.execute(
            sa.select(registry.tenants.c.correlation_id).where(registry.tenants.c.id == tenant_id)
        ).scalar()
