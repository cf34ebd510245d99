"""The API's in-memory catalog, against a real control plane (SQLite and PostgreSQL)."""

import datetime as dt
import json
import time
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Tenants

from tenant_pipelines import readmodel, registry, runs
from tenant_pipelines.settings import Settings


@pytest.fixture(params=["sqlite", "postgresql"])
def control(request: pytest.FixtureRequest) -> Settings:
    name = "settings" if request.param == "sqlite" else "pg_settings"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def page(model: readmodel.ReadModel, status: str | None, limit: int, offset: int) -> Any:
    body = model.page(status, limit, offset)
    assert body is not None
    return json.loads(body)


def expected_page(settings: Settings, status: str | None, limit: int, offset: int) -> Any:
    items, total = registry.list_tenants(settings, status, limit, offset)
    return {
        "items": [t.to_json() for t in items],
        "total": total,
        "limit": limit,
        "offset": offset,
    }


def test_pages_equal_the_database_query_for_every_filter_and_offset(control: Settings) -> None:
    t = Tenants(control)
    ids = [t.create().id for _ in range(7)]
    registry.transition(control, ids[2], "failed", allowed_from=("requested",), reason="x")
    model = readmodel.ReadModel(control, registry.Tenant.to_json)
    model.refresh()
    for status in (None, "requested", "failed", "active"):
        for limit, offset in ((50, 0), (3, 0), (3, 3), (2, 6), (5, 100)):
            assert page(model, status, limit, offset) == expected_page(
                control, status, limit, offset
            )


def test_another_writers_changes_and_deletes_appear_at_the_next_refresh(control: Settings) -> None:
    t = Tenants(control)
    model = readmodel.ReadModel(control, registry.Tenant.to_json)
    model.refresh()
    tenant = t.create()
    model.refresh()
    assert model.tenant(tenant.id) is not None
    registry.transition(control, tenant.id, "failed", allowed_from=("requested",), reason="x")
    model.refresh()
    current = model.tenant(tenant.id)
    assert current is not None and current.status == "failed"
    with registry.engine(control).begin() as conn:
        conn.execute(registry.tenants.delete().where(registry.tenants.c.id == tenant.id))
    model.refresh()
    assert model.tenant(tenant.id) is None
    assert page(model, None, 50, 0) == expected_page(control, None, 50, 0)


def test_a_row_written_with_an_old_updated_at_is_still_found(control: Settings) -> None:
    t = Tenants(control)
    t.create()
    model = readmodel.ReadModel(control, registry.Tenant.to_json)
    model.refresh()
    late = t.create()
    long_ago = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    with registry.engine(control).begin() as conn:
        conn.execute(
            registry.tenants.update()
            .where(registry.tenants.c.id == late.id)
            .values(updated_at=long_ago, created_at=long_ago)
        )
    model.refresh()
    assert model.tenant(late.id) is not None


def provisioning_body(tenant: registry.Tenant, status: str, ended: float | None) -> dict[str, Any]:
    end = dt.datetime.fromtimestamp(ended, dt.UTC).isoformat() if ended else None
    return {
        "tenant_id": tenant.id,
        "status": tenant.status,
        "correlation_id": tenant.correlation_id,
        "runs": [{"run_id": "r1", "status": status, "end": end, "steps": []}],
    }


def test_a_provisioning_answer_is_kept_briefly_in_flight_and_while_settled_and_unchanged(
    settings: Settings,
) -> None:
    t = Tenants(settings)
    tenant = t.create()
    model = readmodel.ReadModel(settings, registry.Tenant.to_json)
    model.refresh()
    now = time.time()
    in_flight = provisioning_body(tenant, "STARTED", None)
    encoded = model.keep_provisioning(tenant, in_flight, now)
    assert model.provisioning(tenant.id) == encoded  # reused for readmodel.POLL_S at most
    time.sleep(readmodel.POLL_S + 0.05)
    assert model.provisioning(tenant.id) is None
    now = time.time()
    just_ended = provisioning_body(tenant, "SUCCESS", now - 1)
    model.keep_provisioning(tenant, just_ended, now)
    time.sleep(readmodel.POLL_S + 0.05)
    assert model.provisioning(tenant.id) is None  # its last events may still be written
    now = time.time()
    settled = provisioning_body(tenant, "SUCCESS", now - runs.SETTLED_AFTER_S - 1)
    encoded = model.keep_provisioning(tenant, settled, now)
    time.sleep(readmodel.POLL_S + 0.05)
    assert model.provisioning(tenant.id) == encoded  # for as long as the tenant is unchanged
    assert json.loads(encoded) == settled
    registry.transition(settings, tenant.id, "failed", allowed_from=("requested",), reason="x")
    model.refresh()
    assert model.provisioning(tenant.id) is None  # a new status, maybe a new run: read again


def test_the_poller_picks_up_changes_by_itself(settings: Settings) -> None:
    t = Tenants(settings)
    model = readmodel.ReadModel(settings, registry.Tenant.to_json)
    model.start()
    try:
        tenant = t.create()
        deadline = time.monotonic() + 10
        while model.tenant(tenant.id) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert model.tenant(tenant.id) is not None
    finally:
        model.stop()


def test_the_updated_at_index_exists(control: Settings) -> None:
    with registry.engine(control).connect() as conn:
        indexes = sa.inspect(conn).get_indexes("tenants")
    assert any(ix["column_names"] == ["updated_at"] for ix in indexes)


def test_warm_up_computes_each_settled_tenant_once_and_leaves_runs_in_flight(
    settings: Settings,
) -> None:
    t = Tenants(settings)
    settled = t.create()
    registry.transition(settings, settled.id, "failed", allowed_from=("requested",), reason="x")
    in_flight = t.create()  # requested: its run has not started
    computed: list[str] = []

    def read(tenant_id: str) -> bytes:
        computed.append(tenant_id)
        tenant = registry.get_tenant(settings, tenant_id)
        body = provisioning_body(tenant, "FAILURE", time.time() - runs.SETTLED_AFTER_S - 1)
        return model.keep_provisioning(tenant, body, time.time())

    model = readmodel.ReadModel(settings, registry.Tenant.to_json, read)
    model.refresh()
    assert model.warm(10) == 1
    assert computed == [settled.id]
    assert model.provisioning(settled.id) is not None
    assert model.provisioning(in_flight.id) is None
    assert model.warm(10) == 0  # nothing changed: nothing to compute
    registry.set_fields(settings, settled.id, status_reason="changed")
    model.refresh()
    assert model.warm(10) == 1 and computed == [settled.id, settled.id]


def failed_tenant(settings: Settings) -> registry.Tenant:
    """A tenant with no run in flight (failed), as the read model sees it."""
    tenant = Tenants(settings).create()
    registry.transition(settings, tenant.id, "failed", allowed_from=("requested",), reason="x")
    return registry.get_tenant(settings, tenant.id)


def test_a_finished_tenants_unsettled_answer_is_served_until_the_warm_up_reads_it_again(
    settings: Settings,
) -> None:
    done = failed_tenant(settings)
    model = readmodel.ReadModel(settings, registry.Tenant.to_json)
    model.refresh()
    now = time.time()
    encoded = model.keep_provisioning(done, provisioning_body(done, "FAILURE", now), now)
    time.sleep(readmodel.POLL_S + 0.05)
    # Every run finished, not settled yet: the last answer is served, not a database read
    # per request (the warm-up reads it again once it has settled).
    assert model.provisioning(done.id) == encoded
    # A reading that began earlier never replaces a later one (a request and the warm-up).
    newer = model.keep_provisioning(done, provisioning_body(done, "SUCCESS", now), now + 1)
    model.keep_provisioning(done, provisioning_body(done, "FAILURE", now), now + 0.5)
    assert model.provisioning(done.id) == newer


def test_an_answer_with_a_run_in_flight_is_read_again_even_when_the_tenant_is_not(
    settings: Settings,
) -> None:
    # The last step marks a tenant active before its run has ended: a reading taken then
    # shows the run STARTED and must not outlive POLL_S.
    done = failed_tenant(settings)
    model = readmodel.ReadModel(settings, registry.Tenant.to_json)
    model.refresh()
    now = time.time()
    encoded = model.keep_provisioning(done, provisioning_body(done, "STARTED", None), now)
    assert model.provisioning(done.id) == encoded
    time.sleep(readmodel.POLL_S + 0.05)
    assert model.provisioning(done.id) is None


def test_a_finished_tenants_answer_is_read_again_once_when_its_last_run_settles(
    settings: Settings,
) -> None:
    done = failed_tenant(settings)
    computed: list[str] = []
    model = readmodel.ReadModel(settings, registry.Tenant.to_json, computed.append)  # type: ignore[arg-type]
    model.refresh()
    now = time.time()
    settles_in = 0.5
    ended = provisioning_body(done, "FAILURE", now - runs.SETTLED_AFTER_S + settles_in)
    model.keep_provisioning(done, ended, now)
    time.sleep(readmodel.POLL_S + 0.05)
    # Finished: no re-reading every POLL_S while the run settles (after a burst that kept the
    # warm-up thread busy for seconds)...
    assert model.warm(10) == 0 and computed == []
    time.sleep(settles_in + 0.1)
    # ...and one re-reading once it has settled.
    assert model.warm(10) == 1 and computed == [done.id]
