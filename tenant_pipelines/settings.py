"""The one typed settings object, read from ``TP_*`` environment variables.

Nothing here runs at import: the CLI, the HTTP service and the Dagster resources each call
:func:`Settings.from_env` (or build :class:`Settings` from resource fields) when they start.
"""

import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from sqlalchemy.engine import make_url

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MIGRATIONS_DIR = PACKAGE_DIR.parent / "migrations"

# Order matters: modules are migrated in this order and a tenant's enabled set keeps it.
MODULES: tuple[str, ...] = ("identity", "tenant_settings", "auditing")
PROVIDERS: tuple[str, ...] = ("sqlite", "postgresql", "mssql")
STRATEGIES: tuple[str, ...] = ("database", "schema")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """Everything the control plane needs to know about its environment."""

    data_dir: Path
    control_url: str
    tenant_pg_url: str = ""
    tenant_pg_shared_db: str = "tenant_shared"
    # Clone database-per-tenant PostgreSQL tenants from a pre-migrated template (issue 5).
    tenant_pg_template: bool = True
    redis_url: str = ""
    migrations_dir: Path = DEFAULT_MIGRATIONS_DIR
    secret_key: str = ""
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_user: str = ""
    smtp_password: str = field(default="", repr=False)
    smtp_sender: str = "tenant-pipelines@localhost"
    public_url: str = "http://127.0.0.1:3000"
    lock_timeout_s: float = 30.0
    reset_token_ttl_s: int = 72 * 3600
    mssql_url: str = ""
    root_admin_email: str = "admin@tenant-pipelines.invalid"
    # Two installations sharing one tenant server must use different prefixes.
    location_prefix: str = "tenant_"
    host: str = "127.0.0.1"
    port: int = 3000

    @property
    def default_provider(self) -> str:
        """PostgreSQL when a tenant server is configured, else the embedded SQLite."""
        return "postgresql" if self.tenant_pg_url else "sqlite"

    @property
    def tenant_sqlite_dir(self) -> Path:
        return self.data_dir / "tenants"

    @property
    def control_database(self) -> str | None:
        """Name of the control plane's own database (guarded against tenant use)."""
        return make_url(self.control_url).database

    def env(self) -> dict[str, str]:
        """The settings as ``TP_*`` variables, for child processes (daemon, run workers)."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                value = "1" if value else "0"
            out["TP_" + f.name.upper()] = str(value)
        return out

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from ``TP_*`` variables, filling the embedded defaults."""
        env = os.environ if environ is None else environ
        data_dir = Path(env.get("TP_DATA_DIR") or ".tenant-pipelines").resolve()
        kwargs: dict[str, object] = {"data_dir": data_dir}
        for f in fields(cls):
            raw = env.get("TP_" + f.name.upper())
            if f.name == "data_dir" or raw is None or raw == "":
                continue
            if f.type in (int, "int"):
                try:
                    kwargs[f.name] = int(raw)
                except ValueError:
                    raise SettingsError(f"TP_{f.name.upper()} must be an integer") from None
            elif f.type in (float, "float"):
                try:
                    kwargs[f.name] = float(raw)
                except ValueError:
                    raise SettingsError(f"TP_{f.name.upper()} must be a number") from None
            elif f.type in (bool, "bool"):
                kwargs[f.name] = raw.lower() in ("1", "true", "yes", "on")
            elif f.type in (Path, "Path"):
                kwargs[f.name] = Path(raw).resolve()
            else:
                kwargs[f.name] = raw
        kwargs.setdefault("control_url", f"sqlite:///{data_dir / 'control.db'}")
        settings = cls(**kwargs)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        """Fail early, naming the variable, instead of deep inside a run."""
        for name in ("control_url", "tenant_pg_url", "mssql_url"):
            value = getattr(self, name)
            if value:
                try:
                    make_url(value)
                except Exception:
                    raise SettingsError(f"TP_{name.upper()} is not a database URL") from None
        if self.tenant_pg_url and not self.tenant_pg_url.startswith("postgresql+psycopg://"):
            raise SettingsError("TP_TENANT_PG_URL must start with postgresql+psycopg://")
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,20}", self.location_prefix):
            raise SettingsError("TP_LOCATION_PREFIX must match [a-z][a-z0-9_]{0,20}")
        if not (self.migrations_dir / "control").is_dir():
            raise SettingsError(f"TP_MIGRATIONS_DIR has no control/ folder: {self.migrations_dir}")

    def ensure_secret_key(self) -> "Settings":
        """Return settings with a secret key, creating one in the data folder on first start."""
        if self.secret_key:
            return self
        path = self.data_dir / "secret_key"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(48))
        return replace(self, secret_key=path.read_text().strip())
