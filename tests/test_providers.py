"""Providers create exactly what they should, tolerate what already exists, and the guard
refuses anything that is not the tenant's own database or schema."""

import dataclasses

import psycopg
import pytest
import sqlalchemy as sa
from conftest import PG_LIBPQ, Tenants
from psycopg import sql

from tenant_pipelines import registry
from tenant_pipelines.providers import (
    GuardError,
    PostgresDatabase,
    PostgresSchema,
    SqlServer,
    guard,
    provider_for,
    tenant_engine,
)
from tenant_pipelines.settings import Settings


def test_database_per_tenant_is_created_once_and_marked(
    settings: Settings, tenants: Tenants
) -> None:
    tenant = tenants.create()
    prov = provider_for(settings, tenant)
    assert isinstance(prov, PostgresDatabase)
    assert not prov.exists()
    assert prov.ensure() is True
    assert prov.ensure() is False  # "already exists" never breaks a retry
    with psycopg.connect(PG_LIBPQ) as conn:
        comment = conn.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
            (tenant.location,),
        ).fetchone()
    assert comment == (f"tenant-pipelines:tenant={tenant.id}",)


def test_existing_database_of_someone_else_is_refused(settings: Settings, tenants: Tenants) -> None:
    tenant = tenants.create()
    with psycopg.connect(PG_LIBPQ, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(tenant.location)))
        conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS 'tenant-pipelines:tenant=other'").format(
                sql.Identifier(tenant.location)
            )
        )
    with pytest.raises(GuardError, match="does not belong"):
        provider_for(settings, tenant).ensure()


def test_empty_unmarked_database_left_by_a_dead_attempt_is_adopted(
    settings: Settings, tenants: Tenants
) -> None:
    tenant = tenants.create()
    with psycopg.connect(PG_LIBPQ, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(tenant.location)))
    assert provider_for(settings, tenant).ensure() is False


def test_schema_per_tenant_pins_search_path(settings: Settings, tenants: Tenants) -> None:
    tenant = tenants.create(strategy="schema")
    prov = provider_for(settings, tenant)
    assert isinstance(prov, PostgresSchema)
    assert prov.ensure() is True
    assert prov.ensure() is False
    with tenant_engine(settings, tenant).begin() as conn:
        assert conn.exec_driver_sql("SHOW search_path").scalar() == tenant.location
        conn.exec_driver_sql("CREATE TABLE probe (id int)")
        where = (
            conn.exec_driver_sql(
                "SELECT table_schema FROM information_schema.tables WHERE table_name = 'probe'"
            )
            .scalars()
            .all()
        )
    assert where == [tenant.location]


def test_sqlite_tenant_is_a_file_in_the_data_folder(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from conftest import make_settings

    s = make_settings(tmp_path / "data", tenant_pg_url="")
    registry.upgrade(s)
    tenant = registry.create_tenant(
        s, registry.TenantRequest(id="sqlite_one", name="S", admin_email="a@b.example"), "test"
    )
    assert tenant.provider == "sqlite"
    prov = provider_for(s, tenant)
    assert prov.ensure() is True and prov.ensure() is False
    assert (s.tenant_sqlite_dir / f"{s.location_prefix}sqlite_one.db").exists()
    prov.drop()
    assert not prov.exists()


def test_guard_refuses_the_control_plane_and_other_tenants(
    pg_settings: Settings, pg_tenants: Tenants
) -> None:
    tenant = pg_tenants.create()
    control = sa.make_url(pg_settings.control_url)
    with pytest.raises(GuardError, match="control-plane"):
        guard(pg_settings, tenant, control, {})
    other = sa.make_url(pg_settings.tenant_pg_url).set(database="tenant_someone_else")
    with pytest.raises(GuardError, match="does not belong"):
        guard(pg_settings, tenant, other, {})
    schema_tenant = dataclasses.replace(tenant, strategy="schema")
    with pytest.raises(GuardError, match="not pinned"):
        guard(pg_settings, schema_tenant, other, {"options": "-csearch_path=public"})


def test_unsafe_location_never_reaches_ddl(settings: Settings, tenants: Tenants) -> None:
    tenant = dataclasses.replace(tenants.create(), location='x"; DROP DATABASE postgres; --')
    with pytest.raises(GuardError, match="safe identifier"):
        provider_for(settings, tenant)


def test_sql_server_hook_generates_check_then_create_tsql(
    settings: Settings, tenants: Tenants
) -> None:
    tenant = dataclasses.replace(tenants.create(), provider="mssql", location="tenant_acme")
    stmts = SqlServer(settings, tenant).create_statements()
    assert stmts == ["IF DB_ID(N'tenant_acme') IS NULL CREATE DATABASE [tenant_acme]"]
    schema = dataclasses.replace(tenant, strategy="schema")
    assert SqlServer(settings, schema).create_statements() == [
        "IF SCHEMA_ID(N'tenant_acme') IS NULL EXEC(N'CREATE SCHEMA [tenant_acme]')"
    ]
    assert SqlServer.quote("a]b") == "[a]]b]"
    assert SqlServer.literal("o'brien") == "N'o''brien'"
    with pytest.raises(GuardError, match="not configured"):
        SqlServer(settings, tenant).ensure()
