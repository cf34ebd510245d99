"""Alembic migrations of the tenant modules, applied in one fixed order, each with its own
version table; also the shared ``env.py`` body of every script directory under
``migrations/``.
"""

import contextlib
import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command, context
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg import OperationalError
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from .registry import Tenant


class MigrationError(Exception):
    """A module's migration failed; names the module, the revision and the database error."""

    def __init__(
        self, module: str, revision: str | None, error: str, *, transient: bool = False
    ) -> None:
        self.module, self.revision, self.error = module, revision, error
        self.transient = transient
        super().__init__(f"module {module}, revision {revision or '?'}: {error}")


@dataclass(frozen=True)
class ModuleResult:
    module: str
    before: str | None
    after: str | None

    @property
    def changed(self) -> bool:
        return self.before != self.after


def run_env() -> None:
    """The body of every ``migrations/*/env.py``: run on the connection the caller passed."""
    cfg = context.config
    conn: Connection = cfg.attributes["connection"]
    context.configure(
        connection=conn,
        version_table=cfg.attributes["version_table"],
        version_table_schema=cfg.attributes.get("schema"),
        # One transaction per revision: a failure keeps the revisions before it applied.
        transaction_per_migration=cfg.attributes.get("per_migration", False),
    )
    with context.begin_transaction():
        context.run_migrations()


def version_table(module: str) -> str:
    return f"alembic_version_{module}"


def _script(location: Path) -> ScriptDirectory:
    # Keyed on the versions folder's mtime so an added or removed revision is seen.
    return _script_at(location, (location / "versions").stat().st_mtime_ns)


@functools.cache
def _script_at(location: Path, _mtime: int) -> ScriptDirectory:
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    return ScriptDirectory.from_config(cfg)


def head(migrations_dir: Path, module: str) -> str | None:
    """The head revision of a module's script directory (cached per process)."""
    return _script(migrations_dir / module).get_current_head()


def heads(migrations_dir: Path, modules: Sequence[str]) -> dict[str, str | None]:
    """Each module's head revision, in the modules' order."""
    return {m: head(migrations_dir, m) for m in modules}


def current(conn: Connection, module: str, schema: str | None) -> str | None:
    """The revision a tenant database is at for ``module`` (None before the first)."""
    ctx = MigrationContext.configure(
        conn, opts={"version_table": version_table(module), "version_table_schema": schema}
    )
    return ctx.get_current_revision()


def schema_of(tenant: Tenant) -> str | None:
    return tenant.location if tenant.strategy == "schema" and tenant.provider != "sqlite" else None


def status(
    migrations_dir: Path, engine: Engine, tenant: Tenant
) -> dict[str, tuple[str | None, str | None]]:
    """``{module: (current, head)}`` for each of the tenant's modules."""
    schema = schema_of(tenant)
    with engine.connect() as conn:
        return {m: (current(conn, m, schema), head(migrations_dir, m)) for m in tenant.modules}


def apply(
    migrations_dir: Path,
    engine: Engine,
    tenant: Tenant,
    on_module: Callable[[str], AbstractContextManager[dict[str, Any]]] | None = None,
) -> list[ModuleResult]:
    """Upgrade each of the tenant's modules to head in order; stop at the first failure.

    A module already at head is skipped without loading Alembic's environment. ``on_module``
    (optional) wraps each module's work, e.g. in a trace span: it is entered before the module
    is looked at, sees the module's exception if it fails, and the dict it yields receives the
    module's ``before`` and ``after`` revisions.
    """
    return upgrade_modules(migrations_dir, engine, tenant.modules, schema_of(tenant), on_module)


def upgrade_modules(
    migrations_dir: Path,
    engine: Engine,
    modules: Sequence[str],
    schema: str | None,
    on_module: Callable[[str], AbstractContextManager[dict[str, Any]]] | None = None,
) -> list[ModuleResult]:
    """:func:`apply` for a module list and schema, without a tenant.

    Migrations only ever see the connection, their version table and the schema (see
    :func:`run_env`), never a tenant: that is what lets one template database serve every
    tenant with the same modules.
    """
    results = []
    for module in modules:
        with on_module(module) if on_module else contextlib.nullcontext({}) as info:
            target = head(migrations_dir, module)
            with engine.connect() as conn:
                before = current(conn, module, schema)
            info["before"] = before
            if before == target:
                info["after"] = before
                results.append(ModuleResult(module, before, before))
                continue
            cfg = Config()
            cfg.set_main_option("script_location", str(migrations_dir / module))
            cfg.attributes.update(
                version_table=version_table(module), schema=schema, per_migration=True
            )
            with engine.connect() as conn:
                cfg.attributes["connection"] = conn
                try:
                    command.upgrade(cfg, "head")
                except Exception as exc:  # any database error ends the step
                    conn.rollback()
                    failed = _next_revision(migrations_dir, module, current(conn, module, schema))
                    transient = isinstance(
                        getattr(exc, "orig", exc), OperationalError | sa_exc.OperationalError
                    )
                    raise MigrationError(
                        module, failed, _first_line(exc), transient=transient
                    ) from None
                after = current(conn, module, schema)
            info["after"] = after
        results.append(ModuleResult(module, before, after))
    return results


def _next_revision(migrations_dir: Path, module: str, at: str | None) -> str | None:
    script = _script(migrations_dir / module)
    for rev in reversed(list(script.walk_revisions())):
        if rev.down_revision == at or (at is None and rev.down_revision is None):
            return rev.revision
    return None


def _first_line(exc: BaseException) -> str:
    # psycopg/SQLAlchemy messages carry the SQL and a docs link on later lines; keep the cause.
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0] if text else ''}"
