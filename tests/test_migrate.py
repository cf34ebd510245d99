"""Module migrations: fixed order, own version tables, skip at head, stop at first failure."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import REPO, Tenants

from tenant_pipelines import migrate
from tenant_pipelines.providers import provider_for, tenant_engine
from tenant_pipelines.settings import DEFAULT_MIGRATIONS_DIR, MODULES, Settings

BROKEN = (REPO / "docs" / "examples" / "broken_revision.py").read_text()


def copy_migrations(tmp_path: Path) -> Path:
    target = tmp_path / "migrations"
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, target)
    return target


def without_template(settings: Settings) -> Settings:
    """These tests migrate an empty database: no clone of a pre-migrated template."""
    return dataclasses.replace(settings, tenant_pg_template=False)


@pytest.mark.parametrize("strategy", ["database", "schema"])
def test_every_module_reaches_head_with_its_own_version_table(
    settings: Settings, tenants: Tenants, strategy: str
) -> None:
    settings = without_template(settings)
    tenant = tenants.create(strategy=strategy)
    provider_for(settings, tenant).ensure()
    eng = tenant_engine(settings, tenant)
    results = migrate.apply(settings.migrations_dir, eng, tenant)
    assert [r.module for r in results] == list(MODULES)
    assert all(r.changed for r in results)
    status = migrate.status(settings.migrations_dir, eng, tenant)
    assert all(cur == head and head is not None for cur, head in status.values())
    tables = set(sa.inspect(eng).get_table_names(schema=migrate.schema_of(tenant)))
    assert {f"alembic_version_{m}" for m in MODULES} <= tables
    assert {
        "users",
        "roles",
        "permissions",
        "user_tokens",
        "tenant_settings",
        "audit_log",
    } <= tables
    again = migrate.apply(settings.migrations_dir, eng, tenant)
    assert not any(r.changed for r in again)


def test_schema_tenants_do_not_see_each_others_tables(settings: Settings, tenants: Tenants) -> None:
    a, b = tenants.create(strategy="schema"), tenants.create(strategy="schema")
    for t in (a, b):
        provider_for(settings, t).ensure()
        migrate.apply(settings.migrations_dir, tenant_engine(settings, t), t)
    with tenant_engine(settings, a).begin() as conn:
        conn.exec_driver_sql("INSERT INTO roles (name, description) VALUES ('only_a', 'x')")
    with tenant_engine(settings, b).connect() as conn:
        names = conn.exec_driver_sql("SELECT name FROM roles").scalars().all()
    assert "only_a" not in names


def test_failed_revision_stops_with_module_revision_and_error(
    settings: Settings, tenants: Tenants, tmp_path: Path
) -> None:
    migrations = copy_migrations(tmp_path)
    (migrations / "identity" / "versions" / "9999_broken.py").write_text(BROKEN)
    tenant = tenants.create()
    provider_for(without_template(settings), tenant).ensure()
    eng = tenant_engine(settings, tenant)
    with pytest.raises(migrate.MigrationError) as err:
        migrate.apply(migrations, eng, tenant)
    assert err.value.module == "identity"
    assert err.value.revision == "identity_9999"
    assert "no_such_table" in err.value.error
    assert not err.value.transient
    status = migrate.status(migrations, eng, tenant)
    # identity_0001 committed before the failure; later modules never started.
    assert status["identity"][0] == "identity_0001"
    assert status["tenant_settings"][0] is None
    (migrations / "identity" / "versions" / "9999_broken.py").unlink()
    results = migrate.apply(migrations, eng, tenant)
    assert [r.changed for r in results] == [False, True, True]


def test_upgrade_modules_needs_no_tenant_and_reports_heads(
    settings: Settings, tenants: Tenants
) -> None:
    # The template build's entry point: a module list and a schema, no tenant object.
    tenant = tenants.create()
    provider_for(without_template(settings), tenant).ensure()
    eng = tenant_engine(settings, tenant)
    results = migrate.upgrade_modules(settings.migrations_dir, eng, ["identity"], None)
    assert [(r.module, r.before, r.after) for r in results] == [("identity", None, "identity_0001")]
    status = migrate.status(settings.migrations_dir, eng, tenant)
    assert status["identity"] == ("identity_0001", "identity_0001")
    assert status["auditing"] == (None, "auditing_0001")
    assert migrate.heads(settings.migrations_dir, MODULES) == {
        m: head for m, (_, head) in status.items()
    }
