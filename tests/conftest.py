"""Shared fixtures. Everything runs against the real PostgreSQL (127.0.0.1:5432), Redis
(127.0.0.1:6379) and a real Dagster instance; every test gets uniquely named tenants,
databases and folders, and drops them.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from dagster import DagsterInstance, instance_for_test
from psycopg import sql

from tenant_pipelines import providers, registry
from tenant_pipelines.providers import provider_for
from tenant_pipelines.settings import DEFAULT_MIGRATIONS_DIR, Settings

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PG_LIBPQ = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"


def uid(prefix: str = "t") -> str:
    """A unique, valid tenant identifier."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def pg_database(name: str) -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards; yields its SQLAlchemy URL."""
    with psycopg.connect(PG_LIBPQ, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_LIBPQ, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    env = {
        "TP_DATA_DIR": str(data_dir),
        "TP_MIGRATIONS_DIR": str(DEFAULT_MIGRATIONS_DIR),
        "TP_TENANT_PG_URL": PG_ADMIN,
        "TP_REDIS_URL": REDIS_URL,
        "TP_LOCK_TIMEOUT_S": "10",
        "TP_LOCATION_PREFIX": f"t{uuid.uuid4().hex[:8]}_",
    }
    env.update({"TP_" + k.upper(): str(v) for k, v in overrides.items()})
    return Settings.from_env(env).ensure_secret_key()


class Tenants:
    """Creates tenants for a test and drops their databases, schemas and files after it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ids: list[str] = []

    def request(self, **kw: Any) -> registry.TenantRequest:
        kw.setdefault("id", uid())
        kw.setdefault("name", "Test tenant")
        kw.setdefault("admin_email", f"admin@{kw['id'].replace('_', '-')}.example.com")
        self.ids.append(kw["id"])
        return registry.TenantRequest(**kw)

    def create(self, **kw: Any) -> registry.Tenant:
        return registry.create_tenant(self.settings, self.request(**kw), "test")

    def cleanup(self) -> None:
        for tenant_id in self.ids:
            with contextlib.suppress(registry.NotFoundError):
                tenant = registry.get_tenant(self.settings, tenant_id)
                with contextlib.suppress(Exception):
                    provider_for(self.settings, tenant).drop()
            with contextlib.suppress(Exception):
                r = redis.Redis.from_url(REDIS_URL)
                keys = list(r.scan_iter(match=f"tp:{tenant_id}:*"))
                if keys:
                    r.delete(*keys)


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """SQLite control plane in a temp folder; PostgreSQL tenant server; Redis on."""
    s = make_settings(tmp_path / "data")
    for key, value in s.env().items():
        monkeypatch.setenv(key, value)
    registry.upgrade(s)
    yield s
    registry.engine(s).dispose()
    providers.drop_templates(s)


@pytest.fixture
def pg_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """PostgreSQL control plane (its own database), PostgreSQL tenants, Redis on."""
    with pg_database(f"tp_ctl_{uuid.uuid4().hex[:10]}") as url:
        s = make_settings(tmp_path / "data", control_url=url)
        for key, value in s.env().items():
            monkeypatch.setenv(key, value)
        registry.upgrade(s)
        yield s
        registry.engine(s).dispose()
        registry._engines.pop(url, None)
        providers.drop_templates(s)


@pytest.fixture
def tenants(settings: Settings) -> Iterator[Tenants]:
    t = Tenants(settings)
    yield t
    t.cleanup()


@pytest.fixture
def pg_tenants(pg_settings: Settings) -> Iterator[Tenants]:
    t = Tenants(pg_settings)
    yield t
    t.cleanup()


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    """A real (SQLite-backed) Dagster instance in a temp folder, for in-process runs."""
    (tmp_path / "dagster").mkdir()
    with instance_for_test(temp_dir=str(tmp_path / "dagster")) as inst:
        yield inst


def provision(settings: Settings, instance: DagsterInstance, tenant_id: str, **tags: str) -> Any:
    """Run the provisioning job for one tenant in this process; returns the result."""
    from tenant_pipelines.assets import CORRELATION_TAG
    from tenant_pipelines.definitions import defs

    tenant = registry.get_tenant(settings, tenant_id)
    instance.add_dynamic_partitions("tenants", [tenant_id])
    job = defs.resolve_job_def("provision_tenant")
    return job.execute_in_process(
        partition_key=tenant_id,
        instance=instance,
        tags={CORRELATION_TAG: tenant.correlation_id or "", **tags},
        raise_on_error=False,
    )


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 60,
    interval: float = 0.1,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Served:
    """A real ``tenantctl serve`` (daemon + HTTP service) in a subprocess."""

    def __init__(self, data_dir: Path, env: dict[str, str], port: int) -> None:
        self.data_dir, self.port = data_dir, port
        self.url = f"http://127.0.0.1:{port}"
        self.env = env
        self.log = data_dir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.settings = Settings.from_env(env).ensure_secret_key()
        self.migrations_dir = self.settings.migrations_dir

    def start(self) -> "Served":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tenant_pipelines.cli", "serve", "--port", str(self.port)],
            cwd=REPO,
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        import httpx

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited: {self.log.read_text()[-3000:]}")
            try:
                return httpx.get(self.url + "/health/live", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=90, what="tenantctl serve")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def serve_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TP_", "DAGSTER_HOME"))}
    env.update(
        {
            "TP_DATA_DIR": str(data_dir),
            "TP_TENANT_PG_URL": PG_ADMIN,
            "TP_REDIS_URL": REDIS_URL,
            "TP_LOCK_TIMEOUT_S": "10",
            # Unique per service: its root tenant must not meet another test session's.
            "TP_LOCATION_PREFIX": f"t{uuid.uuid4().hex[:8]}_",
        }
    )
    env.update({"TP_" + k.upper(): v for k, v in overrides.items()})
    return env


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One real service for the session (PostgreSQL control plane and tenants, Redis)."""
    data_dir = tmp_path_factory.mktemp("served")
    # A private copy of the migrations, so a test can inject a broken revision and fix it.
    migrations = data_dir / "migrations"
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, migrations)
    with pg_database(f"tp_ctl_{uuid.uuid4().hex[:10]}") as control_url:
        # No template database: tests inject slow and broken revisions into this service, and
        # a template build would run them in the database step instead of the migrations step.
        env = serve_env(
            data_dir,
            control_url=control_url,
            migrations_dir=str(migrations),
            tenant_pg_template="0",
        )
        srv = Served(data_dir, env, free_port()).start()
        try:
            yield srv
        finally:
            srv.stop()
            registry.engine(srv.settings).dispose()
            for tenant in registry.list_tenants(srv.settings, limit=10_000)[0]:
                with contextlib.suppress(Exception):
                    provider_for(srv.settings, tenant).drop()
            registry.engine(srv.settings).dispose()
            shutil.rmtree(data_dir, ignore_errors=True)
