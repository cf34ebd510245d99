"""The audit trail: who did what to a tenant, in order, under which correlation id.

An in-process run checks a successful provisioning's trail exactly; the session's real
``tenantctl serve`` checks a failure and its retry, the admin actions (cancel, activate,
credentials pickup, deactivate), ``GET /api/tenants/{id}/audit`` and ``tenantctl audit``.
Between them every event the issue lists is produced by real code: requested, started,
step_succeeded, step_failed, completed, failed, retry_requested, cancelled, activated,
deactivated, credentials_delivered.
"""

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, Served, Tenants, provision, uid, wait_for
from dagster import DagsterInstance

from tenant_pipelines import auth, registry
from tenant_pipelines.assets import ACTOR_TAG, STEP_NAMES
from tenant_pipelines.settings import Settings

BROKEN_REVISION = '''"""Fails on purpose.

Revision ID: auditing_9100
"""
from alembic import op

revision = "auditing_9100"
down_revision = "auditing_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SELECT * FROM no_such_table_for_audit_test")


def downgrade() -> None:
    pass
'''


def test_successful_provisioning_trail_is_requested_started_steps_completed_under_one_id(
    settings: Settings, tenants: Tenants, instance: DagsterInstance
) -> None:
    tenant = tenants.create()
    result = provision(settings, instance, tenant.id, **{ACTOR_TAG: "admin:ops@example.com"})
    assert result.success
    trail = registry.audit_trail(settings, tenant.id)
    assert [e["event"] for e in trail] == [
        "requested",
        "started",
        *["step_succeeded"] * len(STEP_NAMES),
        "completed",
    ]
    assert {e["correlation_id"] for e in trail} == {tenant.correlation_id}
    assert {e["tenant_id"] for e in trail} == {tenant.id}
    assert trail[0]["actor"] == "test"
    assert trail[1]["actor"] == "admin:ops@example.com"
    assert trail[1]["details"]["run_id"] == result.run_id
    steps = [e["details"] for e in trail if e["event"] == "step_succeeded"]
    assert sorted(d["step"] for d in steps) == sorted(STEP_NAMES)
    assert steps[-1]["step"] == "tenant_verified"  # recorded with 'completed', just before it
    for d in steps:
        assert d["attempt"] == 1 and isinstance(d["duration_s"], float)
    assert trail[-1]["details"] == {"run_id": result.run_id}
    times = [e["at"] for e in trail]
    assert times == sorted(times)


# --- through the real service ----------------------------------------------------------------


@pytest.fixture(scope="module")
def api(served: Served) -> Iterator[tuple[httpx.Client, str]]:
    """A platform admin's client of the session service, and the actor its calls record."""
    name = uid("audit")
    token = auth.create_api_token(served.settings, name, "test")
    with httpx.Client(
        base_url=served.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as client:
        yield client, f"token:{name}"


def wait_status(client: httpx.Client, tenant_id: str, *wanted: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        tenant = client.get(f"/api/tenants/{tenant_id}").json()["tenant"]
        return tenant if tenant["status"] in wanted else None

    return wait_for(reached, timeout=180, interval=0.5, what=f"{tenant_id} {wanted}")


def trail_of(client: httpx.Client, tenant_id: str) -> list[dict[str, Any]]:
    answer = client.get(f"/api/tenants/{tenant_id}/audit")
    assert answer.status_code == 200, answer.text
    assert answer.json()["tenant_id"] == tenant_id
    return list(answer.json()["events"])


def test_failure_and_retry_trail_keeps_the_tenant_and_gives_the_retry_its_own_correlation(
    served: Served, api: tuple[httpx.Client, str]
) -> None:
    client, actor = api
    # The broken revision would fail any provisioning in flight: let the root tenant finish.
    wait_status(client, registry.ROOT_TENANT, "active")
    tenant_id = uid()
    broken = Path(served.settings.migrations_dir) / "auditing" / "versions" / "9100_broken.py"
    broken.write_text(BROKEN_REVISION)
    try:
        created = client.post(
            "/api/tenants",
            json={"id": tenant_id, "name": "Audited", "admin_email": "a@audited.example.com"},
        )
        assert created.status_code == 202, created.text
        wait_status(client, tenant_id, "failed")
    finally:
        broken.unlink()
    first = trail_of(client, tenant_id)
    # The tenant turns 'failed' a moment before Dagster marks the run FAILURE; only a
    # finished run can be resumed from its failed step.
    wait_for(
        lambda: (
            client.get(f"/api/tenants/{tenant_id}/provisioning").json()["runs"][0]["status"]
            == "FAILURE"
        ),
        timeout=60,
        what="the failed run to end",
    )
    retried = client.post(f"/api/tenants/{tenant_id}/retry")
    assert retried.status_code == 202, retried.text
    wait_status(client, tenant_id, "active")
    trail = trail_of(client, tenant_id)
    assert trail[: len(first)] == first  # append-only

    names = [e["event"] for e in trail]
    done_before = ["tenant_validated", "tenant_database"]
    assert names == [
        "requested",
        "started",
        "step_succeeded",
        "step_succeeded",
        "step_failed",
        "failed",
        "retry_requested",
        "started",
        *["step_succeeded"] * (len(STEP_NAMES) - len(done_before)),
        "completed",
    ]
    retry_at = names.index("retry_requested")
    c1, c2 = created.json()["correlation_id"], retried.json()["correlation_id"]
    assert c1 != c2
    assert {e["correlation_id"] for e in trail[:retry_at]} == {c1}
    assert {e["correlation_id"] for e in trail[retry_at:]} == {c2}
    assert {e["tenant_id"] for e in trail} == {tenant_id}
    by_event = {e["event"]: e for e in trail}
    assert by_event["requested"]["actor"] == actor
    assert by_event["retry_requested"]["actor"] == actor
    assert by_event["started"]["actor"] == actor  # the run carries who asked for it
    assert by_event["step_failed"]["actor"] == "system"
    assert by_event["step_failed"]["details"]["step"] == "tenant_migrations"
    assert "no_such_table_for_audit_test" in by_event["step_failed"]["details"]["error"]
    assert by_event["failed"]["details"]["step"] == "tenant_migrations"
    succeeded_after_retry = [
        e["details"]["step"] for e in trail[retry_at:] if e["event"] == "step_succeeded"
    ]
    assert sorted(succeeded_after_retry) == sorted(set(STEP_NAMES) - set(done_before))

    # The same trail from the CLI, as text and as JSON.
    env = {**served.env, "DAGSTER_HOME": str(served.data_dir / "dagster")}
    text = subprocess.run(
        [sys.executable, "-m", "tenant_pipelines.cli", "audit", tenant_id],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert [line.split()[1] for line in text.splitlines()] == names
    as_json = subprocess.run(
        [sys.executable, "-m", "tenant_pipelines.cli", "audit", tenant_id, "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert [e["event"] for e in json.loads(as_json)["events"]] == names


def test_admin_actions_are_audited_with_the_admin_as_actor(
    served: Served, api: tuple[httpx.Client, str]
) -> None:
    client, actor = api
    tenant_id = uid()
    created = client.post(
        "/api/tenants",
        json={"id": tenant_id, "name": "Actions", "admin_email": "a@actions.example.com"},
    )
    assert created.status_code == 202, created.text
    cancelled = client.post(f"/api/tenants/{tenant_id}/cancel")
    assert cancelled.status_code == 202, cancelled.text
    wait_status(client, tenant_id, "cancelled")

    def run_ended() -> bool:
        history = client.get(f"/api/tenants/{tenant_id}/provisioning").json()["runs"]
        return all(r["status"] in ("CANCELED", "FAILURE", "SUCCESS") for r in history)

    wait_for(run_ended, timeout=120, what="the cancelled run to end")
    assert client.post(f"/api/tenants/{tenant_id}/activate").status_code == 202
    wait_status(client, tenant_id, "active")
    picked = client.post(f"/api/tenants/{tenant_id}/credentials")
    assert picked.status_code == 200, picked.text
    assert client.post(f"/api/tenants/{tenant_id}/deactivate").status_code == 200

    trail = trail_of(client, tenant_id)
    names = [e["event"] for e in trail]
    for event in ("cancelled", "activated", "credentials_delivered", "deactivated"):
        assert event in names, names
    by_event = {e["event"]: e for e in trail}
    for event in ("activated", "credentials_delivered", "deactivated"):
        assert by_event[event]["actor"] == actor, by_event[event]
    assert names.index("cancelled") < names.index("activated") < names.index("completed")
    assert names[-1] == "deactivated"
    assert by_event["credentials_delivered"]["details"] == {"channel": "out_of_band"}
    assert picked.json()["reset_token"] not in json.dumps(trail)
