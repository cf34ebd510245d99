"""Readiness, the health report and per-tenant health.

A real ``tenantctl serve`` of its own (SQLite tenants, Redis, the daemon) shows health going
``degraded`` on a failed provisioning and back to ``ok`` after the retry; in-process checks
cover components that are down (no daemon, Redis unreachable) without a service.
"""

import contextlib
import dataclasses
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis
from conftest import (
    REDIS_URL,
    Served,
    Tenants,
    free_port,
    pg_database,
    provision,
    serve_env,
    uid,
    wait_for,
)
from dagster import DagsterInstance
from dagster._daemon.types import DaemonHeartbeat
from starlette.applications import Starlette
from starlette.testclient import TestClient

from tenant_pipelines import auth, cache, health, registry
from tenant_pipelines.providers import provider_for
from tenant_pipelines.settings import DEFAULT_MIGRATIONS_DIR, Settings

FAILING_REVISION = '''"""Fails while the FAIL flag exists.

Revision ID: auditing_9000
"""
from pathlib import Path

revision = "auditing_9000"
down_revision = "auditing_0001"
branch_labels = None
depends_on = None
FLAG = Path(__file__).resolve().parents[2] / "FAIL"


def upgrade() -> None:
    if FLAG.exists():
        raise RuntimeError("reference data unavailable")


def downgrade() -> None:
    pass
'''


# --- in-process: the report without a service ------------------------------------------------


def app_for(settings: Settings, instance: DagsterInstance) -> TestClient:
    """The health routes alone, on real settings and a real instance (no auth middleware)."""
    service = SimpleNamespace(settings=settings, instance=instance)
    return TestClient(Starlette(routes=health.routes(service)))  # type: ignore[arg-type]


def beat_all_daemons(instance: DagsterInstance, age_s: float = 0.0) -> None:
    for daemon_type in instance.get_required_daemon_types():
        instance.add_daemon_heartbeat(
            DaemonHeartbeat(time.time() - age_s, daemon_type, str(uuid.uuid4()), None)
        )


def test_overall_status_is_failed_for_a_down_component_and_degraded_for_bad_tenants() -> None:
    up = {"db": {"status": "ok"}, "redis": {"status": "disabled"}}
    fine = {"failed": 0, "degraded": 0}
    assert health.overall(up, fine) == "ok"
    assert health.overall(up, {"failed": 1, "degraded": 0}) == "degraded"
    assert health.overall(up, {"failed": 0, "degraded": 2}) == "degraded"
    assert health.overall({**up, "daemon": {"status": "down"}}, fine) == "failed"
    assert health.overall(up, None) == "failed"


def test_ready_answers_503_naming_the_daemon_until_every_daemon_has_a_recent_heartbeat(
    settings: Settings, instance: DagsterInstance
) -> None:
    client = app_for(settings, instance)
    answer = client.get("/health/ready")
    assert answer.status_code == 503
    body = answer.json()
    assert body["status"] == "failed"
    assert body["components"]["daemon"]["status"] == "down"
    assert body["components"]["control_plane"]["status"] == "ok"
    assert body["components"]["dagster_storage"]["status"] == "ok"
    assert body["components"]["redis"]["status"] == "ok"
    assert "error" not in body["components"]["daemon"]  # the public answer has no details

    beat_all_daemons(instance, age_s=health.DAEMON_STALE_AFTER_S + 30)
    stale = client.get("/health").json()["components"]["daemon"]
    assert stale["status"] == "down" and "no recent heartbeat" in stale["error"]

    beat_all_daemons(instance)
    # Reports are reused for REPORT_TTL_S: the next one shows the heartbeats.
    answer = wait_for(
        lambda: (lambda r: r if r.status_code == 200 else None)(client.get("/health/ready")),
        timeout=health.REPORT_TTL_S + 5,
        what="ready 200",
    )
    assert answer.json()["status"] == "ok"
    assert client.get("/health/live").json() == {"status": "ok"}


def test_concurrent_readiness_probes_share_one_report(
    settings: Settings, instance: DagsterInstance
) -> None:
    beat_all_daemons(instance)
    client = app_for(settings, instance)
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: client.get("/health/ready"), range(40)))
    assert {a.status_code for a in answers} == {200}
    # One computation served them all (or two, if the first aged out meanwhile).
    assert len({a.json()["checked_at"] for a in answers}) <= 2


def test_redis_down_fails_readiness_and_counts_every_active_tenant_degraded(
    settings: Settings, tenants: Tenants, instance: DagsterInstance
) -> None:
    tenant = tenants.create()
    assert provision(settings, instance, tenant.id).success
    beat_all_daemons(instance)
    assert app_for(settings, instance).get("/health/ready").json()["tenants"]["ready"] == 1

    closed = free_port()
    unreachable = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{closed}/0")
    answer = app_for(unreachable, instance).get("/health")
    assert answer.status_code == 503
    body = answer.json()
    assert body["components"]["redis"]["status"] == "down"
    assert body["tenants"]["degraded"] == 1 and body["tenants"]["ready"] == 0
    assert body["tenants"]["degraded_tenants"][0]["id"] == tenant.id
    assert "cache unreachable" in body["tenants"]["degraded_tenants"][0]["problem"]

    report = app_for(unreachable, instance).get(f"/api/tenants/{tenant.id}/health").json()
    assert report["status"] == "degraded" and not report["healthy"]
    assert "verification could not run" in report["problems"][0]


def test_metrics_route_answers_prometheus_text(
    settings: Settings, tenants: Tenants, instance: DagsterInstance
) -> None:
    tenant = tenants.create()
    assert provision(settings, instance, tenant.id).success
    answer = app_for(settings, instance).get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")
    assert "active_tenants 1.0" in answer.text
    assert 'provision_duration_seconds_count{outcome="completed"} 1.0' in answer.text


# --- a real service -------------------------------------------------------------------------


@dataclasses.dataclass
class Service:
    served: Served
    migrations: Path
    token: str

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.served.url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=60,
        )

    def anonymous(self) -> httpx.Client:
        return httpx.Client(base_url=self.served.url, timeout=60)

    def status(self, tenant_id: str, *wanted: str) -> dict[str, Any]:
        with self.admin() as c:

            def reached() -> dict[str, Any] | None:
                tenant = c.get(f"/api/tenants/{tenant_id}").json()["tenant"]
                return tenant if tenant["status"] in wanted else None

            return wait_for(reached, timeout=180, interval=0.5, what=f"{tenant_id} {wanted}")

    def ready(self) -> httpx.Response:
        with self.anonymous() as c:
            return c.get("/health/ready")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("health")
    migrations = root / "migrations"
    shutil.copytree(
        DEFAULT_MIGRATIONS_DIR, migrations, ignore=shutil.ignore_patterns("__pycache__")
    )
    (migrations / "auditing" / "versions" / "9000_flagged.py").write_text(FAILING_REVISION)
    data_dir = root / "data"
    with pg_database(f"tp_ctl_{uuid.uuid4().hex[:10]}") as url:
        # SQLite tenants (root included) in this service's own folder, its own control plane:
        # the counts in its health report are this test module's alone.
        env = serve_env(data_dir, control_url=url, tenant_pg_url="", migrations_dir=str(migrations))
        served = Served(data_dir, env, free_port()).start()
        try:
            token = auth.create_api_token(served.settings, uid("health"), "test")
            yield Service(served, migrations, token)
        finally:
            served.stop()
            for tenant in registry.list_tenants(served.settings, limit=10_000)[0]:
                with contextlib.suppress(Exception):
                    provider_for(served.settings, tenant).drop()
                if tenant.id != registry.ROOT_TENANT:  # other services share root's keys
                    cache.evict(REDIS_URL, tenant.id)
            registry.engine(served.settings).dispose()


def test_ready_is_public_and_ok_once_the_root_tenant_is_active(service: Service) -> None:
    service.status(registry.ROOT_TENANT, "active")
    answer = wait_for(
        lambda: (lambda r: r if r.status_code == 200 and r.json()["status"] == "ok" else None)(
            service.ready()
        ),
        timeout=60,
        what="ready ok",
    )
    body = answer.json()
    assert set(body["components"]) == {"control_plane", "dagster_storage", "daemon", "redis"}
    assert all(c["status"] == "ok" for c in body["components"].values())
    assert body["tenants"]["ready"] >= 1 and body["tenants"]["failed"] == 0
    assert "failed_tenants" not in body["tenants"]
    with service.anonymous() as c:
        assert c.get("/health").status_code == 401
        assert c.get("/metrics").status_code == 401


def test_failed_provisioning_makes_health_degraded_until_the_retry_succeeds(
    service: Service,
) -> None:
    service.status(registry.ROOT_TENANT, "active")
    tenant_id = uid()
    (service.migrations / "FAIL").touch()
    try:
        with service.admin() as c:
            created = c.post(
                "/api/tenants",
                json={"id": tenant_id, "name": "Fails", "admin_email": "a@fails.example.com"},
            )
            assert created.status_code == 202, created.text
            service.status(tenant_id, "failed")

            ready = wait_for(
                lambda: (lambda r: r if r.json()["status"] == "degraded" else None)(
                    service.ready()
                ),
                timeout=10,
                what="ready degraded",
            )
            assert ready.status_code == 200
            assert ready.json()["tenants"]["failed"] == 1

            full = c.get("/health").json()
            assert full["status"] == "degraded"
            failed = {t["id"]: t for t in full["tenants"]["failed_tenants"]}
            assert "reference data unavailable" in failed[tenant_id]["last_error"]
            assert failed[tenant_id]["run_id"]

            report = c.get(f"/api/tenants/{tenant_id}/health").json()
            assert report["status"] == "failed" and report["tenant_status"] == "failed"
            assert "reference data unavailable" in report["last_error"]
        (service.migrations / "FAIL").unlink()
        with service.admin() as c:
            assert c.post(f"/api/tenants/{tenant_id}/retry").status_code == 202
        service.status(tenant_id, "active")
        ready = wait_for(
            lambda: (lambda r: r if r.json()["status"] == "ok" else None)(service.ready()),
            timeout=10,
            what="ready ok",
        )
        assert ready.status_code == 200
        assert ready.json()["tenants"]["failed"] == 0
        with service.admin() as c:
            report = c.get(f"/api/tenants/{tenant_id}/health").json()
        assert report["status"] == "ok" and report["problems"] == []
    finally:
        with contextlib.suppress(FileNotFoundError):
            (service.migrations / "FAIL").unlink()


def test_an_active_tenant_with_a_lost_cache_is_degraded_until_reactivated(
    service: Service,
) -> None:
    service.status(registry.ROOT_TENANT, "active")
    tenant_id = uid()
    with service.admin() as c:
        c.post(
            "/api/tenants",
            json={"id": tenant_id, "name": "Cached", "admin_email": "a@cached.example.com"},
        ).raise_for_status()
    service.status(tenant_id, "active")
    redis.Redis.from_url(REDIS_URL).delete(cache.role_key(tenant_id, "member"))

    ready = wait_for(
        lambda: (lambda r: r if r["status"] == "degraded" else None)(service.ready().json()),
        timeout=10,
        what="ready degraded",
    )
    assert ready["tenants"]["degraded"] == 1
    with service.admin() as c:
        full = c.get("/health").json()
        assert full["tenants"]["degraded_tenants"] == [
            {"id": tenant_id, "problem": "cache missing roles: member"}
        ]
        report = c.get(f"/api/tenants/{tenant_id}/health").json()
        assert report["status"] == "degraded"
        assert report["problems"] == ["cache missing roles: member"]
        assert c.get("/api/tenants/t_nonexistent0/health").status_code == 404
        assert c.post(f"/api/tenants/{tenant_id}/activate").status_code == 202
    service.status(tenant_id, "active")
    wait_for(lambda: service.ready().json()["status"] == "ok", timeout=60, what="ready ok")
