"""Where a tenant's data lives: one small interface, one class per provider and strategy.

Every engine a step opens for a tenant comes from :func:`tenant_engine`, which enforces the
connection-string guard: the URL must point at that tenant's own database or schema.
"""

import contextlib
import hashlib
import logging
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.dialects import mssql
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool

from . import migrate
from .registry import LOCATION_PATTERN, Tenant
from .settings import Settings

MARKER_PREFIX = "tenant-pipelines:tenant="
TEMPLATE_MARKER_PREFIX = "tenant-pipelines:template="
# A template is an empty database: a statement slower than this is sleeping or waiting, not
# building. The build then gives up and the tenant migrates in its own migration step, where
# slow revisions belong (cancel, retry and errors are reported there).
TEMPLATE_STATEMENT_TIMEOUT_MS = 5000
# pg_advisory_lock(int, int): a lock space apart from the registry's bigint tenant locks.
TEMPLATE_LOCK_CLASS = 0x7470

log = logging.getLogger("tenant_pipelines.providers")


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


def _safe(name: str) -> str:
    # Every name that reaches DDL matches the location pattern, whatever produced it.
    if not LOCATION_PATTERN.match(name):
        raise GuardError(f"'{name}' is not a safe database name")
    return name


def template_for(settings: Settings, modules: Sequence[str]) -> tuple[str, str]:
    """The template database's name and marker for a module set at its current heads.

    Both change when any module's head does, so a new revision means a new template.
    """
    heads = migrate.heads(settings.migrations_dir, modules)
    marker = f"{TEMPLATE_MARKER_PREFIX}{','.join(modules)};{','.join(map(str, heads.values()))}"
    digest = hashlib.sha256(marker.encode()).hexdigest()[:12]
    return _safe(f"{settings.location_prefix}tpl_{digest}"), marker


def _module_set(marker: str) -> str:
    # "<prefix>identity,auditing;identity_0001,auditing_0001" -> "<prefix>identity,auditing;"
    return marker.split(";", 1)[0] + ";"


def drop_templates(settings: Settings) -> list[str]:
    """Drop every template database of this installation (its location prefix); their names.

    Safe at any time: the next database-per-tenant ensure() builds what it needs again.
    """
    with psycopg.connect(_libpq(sa.make_url(settings.tenant_pg_url)), autocommit=True) as conn:
        names = _templates(conn, settings.location_prefix, TEMPLATE_MARKER_PREFIX)
        for name in names:
            _drop_database(conn, name)
    return names


def _templates(conn: psycopg.Connection[Any], prefix: str, marker_prefix: str) -> list[str]:
    rows = conn.execute(
        "SELECT datname FROM pg_database WHERE starts_with(datname, %s) "
        "AND starts_with(shobj_description(oid, 'pg_database'), %s) ORDER BY datname",
        (prefix, marker_prefix),
    ).fetchall()
    return [r[0] for r in rows]


def _drop_database(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute(
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(_safe(name)))
    )


class PostgresDatabase:
    """PostgreSQL, one database per tenant.

    A new database is cloned from a template that has every one of the tenant's modules
    migrated to head (``TP_TENANT_PG_TEMPLATE``, on by default): one ``CREATE DATABASE ...
    TEMPLATE`` instead of an empty database plus every migration. The migration step stays,
    and finds the clone at head.
    """

    def __init__(self, settings: Settings, tenant: Tenant) -> None:
        self.settings = settings
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
                    self._create(conn)
                except psycopg.errors.DuplicateDatabase:
                    pass  # a concurrent creator won; the ownership check below still applies
                else:
                    self._mark(conn, marker)
                    return True
                row = (None,)
            if row[0] == marker:
                return False
            if row[0] is not None or not self._adoptable():
                raise GuardError(
                    f"database '{self.name}' exists and does not belong to "
                    f"tenant '{self.tenant.id}'"
                )
            # Created by an attempt that died before marking it, and untouched: adopt it.
            self._mark(conn, marker)
            return False

    def _create(self, conn: psycopg.Connection[Any]) -> None:
        template = self.template(conn) if self.settings.tenant_pg_template else None
        if template is not None:
            try:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                        sql.Identifier(self.name), sql.Identifier(template)
                    )
                )
                return
            except (psycopg.errors.ObjectInUse, psycopg.errors.InvalidCatalogName):
                # Someone is connected to the template (it refuses connections, but a
                # superuser may change that), or a newer build just replaced it. The plain
                # database is always correct, only slower: the migration step fills it.
                pass
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))

    def template(self, conn: psycopg.Connection[Any]) -> str | None:
        """The name of a complete template for this tenant's modules, built if missing.

        None when there is none to clone now (a build failed, or waiting for one timed out):
        the caller then creates a plain database. One build at a time per module set (an
        advisory lock, released with the connection if the builder dies); the others wait
        for it instead of building their own.
        """
        name, marker = template_for(self.settings, self.tenant.modules)
        if self._is_template(conn, name, marker):
            return name
        key = (TEMPLATE_LOCK_CLASS, _lock_id(self.settings.location_prefix, self.tenant.modules))
        timeout = f"{int(self.settings.lock_timeout_s * 1000)}ms"
        conn.execute("SELECT set_config('lock_timeout', %s, false)", (timeout,))
        if not _one(conn, "SELECT pg_try_advisory_lock(%s, %s)", key):
            try:
                conn.execute("SELECT pg_advisory_lock_shared(%s, %s)", key)
            except psycopg.errors.LockNotAvailable:
                return None
            conn.execute("SELECT pg_advisory_unlock_shared(%s, %s)", key)
            # Not built by the holder (it failed): do not try again right away.
            return name if self._is_template(conn, name, marker) else None
        try:
            if self._is_template(conn, name, marker) or self._build(conn, name, marker):
                return name
            return None
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", key)

    @staticmethod
    def _is_template(conn: psycopg.Connection[Any], name: str, marker: str) -> bool:
        # By name and marker: a tenant's database that happens to bear the name is never cloned.
        row = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s "
            "AND shobj_description(oid, 'pg_database') = %s",
            (name, marker),
        ).fetchone()
        return row is not None

    def _build(self, conn: psycopg.Connection[Any], name: str, marker: str) -> bool:
        """Migrate a fresh database under a temporary name, then publish it as ``name``.

        The template appears under its name only complete, so a half-built one is never
        cloned. False (and nothing left behind) when any step fails, e.g. a broken revision:
        the tenant then gets a plain database and the migration step reports the error.
        """
        tmp = _safe(f"{self.settings.location_prefix}tplb_{uuid.uuid4().hex[:12]}")
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(tmp)))
            # Marked at once: a leftover of a killed build is found and dropped as ours.
            _comment(conn, tmp, marker)
            url = self.admin_url.set(database=tmp)
            timeout = f"-cstatement_timeout={TEMPLATE_STATEMENT_TIMEOUT_MS}"
            engine = sa.create_engine(url, poolclass=NullPool, connect_args={"options": timeout})
            try:
                migrate.upgrade_modules(
                    self.settings.migrations_dir, engine, self.tenant.modules, None
                )
            finally:
                engine.dispose()  # nobody may be connected to a template, or to a renamed db
            with psycopg.connect(_libpq(url), autocommit=True, connect_timeout=5) as c:
                # Copied into every clone: how a clone orphaned before its marker is recognised.
                c.execute(sql.SQL("COMMENT ON SCHEMA public IS {}").format(sql.Literal(marker)))
            conn.execute(
                sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(
                    sql.Identifier(tmp)
                )
            )
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(tmp), sql.Identifier(name)
                )
            )
        except Exception as exc:
            reason = str(exc) if isinstance(exc, migrate.MigrationError) else type(exc).__name__
            log.warning(
                "template %s not built, creating %s without it: %s", name, self.name, reason
            )
            with contextlib.suppress(psycopg.Error):
                _drop_database(conn, tmp)
            return False
        # Older heads' templates of this module set, and leftovers of killed builds.
        for old in _templates(conn, self.settings.location_prefix, _module_set(marker)):
            if old != name:
                with contextlib.suppress(psycopg.Error):
                    _drop_database(conn, old)
        return True

    def _mark(self, conn: psycopg.Connection[Any], marker: str) -> None:
        _comment(conn, self.name, marker)

    def _adoptable(self) -> bool:
        """Whether an unmarked database is as a dead attempt of ours left it: empty, or an
        untouched clone of a template (its public schema carries the template's marker)."""
        with psycopg.connect(_libpq(self.url()), connect_timeout=5) as conn:
            tables = _one(
                conn,
                "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN "
                "('pg_catalog', 'information_schema')",
            )
            note = _one(
                conn,
                "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace "
                "WHERE nspname = 'public'",
            )
        return not tables or str(note or "").startswith(TEMPLATE_MARKER_PREFIX)

    def drop(self) -> None:
        dispose_tenant_engine(self.tenant.id)
        with self._admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name))
            )


def _comment(conn: psycopg.Connection[Any], name: str, text: str) -> None:
    conn.execute(
        sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(text))
    )


def _one(conn: psycopg.Connection[Any], query: str, params: Sequence[Any] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def _lock_id(prefix: str, modules: Sequence[str]) -> int:
    digest = hashlib.sha256(f"{prefix}:{','.join(modules)}".encode()).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


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
