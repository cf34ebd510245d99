"""The catalog: validation rejects bad requests and writes nothing; the status machine."""

import datetime as dt
import threading

import psycopg
import pytest
import sqlalchemy as sa
from conftest import PG_LIBPQ, Tenants, uid

from tenant_pipelines import registry
from tenant_pipelines.settings import Settings


def _nothing_written(settings: Settings, tenant_id: str) -> None:
    with registry.engine(settings).connect() as conn:
        assert (
            conn.execute(
                sa.select(registry.tenants).where(registry.tenants.c.id == tenant_id)
            ).first()
            is None
        )
        assert (
            conn.execute(
                sa.select(registry.audit_events).where(
                    registry.audit_events.c.tenant_id == tenant_id
                )
            ).first()
            is None
        )
    with psycopg.connect(PG_LIBPQ) as conn:
        assert (
            conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s",
                (f"{settings.location_prefix}{tenant_id}",),
            ).fetchone()
            is None
        )


BAD_REQUESTS = [
    ({"id": "Acme"}, "id"),
    ({"id": "ab"}, "id"),
    ({"id": "1acme"}, "id"),
    ({"id": "acme-corp"}, "id"),
    ({"id": "a" * 41}, "id"),
    ({"id": "acme; drop table tenants"}, "id"),
    ({"id": "postgres"}, "id"),
    ({"id": "template0"}, "id"),
    ({"id": "template1"}, "id"),
    ({"id": "pg_evil"}, "id"),
    ({"id": "root"}, "id"),
    ({"provider": "oracle"}, "provider"),
    ({"strategy": "table"}, "strategy"),
    ({"provider": "sqlite", "strategy": "schema"}, "strategy"),
    ({"provider": "mssql"}, "provider"),
    ({"modules": ("identity", "billing")}, "modules"),
    ({"modules": ("auditing",)}, "modules"),
    ({"admin_email": "not-an-email"}, "admin_email"),
    ({"admin_email": "a@b"}, "admin_email"),
    ({"admin_email": "x@y.com\nBcc: evil@z.com"}, "admin_email"),
    ({"name": ""}, "name"),
    ({"name": "bad\x00name"}, "name"),
    ({"valid_until": dt.datetime(2020, 1, 1, tzinfo=dt.UTC)}, "valid_until"),
    ({"valid_until": dt.datetime(2999, 1, 1)}, "valid_until"),
    ({"location": "postgres"}, "location"),
    ({"location": "tenant_shared"}, "location"),
    ({"location": "../../etc/passwd"}, "location"),
    ({"location": "Bad Name"}, "location"),
]


@pytest.mark.parametrize(("override", "field"), BAD_REQUESTS)
def test_invalid_request_is_rejected_and_writes_nothing(
    settings: Settings, tenants: Tenants, override: dict[str, object], field: str
) -> None:
    req = tenants.request(**{"id": uid(), **override})
    with pytest.raises(registry.ValidationError) as err:
        registry.create_tenant(settings, req, "test")
    assert field in err.value.errors
    _nothing_written(settings, req.id if isinstance(req.id, str) else "x")


def test_location_of_control_plane_database_is_refused(
    pg_settings: Settings, pg_tenants: Tenants
) -> None:
    control_db = sa.make_url(pg_settings.control_url).database
    with pytest.raises(registry.ValidationError) as err:
        pg_tenants.create(location=control_db)
    assert "control-plane" in err.value.errors["location"]


def test_location_of_another_tenant_is_refused(settings: Settings, tenants: Tenants) -> None:
    first = tenants.create()
    with pytest.raises(registry.ValidationError) as err:
        tenants.create(location=first.location)
    assert first.id in err.value.errors["location"]


def test_duplicate_identifier_is_a_conflict(settings: Settings, tenants: Tenants) -> None:
    first = tenants.create()
    with pytest.raises(registry.ConflictError):
        tenants.create(id=first.id)
    assert len(registry.audit_trail(settings, first.id)) == 1


def test_twenty_concurrent_creates_of_one_id_make_one_tenant(
    pg_settings: Settings, pg_tenants: Tenants
) -> None:
    req = pg_tenants.request()
    outcomes: list[str] = []

    def create() -> None:
        try:
            registry.create_tenant(pg_settings, req, "test")
            outcomes.append("created")
        except registry.ConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=create) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("created") == 1
    assert outcomes.count("conflict") == 19
    assert [e["event"] for e in registry.audit_trail(pg_settings, req.id)] == ["requested"]


def test_created_tenant_is_requested_with_normalized_email(
    settings: Settings, tenants: Tenants
) -> None:
    tenant = tenants.create(admin_email="  Admin@Example.COM ")
    assert tenant.status == "requested"
    assert tenant.admin_email == "admin@example.com"
    assert tenant.provider == "postgresql"
    assert tenant.location == f"{settings.location_prefix}{tenant.id}"
    assert tenant.modules == ("identity", "tenant_settings", "auditing")


def test_transition_has_one_winner_among_concurrent_callers(
    pg_settings: Settings, pg_tenants: Tenants
) -> None:
    tenant = pg_tenants.create()
    registry.transition(pg_settings, tenant.id, "failed", reason="boom")
    wins: list[bool] = []
    threads = [
        threading.Thread(
            target=lambda: wins.append(
                registry.transition(pg_settings, tenant.id, "requested", allowed_from=("failed",))
            )
        )
        for _ in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1


@pytest.mark.parametrize("control", ["postgresql", "sqlite"])
def test_tenant_lock_excludes_a_second_holder_and_is_released(
    request: pytest.FixtureRequest, control: str
) -> None:
    settings: Settings = request.getfixturevalue(
        "pg_settings" if control == "postgresql" else "settings"
    )
    tenant_id = uid()
    with registry.tenant_lock(settings, tenant_id, 1):
        got = []

        def other() -> None:
            try:
                with registry.tenant_lock(settings, tenant_id, 0.3):
                    got.append("acquired")
            except registry.LockTimeout:
                got.append("timeout")

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert got == ["timeout"]
    with registry.tenant_lock(settings, tenant_id, 1):
        pass
