"""Where a tenant's data lives: one small interface, one class per provider and strategy.

Every engine a step opens for a tenant comes from :func:`tenant_engine`, which enforces the
connection-string guard: the URL must point at that tenant's own database or schema.
"""

import threading
from pathlib import Path
from typing import Any, Protocol

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.dialects import mssql
from sqlalchemy.engine import URL, Engine

from .registry import LOCATION_PATTERN, Tenant
from .settings import Settings

MARKER_PREFIX = "tenant-pipelines:tenant="


class GuardError(Exception):
    """A connection would reach something that is not this tenant's own database or schema."""


class Provider(Protocol):
    """Creates, checks and addresses one tenant's database or schema."""

    def url(self) -> URL:
        """The SQLAlchemy URL of the tenant's data, password included (never log it)."""

    def connect_args(self) -> dict[str, Any]:
        """Extra DBAPI arguments that pin a connection to the tenant (search_path...)."""

    def ensure(self) -> bool:
        """Create the database or schema if missing; True when this call created it."""

    def exists(self) -> bool:
        """Whether the database or schema is there."""

    def drop(self) -> None:
        """Remove the database or schema (tests and operators only)."""


def _check_location(tenant: Tenant) -> str:
    # Re-checked here although the registry validated it: this is the last line before DDL.
    if not LOCATION_PATTERN.match(tenant.location):
        raise GuardError(f"location of tenant '{tenant.id}' is not a safe identifier")
    return tenant.location


def _libpq(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresDatabase:
    """PostgreSQL, one database per tenant."""

    def __init__(self, settings: Settings, tenant: Tenant) -> None:
        self.admin_url = sa.make_url(settings.tenant_pg_url)
        self.tenant = tenant
        self.name = _check_location(tenant)

    def url(self) -> URL:
        return self.admin_url.set(database=self.name)

    def connect_args(self) -> dict[str, Any]:
        return {}

    def _admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(_libpq(self.admin_url), autocommit=True, connect_timeout=5)

    def exists(self) -> bool:
        with self._admin() as conn:
            row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.name,))
            return row.fetchone() is not None

    def ensure(self) -> bool:
        marker = MARKER_PREFIX + self.tenant.id
        with self._admin() as conn:
            row = conn.execute(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                (self.name,),
            ).fetchone()
            if row is None:
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
                except psycopg.errors.DuplicateDatabase:
                    pass  # a concurrent creator won; the ownership check below still applies
                else:
                    self._mark(conn, marker)
                    return True
                row = (None,)
            if row[0] == marker:
                return False
            if row[0] is not None or self._has_tables():
                raise GuardError(
                    f"database '{self.name}' exists and does not belong to "
                    f"tenant '{self.tenant.id}'"
                )
            # Created by an attempt that died before marking it, and still empty: adopt it.
            self._mark(conn, marker)
            return False

    def _mark(self, conn: psycopg.Connection[Any], marker: str) -> None:
        conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(self.name), sql.Literal(marker)
            )
        )

    def _has_tables(self) -> bool:
        with psycopg.connect(_libpq(self.url()), connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN "
                "('pg_catalog', 'information_schema')"
            ).fetchone()
            return bool(row and row[0])

    def drop(self) -> None:
        dispose_tenant_engine(self.tenant.id)
        with self._admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name))
            )


class PostgresSchema:
    """PostgreSQL, one schema per tenant in a shared database, connections pinned to it."""

    def __init__(self, settings: Settings, tenant: Tenant) -> None:
        self.admin_url = sa.make_url(settings.tenant_pg_url)
        self.shared_db = settings.tenant_pg_shared_db
        self.tenant = tenant
        self.name = _check_location(tenant)

    def url(self) -> URL:
        return self.admin_url.set(database=self.shared_db)

    def connect_args(self) -> dict[str, Any]:
        # search_path holds only the tenant's schema: unqualified DDL cannot land elsewhere.
        return {"options": f"-csearch_path={self.name}"}

    def _ensure_shared_db(self) -> None:
        with psycopg.connect(_libpq(self.admin_url), autocommit=True, connect_timeout=5) as conn:
            if conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.shared_db,)
            ).fetchone():
                return
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.shared_db)))
            except psycopg.errors.DuplicateDatabase:
                pass

    def _shared(self) -> psycopg.Connection[Any]:
        return psycopg.connect(_libpq(self.url()), autocommit=True, connect_timeout=5)

    def exists(self) -> bool:
        try:
            with self._shared() as conn:
                row = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.name,))
                return row.fetchone() is not None
        except psycopg.OperationalError:
            return False

    def ensure(self) -> bool:
        self._ensure_shared_db()
        marker = MARKER_PREFIX + self.tenant.id
        with self._shared() as conn:
            row = conn.execute(
                "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = %s",
                (self.name,),
            ).fetchone()
            if row is not None and row[0] not in (None, marker):
                raise GuardError(
                    f"schema '{self.name}' exists and does not belong to tenant '{self.tenant.id}'"
                )
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.name))
            )
            conn.execute(
                sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
                    sql.Identifier(self.name), sql.Literal(marker)
                )
            )
            return row is None

    def drop(self) -> None:
        dispose_tenant_engine(self.tenant.id)
        try:
            with self._shared() as conn:
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.name))
                )
        except psycopg.OperationalError:
            pass


class SqliteFile:
    """SQLite, one file per tenant under the data folder: the embedded default."""

    def __init__(self, settings: Settings, tenant: Tenant) -> None:
        self.dir = settings.tenant_sqlite_dir
        self.tenant = tenant
        self.path = self.dir / f"{_check_location(tenant)}.db"

    def url(self) -> URL:
        return URL.create("sqlite", database=str(self.path))

    def connect_args(self) -> dict[str, Any]:
        return {"timeout": 30}

    def exists(self) -> bool:
        return self.path.exists()

    def ensure(self) -> bool:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            return False
        with sa.create_engine(self.url()).connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        return True

    def drop(self) -> None:
        dispose_tenant_engine(self.tenant.id)
        for suffix in ("", "-wal", "-shm"):
            Path(str(self.path) + suffix).unlink(missing_ok=True)


class SqlServer:
    """SQL Server hook: generates check-then-create T-SQL.

    Not yet run against a live server (none is available here); the statements are covered
    by tests. Executing them needs a SQL Server DBAPI driver (pyodbc or pymssql) and
    ``TP_MSSQL_URL``.
    """

    def __init__(self, settings: Settings, tenant: Tenant) -> None:
        self.admin_url = sa.make_url(settings.mssql_url) if settings.mssql_url else None
        self.tenant = tenant
        self.name = _check_location(tenant)

    @staticmethod
    def quote(name: str) -> str:
        preparer: Any = mssql.dialect().identifier_preparer  # type: ignore[no-untyped-call]
        return str(preparer.quote_identifier(name))

    @staticmethod
    def literal(value: str) -> str:
        return "N'" + value.replace("'", "''") + "'"

    def create_statements(self) -> list[str]:
        """T-SQL that creates the tenant's database or schema only when missing."""
        if self.tenant.strategy == "schema":
            inner = "CREATE SCHEMA " + self.quote(self.name)
            return [
                f"IF SCHEMA_ID({self.literal(self.name)}) IS NULL "
                f"EXEC(N'{inner.replace(chr(39), chr(39) * 2)}')"
            ]
        return [
            f"IF DB_ID({self.literal(self.name)}) IS NULL CREATE DATABASE {self.quote(self.name)}"
        ]

    def drop_statements(self) -> list[str]:
        if self.tenant.strategy == "schema":
            return [f"DROP SCHEMA IF EXISTS {self.quote(self.name)}"]
        return [f"DROP DATABASE IF EXISTS {self.quote(self.name)}"]

    def _admin_url(self) -> URL:
        if self.admin_url is None:
            raise GuardError("SQL Server is not configured (set TP_MSSQL_URL)")
        return self.admin_url

    def url(self) -> URL:
        url = self._admin_url()
        return url if self.tenant.strategy == "schema" else url.set(database=self.name)

    def connect_args(self) -> dict[str, Any]:
        return {}

    def _run(self, statements: list[str]) -> None:
        eng = sa.create_engine(self._admin_url(), isolation_level="AUTOCOMMIT")
        with eng.connect() as conn:
            for stmt in statements:
                conn.exec_driver_sql(stmt)

    def exists(self) -> bool:
        fn = "SCHEMA_ID" if self.tenant.strategy == "schema" else "DB_ID"
        eng = sa.create_engine(self._admin_url())
        with eng.connect() as conn:
            return (
                conn.exec_driver_sql(f"SELECT {fn}({self.literal(self.name)})").scalar() is not None
            )

    def ensure(self) -> bool:
        existed = self.exists()
        self._run(self.create_statements())
        return not existed

    def drop(self) -> None:
        self._run(self.drop_statements())


def provider_for(settings: Settings, tenant: Tenant) -> Provider:
    """The provider object for a tenant's provider and strategy."""
    if tenant.provider == "postgresql":
        if tenant.strategy == "schema":
            return PostgresSchema(settings, tenant)
        return PostgresDatabase(settings, tenant)
    if tenant.provider == "sqlite":
        return SqliteFile(settings, tenant)
    if tenant.provider == "mssql":
        return SqlServer(settings, tenant)
    raise GuardError(f"unknown provider '{tenant.provider}'")


def guard(settings: Settings, tenant: Tenant, url: URL, connect_args: dict[str, Any]) -> None:
    """Refuse any URL that is not this tenant's own database or schema."""
    control = sa.make_url(settings.control_url)
    same_server = (url.host, url.port) == (control.host, control.port)
    if url.get_backend_name() == control.get_backend_name() and same_server:
        if url.database == control.database:
            raise GuardError("refusing to open the control-plane database as a tenant")
    if tenant.strategy == "schema":
        if connect_args.get("options") != f"-csearch_path={tenant.location}":
            raise GuardError(f"connection for tenant '{tenant.id}' is not pinned to its schema")
    elif url.get_backend_name() == "sqlite":
        if Path(url.database or "").name != f"{tenant.location}.db":
            raise GuardError(f"file does not belong to tenant '{tenant.id}'")
    elif url.database != tenant.location:
        raise GuardError(f"database does not belong to tenant '{tenant.id}'")


_tenant_engines: dict[str, Engine] = {}
_tenant_engines_lock = threading.Lock()


def tenant_engine(settings: Settings, tenant: Tenant) -> Engine:
    """A guarded engine on the tenant's own data, cached per process."""
    with _tenant_engines_lock:
        eng = _tenant_engines.get(tenant.id)
        if eng is not None:
            return eng
        prov = provider_for(settings, tenant)
        url, args = prov.url(), prov.connect_args()
        guard(settings, tenant, url, args)
        if url.get_backend_name() == "sqlite":
            eng = sa.create_engine(url, connect_args=args)
        else:
            eng = sa.create_engine(
                url, connect_args=args, pool_size=2, max_overflow=3, pool_pre_ping=True
            )
        _tenant_engines[tenant.id] = eng
        return eng


def dispose_tenant_engine(tenant_id: str) -> None:
    with _tenant_engines_lock:
        eng = _tenant_engines.pop(tenant_id, None)
    if eng is not None:
        eng.dispose()
