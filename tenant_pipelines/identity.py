"""Identity seeding inside a tenant: roles, permissions, the admin user, one-time reset tokens,
the tenant's own settings, and password hashing shared with the control plane's admins.

Every write is an upsert or a check-before-insert, so re-running a seed never duplicates.
"""

import base64
import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .registry import Tenant, utcnow

ROLES: Mapping[str, str] = {
    "admin": "Full control of the tenant",
    "member": "Regular user of the tenant",
}
PERMISSIONS: Mapping[str, str] = {
    "tenant.settings.read": "Read tenant settings",
    "tenant.settings.write": "Change tenant settings",
    "users.read": "List users",
    "users.invite": "Invite users",
    "users.manage": "Change and deactivate users",
    "roles.manage": "Assign roles",
    "audit.read": "Read the tenant's audit trail",
}
ROLE_PERMISSIONS: Mapping[str, tuple[str, ...]] = {
    "admin": tuple(PERMISSIONS),
    "member": ("tenant.settings.read", "users.read"),
}
DEMO_USERS = ("demo.alice@example.invalid", "demo.bob@example.invalid")
RESET = "password_reset"

md = sa.MetaData()
roles = sa.Table(
    "roles",
    md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64)),
    sa.Column("description", sa.String(255)),
)
permissions = sa.Table(
    "permissions",
    md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("code", sa.String(128)),
    sa.Column("description", sa.String(255)),
)
role_permissions = sa.Table(
    "role_permissions",
    md,
    sa.Column("role_id", sa.Integer, primary_key=True),
    sa.Column("permission_id", sa.Integer, primary_key=True),
)
users = sa.Table(
    "users",
    md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("email", sa.String(254)),
    sa.Column("display_name", sa.String(200)),
    sa.Column("password_hash", sa.String(255)),
    sa.Column("is_active", sa.Boolean),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
)
user_roles = sa.Table(
    "user_roles",
    md,
    sa.Column("user_id", sa.Integer, primary_key=True),
    sa.Column("role_id", sa.Integer, primary_key=True),
)
user_tokens = sa.Table(
    "user_tokens",
    md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer),
    sa.Column("purpose", sa.String(32)),
    sa.Column("token_hash", sa.String(64)),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("expires_at", sa.DateTime(timezone=True)),
    sa.Column("used_at", sa.DateTime(timezone=True)),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
)
tenant_settings = sa.Table(
    "tenant_settings",
    md,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.JSON),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
)
tenant_modules = sa.Table(
    "tenant_modules",
    md,
    sa.Column("module", sa.String(64), primary_key=True),
    sa.Column("enabled", sa.Boolean),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
)
audit_log = sa.Table(
    "audit_log",
    md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True)),
    sa.Column("actor", sa.String(254)),
    sa.Column("action", sa.String(64)),
    sa.Column("target", sa.String(255)),
    sa.Column("details", sa.JSON),
)


# --- passwords and tokens --------------------------------------------------------------------

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_password(password: str) -> str:
    """A salted scrypt hash, encoded as ``scrypt$n$r$p$salt$hash``."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    parts = [str(_SCRYPT[k]) for k in ("n", "r", "p")] + [_b64(salt), _b64(digest)]
    return "scrypt$" + "$".join(parts)


def verify_password(password: str, encoded: str | None) -> bool:
    """Constant-time check of ``password`` against :func:`hash_password` output."""
    if not encoded or not encoded.startswith("scrypt$"):
        # Burn comparable time so unknown users and users without passwords look alike.
        hashlib.scrypt(password.encode(), salt=b"0" * 16, dklen=32, **_SCRYPT)
        return False
    _, n, r, p, salt, digest = encoded.split("$")
    got = hashlib.scrypt(
        password.encode(), salt=_unb64(salt), dklen=32, n=int(n), r=int(r), p=int(p)
    )
    return hmac.compare_digest(got, _unb64(digest))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def token_hash(token: str) -> str:
    """SHA-256 of a high-entropy token: what is stored instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


# --- seeding ---------------------------------------------------------------------------------


def _insert_missing(
    conn: Connection, table: sa.Table, key: str, rows: Iterable[Mapping[str, Any]]
) -> None:
    existing = {r[0] for r in conn.execute(sa.select(table.c[key]))}
    new = [dict(r) for r in rows if r[key] not in existing]
    if new:
        conn.execute(table.insert(), new)


def seed_catalog(conn: Connection) -> None:
    """Roles, permissions and their links, exactly once each."""
    _insert_missing(conn, roles, "name", [{"name": n, "description": d} for n, d in ROLES.items()])
    _insert_missing(
        conn, permissions, "code", [{"code": c, "description": d} for c, d in PERMISSIONS.items()]
    )
    role_ids = dict(conn.execute(sa.select(roles.c.name, roles.c.id)).tuples().all())
    perm_ids = dict(conn.execute(sa.select(permissions.c.code, permissions.c.id)).tuples().all())
    have = set(conn.execute(sa.select(role_permissions)).tuples().all())
    links = [
        {"role_id": role_ids[r], "permission_id": perm_ids[p]}
        for r, perms in ROLE_PERMISSIONS.items()
        for p in perms
        if (role_ids[r], perm_ids[p]) not in have
    ]
    if links:
        conn.execute(role_permissions.insert(), links)


def upsert_user(conn: Connection, email: str, display_name: str, role: str) -> int:
    """Insert or update the user with this normalized email, and give it ``role``."""
    email = email.strip().lower()
    now = utcnow()
    user_id = conn.execute(sa.select(users.c.id).where(users.c.email == email)).scalar()
    if user_id is None:
        user_id = conn.execute(
            users.insert()
            .values(
                email=email,
                display_name=display_name,
                is_active=True,
                created_at=now,
                updated_at=now,
            )
            .returning(users.c.id)
        ).scalar_one()
    else:
        conn.execute(
            users.update()
            .where(users.c.id == user_id)
            .values(display_name=display_name, is_active=True, updated_at=now)
        )
    role_id = conn.execute(sa.select(roles.c.id).where(roles.c.name == role)).scalar_one()
    if not conn.execute(
        sa.select(user_roles).where(
            user_roles.c.user_id == user_id, user_roles.c.role_id == role_id
        )
    ).first():
        conn.execute(user_roles.insert().values(user_id=user_id, role_id=role_id))
    return int(user_id)


def _upsert_setting(conn: Connection, key: str, value: Any) -> None:
    now = utcnow()
    if conn.execute(sa.select(tenant_settings.c.key).where(tenant_settings.c.key == key)).first():
        conn.execute(
            tenant_settings.update()
            .where(tenant_settings.c.key == key)
            .values(value=value, updated_at=now)
        )
    else:
        conn.execute(tenant_settings.insert().values(key=key, value=value, updated_at=now))


def seed(engine: Engine, tenant: Tenant, correlation_id: str | None) -> dict[str, int]:
    """Seed a migrated tenant in one transaction; safe to run any number of times."""
    with engine.begin() as conn:
        seed_catalog(conn)
        upsert_user(conn, tenant.admin_email, "Tenant administrator", "admin")
        if "tenant_settings" in tenant.modules:
            now = utcnow()
            for key, value in {
                "identifier": tenant.id,
                "name": tenant.name,
                "valid_until": tenant.valid_until.isoformat() if tenant.valid_until else None,
                "modules": list(tenant.modules),
                "demo_data": tenant.demo_data,
            }.items():
                _upsert_setting(conn, key, value)
            for module in tenant.modules:
                if not conn.execute(
                    sa.select(tenant_modules.c.module).where(tenant_modules.c.module == module)
                ).first():
                    conn.execute(
                        tenant_modules.insert().values(module=module, enabled=True, updated_at=now)
                    )
        if tenant.demo_data:
            for email in DEMO_USERS:
                upsert_user(conn, email, email.split("@")[0], "member")
        if "auditing" in tenant.modules and correlation_id:
            target = f"provisioning:{correlation_id}"
            if not conn.execute(
                sa.select(audit_log.c.id).where(audit_log.c.target == target)
            ).first():
                conn.execute(
                    audit_log.insert().values(
                        at=utcnow(),
                        actor="tenant-pipelines",
                        action="tenant.provisioned",
                        target=target,
                        details={"modules": list(tenant.modules)},
                    )
                )
        return counts(conn)


def counts(conn: Connection) -> dict[str, int]:
    """Row counts of the identity tables (for step metadata and verification)."""
    return {
        t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
        for t in (roles, permissions, role_permissions, users, user_roles)
    }


def role_permission_sets(engine: Engine) -> dict[str, list[str]]:
    """``{role: sorted permission codes}`` as stored in the tenant."""
    query = (
        sa.select(roles.c.name, permissions.c.code)
        .select_from(
            roles.join(role_permissions, role_permissions.c.role_id == roles.c.id).join(
                permissions, permissions.c.id == role_permissions.c.permission_id
            )
        )
        .order_by(roles.c.name, permissions.c.code)
    )
    out: dict[str, list[str]] = {name: [] for name in ROLES}
    with engine.connect() as conn:
        for name, code in conn.execute(query):
            out.setdefault(name, []).append(code)
    return out


def admin_user_id(conn: Connection, tenant: Tenant) -> int | None:
    return conn.execute(sa.select(users.c.id).where(users.c.email == tenant.admin_email)).scalar()


def issue_reset_token(engine: Engine, tenant: Tenant, ttl_s: int) -> str:
    """Revoke the admin's unused reset tokens and store a new one's hash; return the token.

    The token (256 random bits) exists only in the caller's memory from here on.
    """
    token = secrets.token_urlsafe(32)
    now = utcnow()
    with engine.begin() as conn:
        user_id = admin_user_id(conn, tenant)
        if user_id is None:
            raise LookupError(f"tenant '{tenant.id}' has no admin user yet")
        conn.execute(
            user_tokens.update()
            .where(
                user_tokens.c.user_id == user_id,
                user_tokens.c.purpose == RESET,
                user_tokens.c.used_at.is_(None),
                user_tokens.c.revoked_at.is_(None),
            )
            .values(revoked_at=now)
        )
        conn.execute(
            user_tokens.insert().values(
                user_id=user_id,
                purpose=RESET,
                token_hash=token_hash(token),
                created_at=now,
                expires_at=now + dt.timedelta(seconds=ttl_s),
            )
        )
    return token


def valid_reset_tokens(engine: Engine, tenant: Tenant) -> int:
    """How many reset tokens of the tenant admin could still be used."""
    with engine.connect() as conn:
        user_id = admin_user_id(conn, tenant)
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(user_tokens)
                .where(
                    user_tokens.c.user_id == user_id,
                    user_tokens.c.purpose == RESET,
                    user_tokens.c.used_at.is_(None),
                    user_tokens.c.revoked_at.is_(None),
                    user_tokens.c.expires_at > utcnow(),
                )
            ).scalar_one()
        )


def reset_password(engine: Engine, token: str, new_password: str) -> str | None:
    """Use a reset token once: set the password and return the user's email, else None."""
    digest = token_hash(token)
    now = utcnow()
    with engine.begin() as conn:
        row = (
            conn.execute(
                sa.select(user_tokens).where(
                    user_tokens.c.token_hash == digest, user_tokens.c.purpose == RESET
                )
            )
            .mappings()
            .first()
        )
        if row is None or not hmac.compare_digest(row["token_hash"], digest):
            return None
        expires = row["expires_at"]
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=dt.UTC)
        if row["used_at"] is not None or row["revoked_at"] is not None or expires <= now:
            return None
        # The conditional update makes two concurrent uses of one token yield one winner.
        used = conn.execute(
            user_tokens.update()
            .where(user_tokens.c.id == row["id"], user_tokens.c.used_at.is_(None))
            .values(used_at=now)
        ).rowcount
        if used != 1:
            return None
        conn.execute(
            users.update()
            .where(users.c.id == row["user_id"])
            .values(password_hash=hash_password(new_password), updated_at=now)
        )
        return str(
            conn.execute(sa.select(users.c.email).where(users.c.id == row["user_id"])).scalar_one()
        )
