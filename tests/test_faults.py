"""Fault injection against a real ``tenantctl serve``: run workers and the whole service
killed with SIGKILL, a private PostgreSQL tenant server restarted and stopped, a private
Redis and SMTP server stopped, 20 concurrent creates and retries, a run cancelled at every
step, and locks left by killed processes. Each scenario asserts the end state in the control
plane, in the tenant database and in Dagster. docs/reliability.md summarises the results.

The shared PostgreSQL at 127.0.0.1:5432 only holds this module's control-plane database: the
tenant server that gets restarted is a private cluster started here, so other engineers'
tests never see it go down.
"""

import contextlib
import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from email import message_from_bytes
from email.message import Message
from glob import glob
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from conftest import Served, free_port, pg_database, serve_env, uid, wait_for
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

from tenant_pipelines import auth, identity, registry, runs
from tenant_pipelines.providers import dispose_tenant_engine, provider_for, tenant_engine
from tenant_pipelines.sensors import _worker_pid
from tenant_pipelines.settings import DEFAULT_MIGRATIONS_DIR, Settings

pytestmark = [pytest.mark.fault, pytest.mark.slow]

SLOW_SECONDS = 6
SLOW_REVISION = f'''"""Slow on purpose (fault test).

Revision ID: auditing_9997
"""
from alembic import op

revision = "auditing_9997"
down_revision = "auditing_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SELECT pg_sleep({SLOW_SECONDS})")


def downgrade() -> None:
    pass
'''
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")


# --- private servers ---


class PrivatePostgres:
    """A throw-away PostgreSQL cluster (trust auth, loopback, socket in its own folder)."""

    def __init__(self) -> None:
        bins = sorted(glob("/usr/lib/postgresql/*/bin"))
        if not bins:
            pytest.skip("no PostgreSQL server binaries in /usr/lib/postgresql")
        self.bin = Path(bins[-1])
        self.root = Path(tempfile.mkdtemp(prefix="tp_fault_pg_"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.libpq = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        )

    def _run(self, *argv: str) -> None:
        cmd = ["runuser", "-u", "postgres", "--", *argv] if self._as_postgres else list(argv)
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def _ctl(self, *args: str) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), *args)

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._ctl("-o", opts, "-l", str(self.root / "log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        self.stop("fast")
        self.start()

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def sleeping_backends(self, database: str) -> int:
        with psycopg.connect(self.libpq, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                "AND query ILIKE %s AND state = 'active'",
                (database, "%pg_sleep%"),
            ).fetchone()
        return int(row[0]) if row else 0


class PrivateRedis:
    """A throw-away redis-server on a free port, without persistence."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tp_fault_redis_"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.pidfile = self.root / "redis.pid"

    def start(self) -> None:
        subprocess.run(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "yes",
                "--pidfile",
                str(self.pidfile),
                "--dir",
                str(self.root),
                "--logfile",
                str(self.root / "log"),
            ],
            check=True,
            capture_output=True,
        )
        wait_for(self._answers, timeout=20, what="private redis")

    def _answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=0.5).ping())
        except redis.exceptions.ConnectionError:
            return False

    def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=10, what="redis exit")
        self.pidfile.unlink(missing_ok=True)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class Inbox:
    """Every message the private SMTP server accepted."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else b""
        self.messages.append((list(envelope.rcpt_tos), message_from_bytes(content)))
        return "250 OK"

    def to(self, address: str) -> list[Message]:
        return [m for rcpt, m in self.messages if address in rcpt]


class PrivateSmtp:
    """A plain aiosmtpd server on a fixed port that can be stopped and started again."""

    def __init__(self) -> None:
        self.inbox = Inbox()
        self.port = free_port()
        self.controller: Controller | None = None

    def start(self) -> None:
        self.controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


@dataclasses.dataclass
class Rig:
    """The served service under fault, its private servers and an API client."""

    served: Served
    pg: PrivatePostgres
    redis: PrivateRedis
    smtp: PrivateSmtp
    client: httpx.Client
    headers: dict[str, str]

    @property
    def settings(self) -> Settings:
        return self.served.settings

    def instance(self) -> DagsterInstance:
        return DagsterInstance.from_config(str(self.served.data_dir / "dagster"))

    def create(self, tenant_id: str | None = None, **fields: Any) -> str:
        tenant_id = tenant_id or uid("f")
        body = {
            "id": tenant_id,
            "name": "Fault test",
            "admin_email": f"owner@{tenant_id.replace('_', '-')}.example.com",
            **fields,
        }
        r = self.client.post("/api/tenants", json=body, headers=self.headers)
        assert r.status_code == 202, r.text
        return tenant_id

    def post(self, path: str) -> httpx.Response:
        return self.client.post(path, headers=self.headers)

    def tenant(self, tenant_id: str) -> registry.Tenant:
        return registry.get_tenant(self.settings, tenant_id)

    def restart_service(self) -> None:
        self.client.close()
        start_patiently(self.served)
        self.client = httpx.Client(base_url=self.served.url, timeout=60)


def start_patiently(served: Served, extra_s: float = 150) -> Served:
    """``Served.start``, with more time when the shared 2-core machine is saturated."""
    try:
        return served.start()
    except AssertionError:
        if served.proc is None or served.proc.poll() is not None:
            raise

    def up() -> bool:
        try:
            return httpx.get(served.url + "/health/live", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=extra_s, interval=0.5, what="a slow tenantctl serve")
    return served


@contextlib.contextmanager
def build_rig(data_dir: Path, dagster_yaml: str | None = None) -> Iterator[Rig]:
    """A real service whose tenant server, Redis and SMTP server are private to it."""
    migrations = data_dir / "migrations"
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, migrations)
    if dagster_yaml is not None:
        (data_dir / "dagster").mkdir(parents=True)
        (data_dir / "dagster" / "dagster.yaml").write_text(dagster_yaml)
    pg = PrivatePostgres()
    red = PrivateRedis()
    smtp = PrivateSmtp()
    served: Served | None = None
    try:
        pg.start()
        red.start()
        smtp.start()
        with pg_database(f"tp_ctl_{uuid.uuid4().hex[:10]}") as control_url:
            port = free_port()
            env = serve_env(
                data_dir,
                control_url=control_url,
                migrations_dir=str(migrations),
                # Slow revisions are injected: keep them in the migrations step (no template).
                tenant_pg_template="0",
                tenant_pg_url=pg.url,
                redis_url=red.url,
                smtp_host="127.0.0.1",
                smtp_port=str(smtp.port),
                public_url=f"http://127.0.0.1:{port}",
            )
            served = start_patiently(Served(data_dir, env, port))
            token = auth.create_api_token(served.settings, uid("fault"), "test")
            client = httpx.Client(base_url=served.url, timeout=60)
            rig = Rig(served, pg, red, smtp, client, {"Authorization": f"Bearer {token}"})
            try:
                yield rig
            finally:
                rig.client.close()
                served.stop()
                _kill_leftover_workers(data_dir)
                registry.engine(served.settings).dispose()
                registry._engines.pop(control_url, None)
    finally:
        if served is not None:
            served.stop()
        smtp.stop()
        red.destroy()
        pg.destroy()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """The service under fault, with the repository's dagster.yaml (forkserver launcher)."""
    with build_rig(tmp_path_factory.mktemp("fault_served")) as built:
        yield built


def default_launcher_yaml() -> str:
    """The repository's dagster.yaml without its run_launcher block: Dagster's default."""
    from tenant_pipelines.cli import REPO_DIR

    lines = (REPO_DIR / "dagster.yaml").read_text().splitlines()
    out: list[str] = []
    skipping = False
    for line in lines:
        if line.startswith("run_launcher:"):
            skipping = True
            continue
        if skipping and (line.startswith(" ") or not line.strip()):
            continue
        skipping = False
        out.append(line)
    return "\n".join(out) + "\n"


def _kill_leftover_workers(data_dir: Path) -> None:
    """Run workers outlive a killed service only if they left its process group: end them."""
    marker = str(data_dir).encode()
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if marker in (proc / "environ").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)


@pytest.fixture
def slow_migration(rig: Rig) -> Iterator[Path]:
    """A revision that sleeps in the tenant database (the migration step takes 6 s)."""
    path = rig.served.migrations_dir / "auditing" / "versions" / "9997_slow.py"
    path.write_text(SLOW_REVISION)
    yield path
    path.unlink(missing_ok=True)


# --- observations ---


def run_list(instance: DagsterInstance, tenant_id: str) -> list[Any]:
    return runs.runs_of(instance, tenant_id)


def settled(rig: Rig, tenant_id: str) -> registry.Tenant | None:
    """The tenant, once it is in a final status and none of its runs is queued or running."""
    tenant = rig.tenant(tenant_id)
    if tenant.status not in registry.FINAL_STATUSES:
        return None
    with rig.instance() as instance:
        if runs.unfinished_run(instance, tenant_id):
            return None
    return tenant


def wait_settled(rig: Rig, tenant_id: str, timeout: float = 120) -> registry.Tenant:
    return wait_for(
        lambda: settled(rig, tenant_id), timeout=timeout, interval=0.5, what=f"{tenant_id} final"
    )


def in_step(instance: DagsterInstance, run_id: str) -> str | None:
    """The step the run is executing right now (started, not ended), if any."""
    for stat in instance.get_run_step_stats(run_id):
        if stat.start_time and not stat.end_time:
            return str(stat.step_key)
    return None


def assert_runs_never_overlapped(instance: DagsterInstance, tenant_id: str) -> None:
    windows = []
    for run in run_list(instance, tenant_id):
        rec = instance.get_run_record_by_id(run.run_id)
        if rec is not None and rec.start_time:
            windows.append((rec.start_time, rec.end_time or time.time()))
    windows.sort()
    for (_, end), (start, _) in zip(windows, windows[1:], strict=False):
        assert end <= start + 0.001, f"two runs of {tenant_id} overlapped: {windows}"


def assert_tenant_intact(rig: Rig, tenant_id: str) -> None:
    """Active, verified, every table, role, permission, user and version row exactly once."""
    tenant = rig.tenant(tenant_id)
    assert tenant.status == "active", tenant.status_reason
    dispose_tenant_engine(tenant_id)
    eng = tenant_engine(rig.settings, tenant)
    with eng.connect() as conn:
        tables = list(
            conn.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            ).scalars()
        )
        assert len(tables) == len(set(tables))
        got = identity.counts(conn)
        assert got["users"] == 1 and got["user_roles"] == 1, got
        assert got["roles"] == len(identity.ROLE_PERMISSIONS), got
        for table, key in (("roles", "name"), ("permissions", "code"), ("users", "email")):
            dupes = conn.execute(
                sa.text(f"SELECT {key} FROM {table} GROUP BY {key} HAVING count(*) > 1")  # noqa: S608
            ).all()
            assert not dupes, (table, dupes)
        for module in tenant.modules:
            versions = conn.execute(sa.text(f"SELECT * FROM alembic_version_{module}")).all()  # noqa: S608
            assert len(versions) == 1, (module, versions)
    dispose_tenant_engine(tenant_id)
    from tenant_pipelines.assets import verification_problems

    assert verification_problems(rig.settings, tenant) == []
    with registry.engine(rig.settings).connect() as conn:
        rows = conn.execute(
            sa.select(sa.func.count())
            .select_from(registry.tenants)
            .where(registry.tenants.c.id == tenant_id)
        ).scalar()
    assert rows == 1


def events(rig: Rig, tenant_id: str) -> list[str]:
    return [e["event"] for e in registry.audit_trail(rig.settings, tenant_id)]


def retry_until_active(rig: Rig, tenant_id: str, timeout: float = 120) -> registry.Tenant:
    """Settle; a failed or cancelled tenant is retried through the API until it is active."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tenant = wait_settled(rig, tenant_id, timeout=max(deadline - time.monotonic(), 1))
        if tenant.status == "active":
            return tenant
        r = rig.post(f"/api/tenants/{tenant_id}/retry")
        assert r.status_code in (202, 409), r.text
        time.sleep(1)
    raise AssertionError(f"{tenant_id} not active after {timeout}s")


def drop(rig: Rig, *tenant_ids: str) -> None:
    for tenant_id in tenant_ids:
        with contextlib.suppress(Exception):
            provider_for(rig.settings, rig.tenant(tenant_id)).drop()


# --- 1. run worker killed in the middle of the migration step ---


def _advisory_key(tenant_id: str) -> int:
    """registry.tenant_lock's key: the test holds exactly the lock the steps take."""
    return int.from_bytes(hashlib.sha256(tenant_id.encode()).digest()[:8], "big", signed=True)


def lock_is_free(settings: Settings, tenant_id: str) -> bool:
    try:
        with registry.tenant_lock(settings, tenant_id, 0.2):
            return True
    except registry.LockTimeout:
        return False


def test_worker_killed_mid_migration_run_fails_and_retry_resumes_to_an_intact_active_tenant(
    rig: Rig, slow_migration: Path
) -> None:
    tenant_id = rig.create()
    location = rig.tenant(tenant_id).location
    wait_for(lambda: rig.pg.sleeping_backends(location), timeout=60, what="the slow migration")
    run_id = rig.tenant(tenant_id).run_id
    assert run_id
    with rig.instance() as instance:
        found = _worker_pid(instance, run_id)
    assert found, "the run worker reported its pid in the event log"
    pid = found[0]
    assert Path(f"/proc/{pid}").exists() and pid != rig.served.proc.pid  # type: ignore[union-attr]
    # The killed step holds the tenant's lock (scenario 8 end to end).
    assert not lock_is_free(rig.settings, tenant_id)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    def failed_run() -> bool:
        with rig.instance() as instance:
            run = instance.get_run_by_id(run_id)
            return run is not None and run.status == DagsterRunStatus.FAILURE

    wait_for(failed_run, timeout=60, interval=0.2, what="the killed run to be marked failed")
    marked_after = time.monotonic() - killed_at
    # The lock died with its holder.
    assert wait_for(lambda: lock_is_free(rig.settings, tenant_id), timeout=10)
    tenant = retry_until_active(rig, tenant_id)
    assert tenant.status == "active"
    with rig.instance() as instance:
        chain = run_list(instance, tenant_id)
        resumed = instance.get_run_by_id(tenant.run_id)
        assert resumed is not None and resumed.run_id != run_id
        assert resumed.parent_run_id == run_id or resumed.root_run_id == run_id
        executed = {s.step_key for s in instance.get_run_step_stats(resumed.run_id)}
        assert "tenant_validated" not in executed and "tenant_database" not in executed
        assert "tenant_migrations" in executed
        assert_runs_never_overlapped(instance, tenant_id)
        assert [r.status.value for r in chain][-1] == "FAILURE"
    assert_tenant_intact(rig, tenant_id)
    assert events(rig, tenant_id).count("completed") == 1
    print(f"killed run marked FAILURE after {marked_after:.1f}s; runs: {len(chain)}")
    drop(rig, tenant_id)


# --- 2. the daemon and the HTTP service killed with runs queued and running ---


def test_service_and_daemon_killed_with_runs_queued_and_running_every_tenant_ends_final(
    rig: Rig, slow_migration: Path
) -> None:
    running = [rig.create() for _ in range(3)]
    locations = [rig.tenant(t).location for t in running]
    wait_for(
        lambda: sum(rig.pg.sleeping_backends(loc) for loc in locations) >= 1,
        timeout=60,
        what="a run inside its migration",
    )
    # Created right before the kill: their runs are still QUEUED or just STARTING.
    queued = [rig.create() for _ in range(2)]
    everyone = running + queued
    with rig.instance() as instance:
        before = {t: [r.status.value for r in run_list(instance, t)] for t in everyone}
    assert proc_alive(rig.served)
    os.killpg(rig.served.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
    rig.served.proc.wait()  # type: ignore[union-attr]
    _kill_leftover_workers(rig.served.data_dir)  # a worker outside the group dies too
    killed_at = time.monotonic()
    rig.restart_service()
    finals: dict[str, tuple[str, str | None]] = {}
    for tenant_id in everyone:
        final = wait_settled(rig, tenant_id, timeout=180)
        finals[tenant_id] = (final.status, final.status_reason)
    settled_after = time.monotonic() - killed_at
    assert {s for s, _ in finals.values()} <= {"active", "failed", "cancelled"}, finals
    for tenant_id in everyone:
        status, reason = finals[tenant_id]
        if status != "active":
            assert reason, (tenant_id, status, registry.audit_trail(rig.settings, tenant_id))
        retry_until_active(rig, tenant_id)
        assert_tenant_intact(rig, tenant_id)
    with rig.instance() as instance:
        for tenant_id in everyone:
            assert_runs_never_overlapped(instance, tenant_id)
    print(f"before kill: {before}; final: {finals}; all settled {settled_after:.0f}s after kill")
    drop(rig, *everyone)


def test_with_the_default_launcher_the_reconciler_fails_runs_whose_worker_died_with_the_daemon(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """DefaultRunLauncher cannot report worker health, so run monitoring leaves a run whose
    worker died with the daemon STARTED until max_runtime_seconds (15 min); the reconciler
    sensor notices the dead pid and fails the run, and the tenant can be retried."""
    with build_rig(tmp_path_factory.mktemp("fault_default"), default_launcher_yaml()) as drig:
        with drig.instance() as instance:
            assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
        path = drig.served.migrations_dir / "auditing" / "versions" / "9997_slow.py"
        path.write_text(SLOW_REVISION.replace(f"pg_sleep({SLOW_SECONDS})", "pg_sleep(20)"))
        tenant_id = drig.create()
        location = drig.tenant(tenant_id).location
        wait_for(lambda: drig.pg.sleeping_backends(location), timeout=60, what="migration")
        run_id = drig.tenant(tenant_id).run_id
        os.killpg(drig.served.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        drig.served.proc.wait()  # type: ignore[union-attr]
        _kill_leftover_workers(drig.served.data_dir)
        killed_at = time.monotonic()
        drig.restart_service()
        wait_settled(drig, tenant_id, timeout=120)
        took = time.monotonic() - killed_at
        with drig.instance() as instance:
            run = instance.get_run_by_id(run_id or "")
            assert run is not None and run.status == DagsterRunStatus.FAILURE
            failure = instance.get_records_for_run(
                run.run_id, of_type=DagsterEventType.RUN_FAILURE
            ).records
        assert any("reconciler" in (r.event_log_entry.message or "") for r in failure)
        # The slow revision stays: Dagster's automatic run retry may already be applying it,
        # and a revision removed after it was applied could never verify.
        retry_until_active(drig, tenant_id)
        assert_tenant_intact(drig, tenant_id)
        print(f"default launcher: dead run failed by the reconciler {took:.0f}s after the kill")


def proc_alive(served: Served) -> bool:
    return served.proc is not None and served.proc.poll() is None


# --- 3. the tenant PostgreSQL server restarted / down during provisioning ---


def test_tenant_postgres_restarted_mid_migration_is_carried_through_by_step_retries(
    rig: Rig, slow_migration: Path
) -> None:
    tenant_id = rig.create()
    location = rig.tenant(tenant_id).location
    wait_for(lambda: rig.pg.sleeping_backends(location), timeout=60, what="the slow migration")
    rig.pg.restart()
    tenant = wait_settled(rig, tenant_id, timeout=120)
    assert tenant.status == "active", tenant.status_reason
    trail = registry.audit_trail(rig.settings, tenant_id)
    retried = [
        e
        for e in trail
        if e["event"] == "step_failed" and e["details"]["step"] == "tenant_migrations"
    ]
    assert retried and all(e["details"]["will_retry"] for e in retried), trail
    with rig.instance() as instance:
        assert len(run_list(instance, tenant_id)) == 1, "carried through in the same run"
        stats = {s.step_key: s for s in instance.get_run_step_stats(tenant.run_id)}
        assert stats["tenant_migrations"].attempts >= 2
    assert_tenant_intact(rig, tenant_id)
    drop(rig, tenant_id)


def test_tenant_postgres_down_longer_than_the_retries_fails_clearly_and_retry_succeeds(
    rig: Rig,
) -> None:
    rig.pg.stop()
    try:
        tenant_id = rig.create()
        tenant = wait_settled(rig, tenant_id, timeout=90)
    finally:
        rig.pg.start()
    assert tenant.status == "failed"
    reason = tenant.status_reason or ""
    assert reason.startswith("tenant_database: ") and "OperationalError" in reason, reason
    assert "postgres@" not in reason and "password" not in reason.lower()
    attempts = [
        e for e in registry.audit_trail(rig.settings, tenant_id) if e["event"] == "step_failed"
    ]
    assert len(attempts) == 5 and not attempts[-1]["details"]["will_retry"]
    r = rig.client.get(f"/api/tenants/{tenant_id}/provisioning", headers=rig.headers)
    failed_steps = [s for s in r.json()["runs"][0]["steps"] if s["status"] == "FAILURE"]
    assert failed_steps and "OperationalError" in (failed_steps[0]["error"] or "")
    assert rig.post(f"/api/tenants/{tenant_id}/retry").status_code == 202
    tenant = wait_settled(rig, tenant_id)
    assert tenant.status == "active", tenant.status_reason
    assert_tenant_intact(rig, tenant_id)
    drop(rig, tenant_id)


# --- 4. Redis down ---


def test_redis_down_fails_the_cache_step_clearly_degrades_health_and_retry_ends_active(
    rig: Rig,
) -> None:
    healthy = rig.create()
    assert wait_settled(rig, healthy).status == "active"
    rig.redis.stop()
    try:
        tenant_id = rig.create()
        tenant = wait_settled(rig, tenant_id, timeout=90)
        assert tenant.status == "failed"
        assert (tenant.status_reason or "").startswith("tenant_cache: "), tenant.status_reason
        assert "ConnectionError" in (tenant.status_reason or "")
        cache_failures = [
            e
            for e in registry.audit_trail(rig.settings, tenant_id)
            if e["event"] == "step_failed" and e["details"]["step"] == "tenant_cache"
        ]
        assert len(cache_failures) == 5, "four retries with backoff, then failed"
        one = rig.client.get(f"/api/tenants/{healthy}/health", headers=rig.headers).json()
        assert one["status"] == "degraded" and not one["healthy"], one
        report = rig.client.get("/health", headers=rig.headers)
        body = report.json()
        assert body["components"]["redis"]["status"] == "down"
        assert healthy in {t["id"] for t in body["tenants"]["degraded_tenants"]}
        assert tenant_id in {t["id"] for t in body["tenants"]["failed_tenants"]}
    finally:
        rig.redis.start()
    assert rig.post(f"/api/tenants/{tenant_id}/retry").status_code == 202
    assert wait_settled(rig, tenant_id).status == "active"
    assert_tenant_intact(rig, tenant_id)
    # Redis came back empty: the healthy tenant stays degraded until its cache is rebuilt.
    one = rig.client.get(f"/api/tenants/{healthy}/health", headers=rig.headers).json()
    assert one["status"] == "degraded", one
    assert rig.post(f"/api/tenants/{healthy}/activate").status_code == 202
    assert wait_settled(rig, healthy).status == "active"
    one = rig.client.get(f"/api/tenants/{healthy}/health", headers=rig.headers).json()
    assert one["status"] == "ok", one
    drop(rig, healthy, tenant_id)


# --- 5. SMTP down during credential delivery ---


def test_smtp_down_during_delivery_then_retry_sends_exactly_one_email_with_the_one_valid_token(
    rig: Rig,
) -> None:
    rig.smtp.stop()
    try:
        tenant_id = rig.create()
        tenant = wait_settled(rig, tenant_id, timeout=90)
    finally:
        rig.smtp.start()
    assert tenant.status == "failed"
    assert (tenant.status_reason or "").startswith("tenant_credentials: "), tenant.status_reason
    assert tenant.credentials_state == "pending"
    address = tenant.admin_email
    assert rig.smtp.inbox.to(address) == []
    assert rig.post(f"/api/tenants/{tenant_id}/retry").status_code == 202
    tenant = wait_settled(rig, tenant_id)
    assert tenant.status == "active", tenant.status_reason
    assert tenant.credentials_state == "delivered"
    messages = rig.smtp.inbox.to(address)
    assert len(messages) == 1
    eng = tenant_engine(rig.settings, tenant)
    assert identity.valid_reset_tokens(eng, tenant) == 1
    body = messages[0].get_payload(decode=True)
    assert isinstance(body, bytes)
    token = next(line.strip() for line in body.decode().splitlines() if line.startswith("    "))
    r = rig.client.post(
        f"/api/t/{tenant_id}/auth/reset-password",
        json={"token": token, "new_password": "fault suite pass phrase"},
    )
    assert r.status_code == 200, r.text
    assert identity.valid_reset_tokens(eng, tenant) == 0
    assert events(rig, tenant_id).count("credentials_delivered") == 1
    assert_tenant_intact(rig, tenant_id)
    drop(rig, tenant_id)


# --- 6. twenty simultaneous creates and retries ---


def _burst(n: int, call: Callable[[], httpx.Response]) -> list[httpx.Response]:
    barrier = threading.Barrier(n)
    out: list[httpx.Response] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        r = call()
        with lock:
            out.append(r)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_twenty_simultaneous_creates_and_retries_make_one_tenant_and_one_run_at_a_time(
    rig: Rig, slow_migration: Path
) -> None:
    tenant_id = uid("f")
    body = {
        "id": tenant_id,
        "name": "Twenty at once",
        "admin_email": f"owner@{tenant_id.replace('_', '-')}.example.com",
    }
    with httpx.Client(base_url=rig.served.url, timeout=120) as client:
        answers = _burst(20, lambda: client.post("/api/tenants", json=body, headers=rig.headers))
    codes = sorted(r.status_code for r in answers)
    assert codes.count(202) == 1 and codes.count(409) == 19, codes
    assert all(r.json()["error"]["code"] == "conflict" for r in answers if r.status_code == 409)
    location = rig.tenant(tenant_id).location
    wait_for(lambda: rig.pg.sleeping_backends(location), timeout=60, what="the slow migration")
    assert rig.post(f"/api/tenants/{tenant_id}/cancel").status_code == 202
    assert wait_settled(rig, tenant_id).status == "cancelled"
    # The slow revision stays (the cancel may land after its commit); the retry applies it.
    with httpx.Client(base_url=rig.served.url, timeout=120) as client:
        answers = _burst(
            20, lambda: client.post(f"/api/tenants/{tenant_id}/retry", headers=rig.headers)
        )
    codes = sorted(r.status_code for r in answers)
    assert codes.count(202) == 1 and codes.count(409) == 19, codes
    tenant = wait_settled(rig, tenant_id)
    assert tenant.status == "active", tenant.status_reason
    with rig.instance() as instance:
        assert len(run_list(instance, tenant_id)) == 2, "one create run, one retry run"
        assert_runs_never_overlapped(instance, tenant_id)
        assert instance.get_dynamic_partitions("tenants").count(tenant_id) == 1
    trail = events(rig, tenant_id)
    assert trail.count("requested") == 1 and trail.count("retry_requested") == 1, trail
    assert trail.count("completed") == 1
    assert_tenant_intact(rig, tenant_id)
    drop(rig, tenant_id)


# --- 7. a run cancelled at every step in turn ---


class HeldLock:
    """The tenant's advisory lock held by the test, as a step of another run would hold it.

    A step blocks at its start until the lock is free: holding it stops the run *at* a chosen
    step. :meth:`pass_one_step` lets exactly one step through: it waits until the run has taken
    the lock, then queues for it (PostgreSQL grants a queued ``pg_advisory_lock`` the moment the
    step releases it, before the run's next step polls).
    """

    def __init__(self, settings: Settings, tenant_id: str) -> None:
        url = sa.make_url(settings.control_url).set(drivername="postgresql")
        self.conn = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
        self.key = _advisory_key(tenant_id)
        self.conn.execute("SELECT pg_advisory_lock(%s)", (self.key,))

    def _try(self) -> bool:
        row = self.conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        return bool(row and row[0])

    def pass_one_step(self, timeout: float = 30) -> None:
        self.conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        deadline = time.monotonic() + timeout
        while self._try():  # still free: the run has not taken it yet
            self.conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
            if time.monotonic() > deadline:
                raise AssertionError("the run never took the lock")
            time.sleep(0.005)
        self.conn.execute("SELECT pg_advisory_lock(%s)", (self.key,))

    def close(self) -> None:
        self.conn.close()


def test_a_run_cancelled_at_every_step_in_turn_is_completed_by_a_later_retry(rig: Rig) -> None:
    from tenant_pipelines.assets import STEP_NAMES

    tenant_id = uid("f")
    lock = HeldLock(rig.settings, tenant_id)
    cancelled_at: list[str] = []
    try:
        rig.create(tenant_id)
        done: set[str] = set()
        while True:
            run_id = rig.tenant(tenant_id).run_id
            assert run_id

            def blocked(run_id: str = run_id) -> str | None:
                with rig.instance() as instance:
                    return in_step(instance, run_id)

            step = wait_for(blocked, timeout=60, interval=0.1, what="a step waiting on the lock")
            # Let the steps already cancelled pass, stop at the next one.
            while step in done:
                lock.pass_one_step()
                step = wait_for(
                    lambda s=step: (b := blocked()) and b != s and b, timeout=30, what="next"
                )
            assert step not in done
            r = rig.post(f"/api/tenants/{tenant_id}/cancel")
            assert r.status_code == 202, r.text
            tenant = wait_settled(rig, tenant_id, timeout=60)
            assert tenant.status == "cancelled", (step, tenant.status, tenant.status_reason)
            with rig.instance() as instance:
                run = instance.get_run_by_id(run_id)
                assert run is not None and run.status == DagsterRunStatus.CANCELED
            cancelled_at.append(step)
            done.add(step)
            if done == set(STEP_NAMES):
                break
            assert rig.post(f"/api/tenants/{tenant_id}/retry").status_code == 202
        # Every step was cancelled once; a last retry without the lock completes it.
        lock.close()
        assert rig.post(f"/api/tenants/{tenant_id}/retry").status_code == 202
        tenant = wait_settled(rig, tenant_id)
    finally:
        lock.close()
    assert tenant.status == "active", tenant.status_reason
    assert sorted(cancelled_at) == sorted(STEP_NAMES)
    with rig.instance() as instance:
        assert_runs_never_overlapped(instance, tenant_id)
        statuses = [r.status.value for r in run_list(instance, tenant_id)]
    assert statuses[0] == "SUCCESS" and statuses[1:] == ["CANCELED"] * len(STEP_NAMES)
    assert_tenant_intact(rig, tenant_id)
    print("cancelled at, in order:", cancelled_at)
    drop(rig, tenant_id)


# --- 8. a lock left by a killed process never blocks the next run ---

HOLDER = """
import sys, time
from tenant_pipelines import registry
from tenant_pipelines.settings import Settings
settings = Settings.from_env()
with registry.tenant_lock(settings, sys.argv[1], 5):
    print("held", flush=True)
    time.sleep(600)
"""


def _kill_holder_then_lock(settings: Settings, tenant_id: str) -> float:
    env = {**os.environ, **settings.env()}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, tenant_id], env=env, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(registry.LockTimeout):
            with registry.tenant_lock(settings, tenant_id, 0.3):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        started = time.monotonic()
        with registry.tenant_lock(settings, tenant_id, 5):
            return time.monotonic() - started
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_flock_of_a_killed_holder_never_blocks_the_next_run_on_sqlite(settings: Settings) -> None:
    took = _kill_holder_then_lock(settings, uid("f"))
    assert took < 1.0


def test_advisory_lock_of_a_killed_holder_never_blocks_the_next_run_on_postgresql(
    pg_settings: Settings,
) -> None:
    took = _kill_holder_then_lock(pg_settings, uid("f"))
    assert took < 2.0
