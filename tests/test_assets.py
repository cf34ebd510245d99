"""The provisioning job, run in-process on a real Dagster instance against PostgreSQL,
Redis and SQLite."""

import datetime as dt
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import sqlalchemy as sa
from conftest import PG_LIBPQ, Tenants, make_settings, provision
from dagster import DagsterInstance
from psycopg import sql

from tenant_pipelines import cache, identity, migrate, registry
from tenant_pipelines.assets import STEP_NAMES
from tenant_pipelines.providers import provider_for, tenant_engine
from tenant_pipelines.settings import MODULES, Settings


def assert_provisioned(settings: Settings, tenant_id: str) -> None:
    tenant = registry.get_tenant(settings, tenant_id)
    assert tenant.status == "active", tenant.status_reason
    assert tenant.activated_at is not None
    eng = tenant_engine(settings, tenant)
    status = migrate.status(settings.migrations_dir, eng, tenant)
    assert list(status) == list(MODULES)
    assert all(cur == head for cur, head in status.values())
    with eng.connect() as conn:
        counts = identity.counts(conn)
        admins = conn.execute(
            sa.select(sa.func.count())
            .select_from(identity.users)
            .where(identity.users.c.email == tenant.admin_email)
        ).scalar_one()
    assert admins == 1
    assert counts["roles"] == len(identity.ROLES)
    assert identity.role_permission_sets(eng) == {
        r: sorted(p) for r, p in identity.ROLE_PERMISSIONS.items()
    }
    assert identity.valid_reset_tokens(eng, tenant) == 1
    if settings.redis_url:
        r = redis.Redis.from_url(settings.redis_url)
        for role, perms in identity.ROLE_PERMISSIONS.items():
            members = {m.decode() for m in r.smembers(cache.role_key(tenant_id, role))}
            assert members == set(perms)


def assert_steps_recorded(instance: DagsterInstance, run_id: str) -> None:
    stats = {s.step_key: s for s in instance.get_run_step_stats(run_id)}
    assert set(stats) == set(STEP_NAMES)
    for s in stats.values():
        assert s.status is not None and s.status.value == "SUCCESS"
        assert s.start_time and s.end_time and s.end_time >= s.start_time


def step_metadata(result: Any, step: str) -> dict[str, Any]:
    """The metadata a step attached to its output (shown on the step in the Dagster UI)."""
    (output,) = [e for e in result.events_for_node(step) if e.event_type_value == "STEP_OUTPUT"]
    return {k: v.value for k, v in output.event_specific_data.metadata.items()}


@pytest.mark.parametrize("strategy", ["database", "schema"])
def test_postgres_tenant_ends_active_with_everything_in_place(
    settings: Settings, tenants: Tenants, instance: DagsterInstance, strategy: str
) -> None:
    tenant = tenants.create(strategy=strategy)
    result = provision(settings, instance, tenant.id)
    assert result.success
    assert_provisioned(settings, tenant.id)
    assert_steps_recorded(instance, result.run_id)
    events = [e["event"] for e in registry.audit_trail(settings, tenant.id)]
    assert events[:2] == ["requested", "started"]
    assert events[-1] == "completed"
    assert events.count("step_succeeded") == len(STEP_NAMES)


def test_sqlite_tenant_ends_active_without_any_server(
    tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = make_settings(tmp_path / "data", tenant_pg_url="", redis_url="")
    for k, v in s.env().items():
        monkeypatch.setenv(k, v)
    registry.upgrade(s)
    tenant = registry.create_tenant(
        s, registry.TenantRequest(id="embedded", name="E", admin_email="a@e.example"), "test"
    )
    result = provision(s, instance, tenant.id)
    assert result.success
    assert_provisioned(s, tenant.id)
    assert step_metadata(result, "tenant_cache")["skipped"] == "redis not configured"
    assert step_metadata(result, "tenant_verified")["status"] == "active"


def test_rerun_on_active_tenant_is_a_no_op(
    settings: Settings, tenants: Tenants, instance: DagsterInstance
) -> None:
    tenant = tenants.create()
    assert provision(settings, instance, tenant.id).success
    registry.transition(settings, tenant.id, "requested", allowed_from=("active",))
    result = provision(settings, instance, tenant.id)
    assert result.success
    assert step_metadata(result, "tenant_migrations")["applied"] == 0
    assert_provisioned(settings, tenant.id)


def test_retry_after_database_already_exists_succeeds(
    settings: Settings, tenants: Tenants, instance: DagsterInstance
) -> None:
    tenant = tenants.create()
    provider_for(settings, tenant).ensure()  # a previous attempt created it
    assert provision(settings, instance, tenant.id).success
    assert_provisioned(settings, tenant.id)


def test_database_belonging_to_someone_else_fails_without_retry(
    settings: Settings, tenants: Tenants, instance: DagsterInstance
) -> None:
    tenant = tenants.create()
    with psycopg.connect(PG_LIBPQ, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(tenant.location)))
    with psycopg.connect(PG_LIBPQ.rsplit("/", 1)[0] + "/" + tenant.location, autocommit=True) as c:
        c.execute("CREATE TABLE foreign_data (id int)")
    result = provision(settings, instance, tenant.id)
    assert not result.success
    failed = registry.get_tenant(settings, tenant.id)
    assert failed.status == "failed"
    assert "does not belong" in (failed.status_reason or "")
    stats = {s.step_key: s for s in instance.get_run_step_stats(result.run_id)}
    assert stats["tenant_database"].attempts == 1


def test_deactivated_tenant_is_not_provisioned(
    settings: Settings, tenants: Tenants, instance: DagsterInstance
) -> None:
    tenant = tenants.create()
    registry.transition(settings, tenant.id, "deactivated", extra={"is_active": False})
    result = provision(settings, instance, tenant.id)
    assert not result.success
    assert registry.get_tenant(settings, tenant.id).status == "deactivated"
    assert not provider_for(settings, tenant).exists()


def test_expired_tenant_is_not_provisioned(
    settings: Settings, tenants: Tenants, instance: DagsterInstance
) -> None:
    tenant = tenants.create(valid_until=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1))
    registry.set_fields(
        settings, tenant.id, valid_until=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    )
    result = provision(settings, instance, tenant.id)
    assert not result.success
    assert not provider_for(settings, tenant).exists()
    assert "valid_until" in str(result.all_events)


def test_tenant_deactivated_mid_run_is_not_marked_active(
    settings: Settings, tenants: Tenants, instance: DagsterInstance
) -> None:
    tenant = tenants.create()
    # Deactivate as soon as the database exists: the next step must stop the run.
    original = provider_for(settings, tenant).__class__.ensure

    def ensure_then_deactivate(self):  # type: ignore[no-untyped-def]
        created = original(self)
        registry.transition(settings, tenant.id, "deactivated", extra={"is_active": False})
        return created

    mp = pytest.MonkeyPatch()
    mp.setattr(provider_for(settings, tenant).__class__, "ensure", ensure_then_deactivate)
    try:
        result = provision(settings, instance, tenant.id)
    finally:
        mp.undo()
    assert not result.success
    assert registry.get_tenant(settings, tenant.id).status == "deactivated"
