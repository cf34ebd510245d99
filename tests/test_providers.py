"""Providers create exactly what they should, tolerate what already exists, and the guard
refuses anything that is not the tenant's own database or schema."""

import dataclasses
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from conftest import PG_LIBPQ, Tenants
from psycopg import sql

from tenant_pipelines import identity, migrate, registry
from tenant_pipelines.providers import (
    TEMPLATE_MARKER_PREFIX,
    GuardError,
    PostgresDatabase,
    PostgresSchema,
    SqlServer,
    drop_templates,
    guard,
    provider_for,
    template_for,
    tenant_engine,
)
from tenant_pipelines.settings import DEFAULT_MIGRATIONS_DIR, MODULES, Settings

NEW_REVISION = """# A new head for tenant_settings (test).
from alembic import op

revision = "tenant_settings_0002"
down_revision = "tenant_settings_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE template_probe (id int)")


def downgrade() -> None:
    op.execute("DROP TABLE template_probe")
"""


@pytest.fixture(autouse=True)
def no_template_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Drop the templates a test built (named with its settings' unique location prefix)."""
    used = [
        request.getfixturevalue(n) for n in ("settings", "pg_settings") if n in request.fixturenames
    ]
    yield
    for s in used:
        drop_templates(s)


def pg_query(
    database: str, query: str | sql.Composable, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    with psycopg.connect(PG_LIBPQ.rsplit("/", 1)[0] + "/" + database) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


def databases(prefix: str) -> dict[str, tuple[bool, str | None]]:
    """``{name: (allows connections, comment)}`` of the databases named with ``prefix``."""
    rows = pg_query(
        "postgres",
        "SELECT datname, datallowconn, shobj_description(oid, 'pg_database') FROM pg_database "
        "WHERE starts_with(datname, %s)",
        (prefix,),
    )
    return {name: (allow, comment) for name, allow, comment in rows}


def row_counts(database: str) -> dict[str, int]:
    """Rows of each table in the database's public schema."""
    query = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    count = sql.SQL("SELECT count(*) FROM {}")
    return {
        t: pg_query(database, count.format(sql.Identifier(t)))[0][0]
        for (t,) in pg_query(database, query)
    }


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


def test_new_database_is_a_clone_at_head_without_any_tenant_data(
    settings: Settings, tenants: Tenants
) -> None:
    first, second = tenants.create(), tenants.create()
    assert provider_for(settings, first).ensure() is True
    # The first tenant's own data must never reach the template, hence the second tenant.
    identity.seed(tenant_engine(settings, first), first, None)
    assert provider_for(settings, second).ensure() is True
    assert provider_for(settings, second).ensure() is False  # a retry after the clone
    eng = tenant_engine(settings, second)
    # At head before any migration step ran: the step is the at-head check.
    status = migrate.status(settings.migrations_dir, eng, second)
    assert list(status) == list(MODULES)
    assert all(cur == head and head is not None for cur, head in status.values())
    assert not any(r.changed for r in migrate.apply(settings.migrations_dir, eng, second))
    counts = row_counts(second.location)
    assert {f"alembic_version_{m}" for m in MODULES} | {"users", "roles"} <= set(counts)
    assert {t: n for t, n in counts.items() if not t.startswith("alembic_version_")} == {
        t: 0 for t in counts if not t.startswith("alembic_version_")
    }
    assert row_counts(first.location)["users"] == 1
    name, marker = template_for(settings, second.modules)
    found = databases(settings.location_prefix)
    assert found[name] == (False, marker)  # complete, marked, and refuses connections
    assert found[second.location] == (True, f"tenant-pipelines:tenant={second.id}")
    with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
        pg_query(name, "SELECT 1")


def test_template_is_rebuilt_when_a_module_head_changes(
    settings: Settings, tenants: Tenants, tmp_path: Path
) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, migrations)
    settings = dataclasses.replace(settings, migrations_dir=migrations)
    old_name, old_marker = template_for(settings, MODULES)
    # What a build killed half-way leaves: marked, under a temporary name.
    leftover = f"{settings.location_prefix}tplb_000000000000"
    with psycopg.connect(PG_LIBPQ, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(leftover)))
        conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(leftover), sql.Literal(old_marker)
            )
        )
    before = tenants.create()
    assert provider_for(settings, before).ensure() is True
    assert set(databases(settings.location_prefix)) == {old_name, before.location}

    (migrations / "tenant_settings" / "versions" / "0002_probe.py").write_text(NEW_REVISION)
    new_name, _ = template_for(settings, MODULES)
    assert new_name != old_name
    after = tenants.create()
    assert provider_for(settings, after).ensure() is True
    # The old heads' template is gone; the new one has the new revision.
    assert set(databases(settings.location_prefix)) == {new_name, before.location, after.location}
    status = migrate.status(migrations, tenant_engine(settings, after), after)
    assert status["tenant_settings"] == ("tenant_settings_0002", "tenant_settings_0002")
    assert "template_probe" in row_counts(after.location)
    # The tenant cloned before the change gets the revision from its migration step.
    applied = migrate.apply(migrations, tenant_engine(settings, before), before)
    assert [r.module for r in applied if r.changed] == ["tenant_settings"]


def test_concurrent_creations_build_the_template_once_and_all_clone_it(
    settings: Settings, tenants: Tenants, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[str] = []
    build = PostgresDatabase._build

    def counted(self: PostgresDatabase, *args: Any) -> bool:
        builds.append(self.tenant.id)
        return build(self, *args)

    monkeypatch.setattr(PostgresDatabase, "_build", counted)
    batch = [tenants.create() for _ in range(6)]
    start = threading.Barrier(len(batch))
    created: dict[str, bool | BaseException] = {}

    def create(tenant: registry.Tenant) -> None:
        start.wait()
        try:
            created[tenant.id] = provider_for(settings, tenant).ensure()
        except BaseException as exc:  # reported by the assertion below
            created[tenant.id] = exc

    threads = [threading.Thread(target=create, args=(t,)) for t in batch]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert created == {t.id: True for t in batch}
    assert len(builds) == 1
    for tenant in batch:  # every one a clone: at head without a migration step
        status = migrate.status(settings.migrations_dir, tenant_engine(settings, tenant), tenant)
        assert all(cur == head for cur, head in status.values()), tenant.id
    templates = [
        n
        for n, (_, c) in databases(settings.location_prefix).items()
        if (c or "").startswith(TEMPLATE_MARKER_PREFIX)
    ]
    assert templates == [template_for(settings, MODULES)[0]]


def test_unmarked_clone_left_by_a_dead_attempt_is_adopted_but_not_a_foreign_database(
    settings: Settings, tenants: Tenants
) -> None:
    orphan, foreign = tenants.create(), tenants.create()
    assert provider_for(settings, tenants.create()).ensure() is True  # builds the template
    name, _ = template_for(settings, MODULES)
    with psycopg.connect(PG_LIBPQ, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(orphan.location), sql.Identifier(name)
            )
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(foreign.location)))
    with psycopg.connect(PG_LIBPQ.rsplit("/", 1)[0] + "/" + foreign.location) as conn:
        conn.execute("CREATE TABLE foreign_data (id int)")
    assert provider_for(settings, orphan).ensure() is False
    assert databases(orphan.location)[orphan.location][1] == f"tenant-pipelines:tenant={orphan.id}"
    with pytest.raises(GuardError, match="does not belong"):
        provider_for(settings, foreign).ensure()


def test_broken_revision_gets_a_plain_database_and_fails_in_the_migration_step(
    settings: Settings, tenants: Tenants, tmp_path: Path
) -> None:
    from test_migrate import BROKEN

    migrations = tmp_path / "migrations"
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, migrations)
    (migrations / "identity" / "versions" / "9999_broken.py").write_text(BROKEN)
    settings = dataclasses.replace(settings, migrations_dir=migrations)
    tenant = tenants.create()
    assert provider_for(settings, tenant).ensure() is True
    assert row_counts(tenant.location) == {}
    assert set(databases(settings.location_prefix)) == {tenant.location}  # no half template
    with pytest.raises(migrate.MigrationError) as err:
        migrate.apply(migrations, tenant_engine(settings, tenant), tenant)
    assert (err.value.module, err.value.revision) == ("identity", "identity_9999")


def test_template_setting_off_creates_a_plain_database(
    settings: Settings, tenants: Tenants
) -> None:
    settings = dataclasses.replace(settings, tenant_pg_template=False)
    tenant = tenants.create()
    assert provider_for(settings, tenant).ensure() is True
    assert row_counts(tenant.location) == {}
    assert set(databases(settings.location_prefix)) == {tenant.location}


def test_schema_tenants_get_no_template(settings: Settings, tenants: Tenants) -> None:
    tenant = tenants.create(strategy="schema")
    assert provider_for(settings, tenant).ensure() is True
    assert databases(settings.location_prefix) == {}
