"""tenantctl as an operator runs it: real processes against a running service."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, Served, uid

pytestmark = pytest.mark.slow


def tenantctl(served: Served, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenant_pipelines.cli", *args],
        cwd=REPO,
        env={**served.env, "DAGSTER_HOME": str(served.data_dir / "dagster")},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_create_wait_follows_steps_and_exits_zero_when_active(served: Served) -> None:
    tenant_id = uid()
    out = tenantctl(
        served,
        "create",
        tenant_id,
        "--name",
        "CLI",
        "--admin-email",
        "admin@cli.example.com",
        "--wait",
    )
    assert out.returncode == 0, out.stderr
    assert "tenant_migrations" in out.stdout and "success" in out.stdout
    assert f"{tenant_id} is active" in out.stdout
    status = tenantctl(served, "status", tenant_id, "--json")
    data = json.loads(status.stdout)
    assert data["tenant"]["status"] == "active"
    steps = data["runs"][0]["steps"]
    assert {s["step"] for s in steps} >= {"tenant_database", "tenant_verified"}
    assert all(s["duration_s"] is not None and s["start"] for s in steps)
    listed = json.loads(tenantctl(served, "list", "--json").stdout)
    assert tenant_id in [t["id"] for t in listed["items"]]


def test_invalid_create_is_one_line_error_and_creates_nothing(served: Served) -> None:
    out = tenantctl(served, "create", "Bad-Id", "--name", "x", "--admin-email", "nope")
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
    assert "Traceback" not in out.stderr
    assert "id" in out.stderr and "admin_email" in out.stderr
    listed = json.loads(tenantctl(served, "list", "--json").stdout)
    assert "Bad-Id" not in [t["id"] for t in listed["items"]]


def test_unknown_tenant_is_a_clear_error(served: Served) -> None:
    for cmd in (
        ["status", "nosuch_tenant"],
        ["retry", "nosuch_tenant"],
        ["cancel", "nosuch_tenant"],
    ):
        out = tenantctl(served, *cmd)
        assert out.returncode == 1, cmd
        assert out.stderr.strip() == "error: no tenant 'nosuch_tenant'"


def test_credentials_are_shown_once(served: Served) -> None:
    tenant_id = uid()
    assert (
        tenantctl(
            served,
            "create",
            tenant_id,
            "--name",
            "C",
            "--admin-email",
            "admin@creds.example.com",
            "--wait",
        ).returncode
        == 0
    )
    first = tenantctl(served, "credentials", tenant_id, "--json")
    assert first.returncode == 0, first.stderr
    assert len(json.loads(first.stdout)["reset_token"]) >= 43
    second = tenantctl(served, "credentials", tenant_id)
    assert second.returncode == 1 and "not awaiting pickup" in second.stderr


def test_deactivate_then_activate_reverifies_to_active(served: Served) -> None:
    tenant_id = uid()
    assert (
        tenantctl(
            served,
            "create",
            tenant_id,
            "--name",
            "D",
            "--admin-email",
            "admin@deact.example.com",
            "--wait",
        ).returncode
        == 0
    )
    out = tenantctl(served, "deactivate", tenant_id, "--json")
    assert json.loads(out.stdout)["status"] == "deactivated"
    again = tenantctl(served, "activate", tenant_id, "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{tenant_id} is active" in again.stdout
