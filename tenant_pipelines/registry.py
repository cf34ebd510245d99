"""The control plane's catalog: tenants, their status machine, validation and the audit trail.

SQLAlchemy Core on the control-plane database (SQLite file by default, PostgreSQL in
production). The schema itself is owned by Alembic (``migrations/control``).
"""

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, Engine

from .settings import MODULES, PROVIDERS, STRATEGIES, Settings

ID_PATTERN = re.compile(r"^[a-z][a-z0-9_]{2,39}$")
LOCATION_PATTERN = re.compile(r"^[a-z][a-z0-9_]{2,62}$")
EMAIL_PATTERN = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
RESERVED_NAMES = frozenset({"postgres", "template0", "template1", "public", "information_schema"})
ROOT_TENANT = "root"

# requested -> provisioning -> active | failed | cancelled; deactivated is an admin's choice.
STATUSES = ("requested", "provisioning", "active", "failed", "cancelled", "deactivated")
FINAL_STATUSES = frozenset({"active", "failed", "cancelled", "deactivated"})
RETRYABLE_STATUSES = frozenset({"failed", "cancelled"})

metadata = sa.MetaData()

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("provider", sa.String(20), nullable=False),
    sa.Column("strategy", sa.String(20), nullable=False),
    sa.Column("server", sa.String(255), nullable=False),
    sa.Column("location", sa.String(255), nullable=False),
    sa.Column("admin_email", sa.String(254), nullable=False),
    sa.Column("is_active", sa.Boolean, nullable=False),
    sa.Column("valid_until", sa.DateTime(timezone=True)),
    sa.Column("demo_data", sa.Boolean, nullable=False),
    sa.Column("modules", sa.JSON, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("status_reason", sa.Text),
    sa.Column("correlation_id", sa.String(32)),
    sa.Column("run_id", sa.String(64)),
    sa.Column("credentials_state", sa.String(20), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("activated_at", sa.DateTime(timezone=True)),
)

audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.String(40), nullable=False),
    sa.Column("event", sa.String(40), nullable=False),
    sa.Column("actor", sa.String(120), nullable=False),
    sa.Column("correlation_id", sa.String(32)),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("details", sa.JSON, nullable=False),
)


class RegistryError(Exception):
    """Base for errors meant for the caller: the message is safe to show."""

    code = "error"


class ValidationError(RegistryError):
    """Input rejected before anything was written; ``errors`` maps field to message."""

    code = "invalid"

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        super().__init__("; ".join(f"{k}: {v}" for k, v in self.errors.items()))


class NotFoundError(RegistryError):
    code = "not_found"


class ConflictError(RegistryError):
    code = "conflict"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_correlation_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class TenantRequest:
    """What an admin asks for when creating a tenant (CLI flags or API body)."""

    id: str
    name: str
    admin_email: str
    provider: str | None = None
    strategy: str = "database"
    location: str | None = None
    modules: Sequence[str] = MODULES
    demo_data: bool = False
    valid_until: dt.datetime | None = None


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    provider: str
    strategy: str
    server: str
    location: str
    admin_email: str
    is_active: bool
    valid_until: dt.datetime | None
    demo_data: bool
    modules: tuple[str, ...]
    status: str
    status_reason: str | None
    correlation_id: str | None
    run_id: str | None
    credentials_state: str
    created_at: dt.datetime
    updated_at: dt.datetime
    activated_at: dt.datetime | None = field(default=None)

    @classmethod
    def from_row(cls, row: Any) -> "Tenant":
        data = dict(row)
        data["modules"] = tuple(data["modules"])
        for key in ("valid_until", "created_at", "updated_at", "activated_at"):
            data[key] = _aware(data[key])
        return cls(**data)

    def is_expired(self, now: dt.datetime | None = None) -> bool:
        return self.valid_until is not None and self.valid_until <= (now or utcnow())

    def to_json(self) -> dict[str, Any]:
        """The tenant as the API and ``--json`` show it (datetimes in ISO 8601)."""
        # Not dataclasses.asdict: its deep copy of every field was half the CPU of a page of
        # 50 tenants, and every field here is flat.
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["modules"] = list(self.modules)
        for key, value in out.items():
            if isinstance(value, dt.datetime):
                out[key] = value.isoformat()
        return out


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite hands back naive datetimes; everything we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def engine(settings: Settings) -> Engine:
    """The process-wide engine for the control-plane database."""
    with _engines_lock:
        eng = _engines.get(settings.control_url)
        if eng is None:
            eng = new_engine(settings)
            _engines[settings.control_url] = eng
        return eng


def new_engine(settings: Settings, pool_size: int = 5, max_overflow: int = 5) -> Engine:
    """A control-plane engine of its own, for a caller that must not wait for :func:`engine`'s
    pool (the API's read model); everything else shares :func:`engine`."""
    url = sa.make_url(settings.control_url)
    if url.get_backend_name() == "sqlite":
        Path(url.database or "").parent.mkdir(parents=True, exist_ok=True)
        eng = sa.create_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(eng, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the service, the daemon and run workers read while one writes.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return eng
    # At most 10 per process (API, daemon, code server, each run worker): with the storage
    # pools, a whole service stays well inside PostgreSQL's default max_connections of 100
    # (docs/production.md, "Connections"); a busy pool makes callers wait, not fail.
    return sa.create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=max_overflow)


def upgrade(settings: Settings) -> None:
    """Bring the control-plane schema to head (idempotent; run on every start)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(settings.migrations_dir / "control"))
    with engine(settings).begin() as conn:
        cfg.attributes["connection"] = conn
        cfg.attributes["version_table"] = "alembic_version_control"
        command.upgrade(cfg, "head")


# --- validation ------------------------------------------------------------------------------


def tenant_location(settings: Settings, req: TenantRequest) -> str:
    """The database/schema/file name: the request's, or the installation's prefix + id."""
    return req.location or f"{settings.location_prefix}{req.id}"


def validate_request(settings: Settings, conn: Connection | None, req: TenantRequest) -> None:
    """Raise :class:`ValidationError` listing every problem with ``req``; write nothing.

    ``conn`` is used for the checks that need the catalog (duplicates, the connection-string
    guard); pass ``None`` to check only the shape.
    """
    errors: dict[str, str] = {}
    if not isinstance(req.id, str) or not ID_PATTERN.match(req.id):
        errors["id"] = "must match ^[a-z][a-z0-9_]{2,39}$"
    elif req.id in RESERVED_NAMES or req.id.startswith("pg_") or req.id == _control_db(settings):
        errors["id"] = f"'{req.id}' is reserved"
    name = req.name if isinstance(req.name, str) else ""
    if not name.strip() or len(name) > 200 or any(ord(c) < 32 or ord(c) == 127 for c in name):
        errors["name"] = "must be 1-200 printable characters"
    email = req.admin_email.strip() if isinstance(req.admin_email, str) else ""
    if len(email) > 254 or not EMAIL_PATTERN.match(email):
        errors["admin_email"] = "must be an email address"
    provider = req.provider or settings.default_provider
    if provider not in PROVIDERS:
        errors["provider"] = f"must be one of {', '.join(PROVIDERS)}"
    elif provider == "postgresql" and not settings.tenant_pg_url:
        errors["provider"] = "postgresql is not configured (set TP_TENANT_PG_URL)"
    elif provider == "mssql" and not settings.mssql_url:
        errors["provider"] = "mssql is not configured (set TP_MSSQL_URL)"
    if req.strategy not in STRATEGIES:
        errors["strategy"] = f"must be one of {', '.join(STRATEGIES)}"
    elif provider == "sqlite" and req.strategy != "database":
        errors["strategy"] = "sqlite supports only the database (file per tenant) strategy"
    modules = list(req.modules) if isinstance(req.modules, list | tuple) else None
    if (
        modules is None
        or any(m not in MODULES for m in modules)
        or len(set(modules)) != len(modules)
    ):
        errors["modules"] = f"must be a list of distinct modules from {', '.join(MODULES)}"
    elif "identity" not in modules:
        errors["modules"] = "identity is required"
    if req.valid_until is not None:
        if not isinstance(req.valid_until, dt.datetime) or req.valid_until.tzinfo is None:
            errors["valid_until"] = "must be a timestamp with a time zone"
        elif req.valid_until <= utcnow():
            errors["valid_until"] = "is in the past"
    if req.location is not None:
        if not isinstance(req.location, str) or not LOCATION_PATTERN.match(req.location):
            errors["location"] = "must match ^[a-z][a-z0-9_]{2,62}$"
        elif req.location in RESERVED_NAMES or req.location.startswith("pg_"):
            errors["location"] = f"'{req.location}' is reserved"
    if "id" not in errors and "location" not in errors and "provider" not in errors:
        guard = location_guard_error(settings, provider, tenant_location(settings, req))
        if guard:
            errors["location"] = guard
    if not errors and conn is not None:
        if conn.execute(sa.select(tenants.c.id).where(tenants.c.id == req.id)).first():
            raise ConflictError(f"tenant '{req.id}' already exists")
        clash = conn.execute(
            sa.select(tenants.c.id).where(
                tenants.c.provider == provider,
                tenants.c.server == server_for(settings, provider),
                tenants.c.location == tenant_location(settings, req),
            )
        ).first()
        if clash and clash.id == req.id:
            # A concurrent create of the same id committed between our two reads.
            raise ConflictError(f"tenant '{req.id}' already exists")
        if clash:
            errors["location"] = f"belongs to tenant '{clash.id}'"
    if errors:
        raise ValidationError(errors)


def _control_db(settings: Settings) -> str | None:
    url = sa.make_url(settings.control_url)
    return None if url.get_backend_name() == "sqlite" else url.database


def location_guard_error(settings: Settings, provider: str, location: str) -> str | None:
    """Why ``location`` may not hold a tenant on ``provider`` (None when it may)."""
    control = sa.make_url(settings.control_url)
    if provider == "postgresql" and control.get_backend_name() == "postgresql":
        tenant_server = sa.make_url(settings.tenant_pg_url)
        same_server = (tenant_server.host, tenant_server.port or 5432) == (
            control.host,
            control.port or 5432,
        )
        if same_server and location == control.database:
            return "is the control-plane database"
    if provider == "postgresql":
        if location == sa.make_url(settings.tenant_pg_url).database:
            return "is the tenant server's maintenance database"
        if location == settings.tenant_pg_shared_db:
            return "is the shared database of schema-per-tenant tenants"
    return None


def server_for(settings: Settings, provider: str) -> str:
    """A password-free label of the server a provider puts tenants on."""
    if provider == "postgresql":
        url = sa.make_url(settings.tenant_pg_url)
        return f"{url.host or 'localhost'}:{url.port or 5432}"
    if provider == "mssql":
        url = sa.make_url(settings.mssql_url)
        return f"{url.host or 'localhost'}:{url.port or 1433}"
    return str(settings.tenant_sqlite_dir)


# --- catalog operations ----------------------------------------------------------------------


def create_tenant(
    settings: Settings, req: TenantRequest, actor: str, *, allow_reserved: bool = False
) -> Tenant:
    """Validate ``req`` and insert it as ``requested``; nothing is written when it is invalid."""
    if not allow_reserved and req.id == ROOT_TENANT:
        raise ValidationError({"id": "'root' is reserved for the platform's own tenant"})
    provider = req.provider or settings.default_provider
    now = utcnow()
    correlation = new_correlation_id()
    with engine(settings).begin() as conn:
        validate_request(settings, conn, req)
        try:
            conn.execute(
                tenants.insert().values(
                    id=req.id,
                    name=req.name.strip(),
                    provider=provider,
                    strategy=req.strategy,
                    server=server_for(settings, provider),
                    location=tenant_location(settings, req),
                    admin_email=req.admin_email.strip().lower(),
                    is_active=True,
                    valid_until=req.valid_until,
                    demo_data=bool(req.demo_data),
                    modules=[m for m in MODULES if m in req.modules],
                    status="requested",
                    correlation_id=correlation,
                    credentials_state="pending",
                    created_at=now,
                    updated_at=now,
                )
            )
        except sa.exc.IntegrityError:
            raise ConflictError(f"tenant '{req.id}' already exists") from None
        record(conn, req.id, "requested", actor, correlation, {"provider": provider})
    return get_tenant(settings, req.id)


def get_tenant(settings: Settings, tenant_id: str, conn: Connection | None = None) -> Tenant:
    """The tenant's catalog row; :class:`NotFoundError` when there is none."""
    query = sa.select(tenants).where(tenants.c.id == tenant_id)
    if conn is None:
        with engine(settings).connect() as own:
            row = own.execute(query).mappings().first()
    else:
        row = conn.execute(query).mappings().first()
    if row is None:
        raise NotFoundError(f"no tenant '{tenant_id}'")
    return Tenant.from_row(row)


def list_tenants(
    settings: Settings, status: str | None = None, limit: int = 100, offset: int = 0
) -> tuple[list[Tenant], int]:
    """A page of tenants ordered by id, and the total count for the filter."""
    query = sa.select(tenants).order_by(tenants.c.id).limit(limit).offset(offset)
    count = sa.select(sa.func.count()).select_from(tenants)
    if status:
        query = query.where(tenants.c.status == status)
        count = count.where(tenants.c.status == status)
    with engine(settings).connect() as conn:
        rows = conn.execute(query).mappings().all()
        total = conn.execute(count).scalar_one()
    return [Tenant.from_row(r) for r in rows], int(total)


def status_counts(settings: Settings) -> dict[str, int]:
    with engine(settings).connect() as conn:
        rows = conn.execute(
            sa.select(tenants.c.status, sa.func.count()).group_by(tenants.c.status)
        ).all()
    return {status: int(n) for status, n in rows}


def transition(
    settings: Settings,
    tenant_id: str,
    to: str,
    *,
    allowed_from: Collection[str] | None = None,
    reason: str | None = None,
    correlation_id: str | None = None,
    run_id: str | None = None,
    actor: str = "system",
    event: str | None = None,
    details: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    only_run_id: str | None = None,
    pre_events: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> bool:
    """Move a tenant to ``to`` if its status is in ``allowed_from``; audit it; True if moved.

    ``pre_events`` are audited just before ``event``, in the same transaction.

    The check and the write are one conditional UPDATE, so concurrent callers (twenty
    retries at once, a sensor and a run) cannot both win.
    """
    values: dict[str, Any] = {"status": to, "status_reason": reason, "updated_at": utcnow()}
    if correlation_id is not None:
        values["correlation_id"] = correlation_id
    if run_id is not None:
        values["run_id"] = run_id
    if to == "active":
        values["activated_at"] = values["updated_at"]
    values.update(extra or {})
    stmt = tenants.update().where(tenants.c.id == tenant_id).values(**values)
    if allowed_from is not None:
        stmt = stmt.where(tenants.c.status.in_(list(allowed_from)))
    if only_run_id is not None:
        stmt = stmt.where(tenants.c.run_id == only_run_id)
    with engine(settings).begin() as conn:
        moved = conn.execute(stmt).rowcount == 1
        if moved and (event or pre_events):
            row = conn.execute(
                sa.select(tenants.c.correlation_id).where(tenants.c.id == tenant_id)
            ).first()
            correlation = row.correlation_id if row else None
            for pre_event, pre_details in pre_events:
                record(conn, tenant_id, pre_event, "system", correlation, pre_details)
            if event:
                record(conn, tenant_id, event, actor, correlation, details)
    return moved


def set_fields(settings: Settings, tenant_id: str, **values: Any) -> None:
    """Update columns of a tenant row, stamping ``updated_at`` (the read model polls it)."""
    values["updated_at"] = utcnow()
    with engine(settings).begin() as conn:
        conn.execute(tenants.update().where(tenants.c.id == tenant_id).values(**values))


def record(
    conn: Connection,
    tenant_id: str,
    event: str,
    actor: str,
    correlation_id: str | None,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Append one audit event (inside the caller's transaction)."""
    from .telemetry import scrub_obj

    conn.execute(
        audit_events.insert().values(
            tenant_id=tenant_id,
            event=event,
            actor=actor,
            correlation_id=correlation_id,
            at=utcnow(),
            details=scrub_obj(dict(details or {})),
        )
    )


def audit(
    settings: Settings,
    tenant_id: str,
    event: str,
    actor: str,
    correlation_id: str | None,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Append one audit event in its own transaction."""
    with engine(settings).begin() as conn:
        record(conn, tenant_id, event, actor, correlation_id, details)


def audit_trail(settings: Settings, tenant_id: str) -> list[dict[str, Any]]:
    """A tenant's audit events, oldest first."""
    with engine(settings).connect() as conn:
        rows = conn.execute(
            sa.select(audit_events)
            .where(audit_events.c.tenant_id == tenant_id)
            .order_by(audit_events.c.id)
        ).mappings()
        return [
            {**dict(r), "at": _aware(r["at"]).isoformat(), "details": r["details"]}  # type: ignore[union-attr]
            for r in rows
        ]


# --- one run per tenant: a lock the operating system releases when its holder dies -------------


class LockTimeout(RegistryError):
    code = "locked"


@contextlib.contextmanager
def tenant_lock(settings: Settings, tenant_id: str, timeout_s: float) -> Iterator[None]:
    """Hold the tenant's provisioning lock; :class:`LockTimeout` after ``timeout_s``.

    PostgreSQL control plane: a session advisory lock. SQLite control plane: ``flock`` on a
    file in the data folder. Both vanish with the holding connection or process, so a
    killed run never blocks the next one.
    """
    deadline = time.monotonic() + timeout_s
    url = sa.make_url(settings.control_url)
    if url.get_backend_name() == "postgresql":
        key = int.from_bytes(hashlib.sha256(tenant_id.encode()).digest()[:8], "big", signed=True)
        with engine(settings).connect() as conn:
            while not conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                conn.rollback()
                if time.monotonic() > deadline:
                    raise LockTimeout(f"tenant '{tenant_id}' is being provisioned by another run")
                time.sleep(0.05)
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        return
    lock_dir = settings.data_dir / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{tenant_id}.lock", "a+") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(
                        f"tenant '{tenant_id}' is being provisioned by another run"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def dumps(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)
