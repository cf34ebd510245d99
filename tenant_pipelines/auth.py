"""Who may call what: platform admins, API tokens, browser sessions, CSRF, login throttling,
and the tenant admin's own account (reset password, login, ``me``).

Two kinds of caller reach the service:

- **Platform admins** manage tenants and use the Dagster UI. A person logs in on
  ``/auth/login`` and gets a signed ``HttpOnly`` ``SameSite=Strict`` session cookie; automation
  sends ``Authorization: Bearer tpa_...`` with a token made by ``tenantctl admin token create``.
- **Tenant users** (the tenant admin, after provisioning) only reach ``/api/t/{tenant}/...``,
  with a ``tpt_...`` session token (Bearer or a cookie scoped to that tenant's path).

Every secret the server hands out (API tokens, session ids) is 256 random bits stored only as
its SHA-256; passwords are scrypt hashes (:mod:`identity`). :class:`AuthMiddleware` is pure
ASGI so it sees HTTP and WebSocket scopes alike, including the mounted Dagster UI.
"""

import argparse
import asyncio
import datetime as dt
import getpass
import hmac
import html
import json
import re
import secrets
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import graphql
import sqlalchemy as sa
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request, cookie_parser
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import identity, registry
from .providers import tenant_engine
from .registry import (
    EMAIL_PATTERN,
    ID_PATTERN,
    ConflictError,
    NotFoundError,
    RegistryError,
    Tenant,
    ValidationError,
    utcnow,
)
from .settings import Settings
from .telemetry import get_logger, register_secret, scrub

ADMIN_COOKIE = "tp_admin"
TENANT_COOKIE = "tp_tenant"
API_TOKEN_PREFIX = "tpa_"
TENANT_TOKEN_PREFIX = "tpt_"
ADMIN_SESSION_TTL = dt.timedelta(hours=12)
TENANT_SESSION_TTL = dt.timedelta(hours=12)
MIN_PASSWORD, MAX_PASSWORD = 12, 1024
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Login throttling: a sliding window per account and per client address.
LOGIN_WINDOW = dt.timedelta(minutes=15)
MAX_FAILURES_PER_SUBJECT = 5
MAX_FAILURES_PER_REMOTE = 50
# Reset tokens carry 256 random bits: this only stops a client hammering the endpoint.
MAX_RESET_FAILURES = 20
FAILURE_DELAY_S, MAX_FAILURE_DELAY_S = 0.25, 2.0
MAX_FORM_BODY = 8 * 1024
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_PATHS = frozenset({"/health/live", "/health/ready", "/auth/login"})
TENANT_API_PREFIX = "/api/t/"
DEFAULT_NEXT = "/dagster/"
# Refresh api_tokens.last_used_at at most this often: one write per request would be wasteful.
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)
# The middleware reuses a Bearer token's principal this long without reading the database.
# A revocation in this process (revoke_api_token, revoke_session, a password change) empties
# the cache at once; one made by another process (``tenantctl admin token revoke``, another
# service worker) takes effect here within this many seconds.
PRINCIPAL_TTL_S = 5.0
# A token in use is read again in the background this long before its entry expires, so
# that busy clients never all miss at once (50 of them used to queue for the database
# together every PRINCIPAL_TTL_S). The window above stays as it is.
REFRESH_AHEAD_S = 1.0
PRINCIPAL_CACHE_SIZE = 10_000

metadata = sa.MetaData()

platform_admins = sa.Table(
    "platform_admins",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("email", sa.String(254), nullable=False),
    sa.Column("password_hash", sa.String(255), nullable=False),
    sa.Column("is_active", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_login_at", sa.DateTime(timezone=True)),
)
api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("created_by", sa.String(120), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True)),
    sa.Column("last_used_at", sa.DateTime(timezone=True)),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
)
auth_sessions = sa.Table(
    "auth_sessions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("session_hash", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("subject", sa.String(254), nullable=False),
    sa.Column("tenant_id", sa.String(40)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
)
login_attempts = sa.Table(
    "login_attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("scope", sa.String(80), nullable=False),
    sa.Column("subject", sa.String(254), nullable=False),
    sa.Column("remote", sa.String(64), nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
)


# --- errors ----------------------------------------------------------------------------------


class ApiError(Exception):
    """An error meant for the HTTP caller, rendered as the one documented error shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = dict(headers or {})


class AuthError(RegistryError):
    """Wrong or missing credentials (the CLI prints it; the API answers 401)."""

    code = "unauthenticated"


class RateLimited(RegistryError):
    """Too many failed logins; ``retry_after`` seconds until the next attempt may succeed."""

    code = "too_many_attempts"

    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(int(retry_after) + 1, 1)
        super().__init__(f"too many failed attempts; retry in {self.retry_after} s")


def error_response(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The one error shape: ``{"error": {"code", "message", "details"}}``."""
    return JSONResponse(
        {"error": {"code": code, "message": scrub(message), "details": details or {}}},
        status_code=status,
        headers=dict(headers or {}),
    )


def unauthenticated(message: str = "authentication required") -> ApiError:
    """The 401 for missing or unusable credentials."""
    return ApiError(401, "unauthenticated", message, headers={"WWW-Authenticate": "Bearer"})


# --- small helpers ---------------------------------------------------------------------------


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite hands back naive datetimes; everything we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def _hash(secret: str) -> str:
    return identity.token_hash(secret)


def normalize_email(email: str) -> str:
    """Emails are compared lower-cased and stripped, as tenant users are stored."""
    return email.strip().lower()


def check_password_policy(password: Any, field: str = "password") -> str:
    """Return ``password`` if acceptable, else raise :class:`ValidationError` naming ``field``."""
    if not isinstance(password, str):
        raise ValidationError({field: "is required and must be a string"})
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD or not password.strip():
        raise ValidationError({field: f"must be {MIN_PASSWORD}-{MAX_PASSWORD} characters"})
    if "\x00" in password:
        raise ValidationError({field: "must not contain NUL characters"})
    return password


def _serializer(settings: Settings, purpose: str) -> URLSafeTimedSerializer:
    if not settings.secret_key:
        raise RuntimeError("settings.secret_key is empty; call Settings.ensure_secret_key()")
    return URLSafeTimedSerializer(settings.secret_key, salt=f"tenant-pipelines.{purpose}")


def sign_session(settings: Settings, purpose: str, raw: str) -> str:
    """The cookie value for session id ``raw``: signed with the service's secret key."""
    return str(_serializer(settings, purpose).dumps(raw))


def unsign_session(
    settings: Settings, purpose: str, value: str, max_age: dt.timedelta
) -> str | None:
    """The session id inside a cookie value, or None when forged, tampered or too old."""
    try:
        raw = _serializer(settings, purpose).loads(value, max_age=int(max_age.total_seconds()))
    except BadSignature:
        return None
    return raw if isinstance(raw, str) else None


# --- platform admins -------------------------------------------------------------------------


def create_admin(settings: Settings, email: str, password: str) -> None:
    """Add a platform admin with a scrypt-hashed password; ConflictError if one exists."""
    email = normalize_email(email)
    if len(email) > 254 or not EMAIL_PATTERN.match(email):
        raise ValidationError({"email": "must be an email address"})
    check_password_policy(password)
    now = utcnow()
    with registry.engine(settings).begin() as conn:
        if conn.execute(
            sa.select(platform_admins.c.id).where(platform_admins.c.email == email)
        ).first():
            raise ConflictError(f"platform admin '{email}' already exists")
        conn.execute(
            platform_admins.insert().values(
                email=email,
                password_hash=identity.hash_password(password),
                is_active=True,
                created_at=now,
                updated_at=now,
            )
        )
    get_logger().info("platform admin created", extra={"fields": {"admin": email}})


def set_admin_password(settings: Settings, email: str, password: str) -> None:
    """Replace a platform admin's password and end their browser sessions."""
    email = normalize_email(email)
    check_password_policy(password)
    now = utcnow()
    with registry.engine(settings).begin() as conn:
        updated = conn.execute(
            platform_admins.update()
            .where(platform_admins.c.email == email)
            .values(password_hash=identity.hash_password(password), updated_at=now)
        ).rowcount
        if updated != 1:
            raise NotFoundError(f"no platform admin '{email}'")
        _revoke_sessions(conn, "platform", email, None, now)
    # After the commit: a lookup racing the revocation must not cache the old answer.
    principals.clear()


def _revoke_sessions(
    conn: Connection, kind: str, subject: str, tenant_id: str | None, now: dt.datetime
) -> None:
    conn.execute(
        auth_sessions.update()
        .where(
            auth_sessions.c.kind == kind,
            auth_sessions.c.subject == subject,
            auth_sessions.c.tenant_id.is_(None)
            if tenant_id is None
            else auth_sessions.c.tenant_id == tenant_id,
            auth_sessions.c.revoked_at.is_(None),
        )
        .values(revoked_at=now)
    )


def list_admins(settings: Settings) -> list[dict[str, Any]]:
    """Platform admins without their password hashes."""
    with registry.engine(settings).connect() as conn:
        rows = conn.execute(
            sa.select(
                platform_admins.c.email,
                platform_admins.c.is_active,
                platform_admins.c.created_at,
                platform_admins.c.last_login_at,
            ).order_by(platform_admins.c.email)
        ).mappings()
        return [_jsonable(dict(r)) for r in rows]


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (_aware(v).isoformat() if isinstance(v, dt.datetime) else v)  # type: ignore[union-attr]
        for k, v in row.items()
    }


# --- login throttling ------------------------------------------------------------------------


def check_throttle(
    settings: Settings,
    scope: str,
    subject: str,
    remote: str,
    max_failures: int = MAX_FAILURES_PER_SUBJECT,
) -> int:
    """Raise :class:`RateLimited` when the account or the address failed too often recently.

    Returns the account's recent failure count, which the caller uses to slow the answer.
    Failures before the account's last successful login do not count.
    """
    now = utcnow()
    since = now - LOGIN_WINDOW
    a = login_attempts
    with registry.engine(settings).connect() as conn:
        last_ok = _aware(
            conn.execute(
                sa.select(sa.func.max(a.c.at)).where(
                    a.c.scope == scope, a.c.subject == subject, a.c.ok.is_(True), a.c.at > since
                )
            ).scalar()
        )
        start = max(since, last_ok) if last_ok else since
        count, oldest = conn.execute(
            sa.select(sa.func.count(), sa.func.min(a.c.at)).where(
                a.c.scope == scope, a.c.subject == subject, a.c.ok.is_(False), a.c.at > start
            )
        ).one()
        by_remote, oldest_remote = conn.execute(
            sa.select(sa.func.count(), sa.func.min(a.c.at)).where(
                a.c.scope == scope, a.c.remote == remote, a.c.ok.is_(False), a.c.at > since
            )
        ).one()
    if count >= max_failures:
        raise RateLimited(((_aware(oldest) or now) + LOGIN_WINDOW - now).total_seconds())
    if by_remote >= MAX_FAILURES_PER_REMOTE:
        raise RateLimited(((_aware(oldest_remote) or now) + LOGIN_WINDOW - now).total_seconds())
    return int(count)


def record_attempt(settings: Settings, scope: str, subject: str, remote: str, ok: bool) -> None:
    """Remember one login attempt (never the password), and forget day-old ones."""
    now = utcnow()
    with registry.engine(settings).begin() as conn:
        conn.execute(
            login_attempts.insert().values(
                scope=scope[:80], subject=subject[:254], remote=remote[:64], ok=ok, at=now
            )
        )
        if secrets.randbelow(50) == 0:
            conn.execute(
                login_attempts.delete().where(login_attempts.c.at < now - dt.timedelta(days=1))
            )


def failure_delay(failures: int) -> float:
    """Seconds to hold a failed login's answer: grows with recent failures."""
    return min(FAILURE_DELAY_S * (failures + 1), MAX_FAILURE_DELAY_S)


def login_admin(settings: Settings, email: str, password: str, remote: str) -> str:
    """Check a platform admin's password and open a browser session; return its raw id.

    Raises :class:`RateLimited` when throttled and :class:`AuthError` on a wrong email or
    password (the same error for both, after the same scrypt work).
    """
    email = normalize_email(email)[:254]
    check_throttle(settings, "platform", email, remote)
    with registry.engine(settings).connect() as conn:
        row = conn.execute(
            sa.select(platform_admins.c.password_hash, platform_admins.c.is_active).where(
                platform_admins.c.email == email
            )
        ).first()
    encoded = row.password_hash if row is not None and row.is_active else None
    ok = identity.verify_password(password, encoded)
    record_attempt(settings, "platform", email, remote, ok)
    if not ok:
        raise AuthError("wrong email or password")
    now = utcnow()
    with registry.engine(settings).begin() as conn:
        conn.execute(
            platform_admins.update()
            .where(platform_admins.c.email == email)
            .values(last_login_at=now)
        )
    get_logger().info("platform admin logged in", extra={"fields": {"admin": email}})
    return create_session(settings, "platform", email, None, ADMIN_SESSION_TTL)


# --- sessions --------------------------------------------------------------------------------


def create_session(
    settings: Settings, kind: str, subject: str, tenant_id: str | None, ttl: dt.timedelta
) -> str:
    """Store a new session's hash; return the raw session token (tenant ones carry a prefix)."""
    raw = (TENANT_TOKEN_PREFIX if kind == "tenant" else "") + secrets.token_urlsafe(32)
    now = utcnow()
    with registry.engine(settings).begin() as conn:
        conn.execute(
            auth_sessions.insert().values(
                session_hash=_hash(raw),
                kind=kind,
                subject=subject,
                tenant_id=tenant_id,
                created_at=now,
                expires_at=now + ttl,
            )
        )
    return raw


def session_expiry(settings: Settings, raw: str) -> dt.datetime | None:
    """When a session ends (None if unknown)."""
    with registry.engine(settings).connect() as conn:
        value = conn.execute(
            sa.select(auth_sessions.c.expires_at).where(auth_sessions.c.session_hash == _hash(raw))
        ).scalar()
    return _aware(value)


def revoke_session(settings: Settings, raw: str) -> None:
    """End one session (logout)."""
    with registry.engine(settings).begin() as conn:
        conn.execute(
            auth_sessions.update()
            .where(auth_sessions.c.session_hash == _hash(raw), auth_sessions.c.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
    principals.clear()


def _live_session(conn: Connection, raw: str, kind: str) -> sa.RowMapping | None:
    digest = _hash(raw)
    row = (
        conn.execute(
            sa.select(auth_sessions).where(
                auth_sessions.c.session_hash == digest, auth_sessions.c.kind == kind
            )
        )
        .mappings()
        .first()
    )
    if row is None or not hmac.compare_digest(row["session_hash"], digest):
        return None
    expires = _aware(row["expires_at"])
    if row["revoked_at"] is not None or expires is None or expires <= utcnow():
        return None
    return row


# --- API tokens ------------------------------------------------------------------------------


def create_api_token(
    settings: Settings, name: str, created_by: str, expires_at: dt.datetime | None = None
) -> str:
    """Store a new API token's hash under ``name``; return the token (shown once)."""
    if not isinstance(name, str) or not TOKEN_NAME.fullmatch(name):
        raise ValidationError({"name": "must be 1-64 letters, digits, '.', '_' or '-'"})
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    with registry.engine(settings).begin() as conn:
        if conn.execute(
            sa.select(api_tokens.c.id).where(
                api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None)
            )
        ).first():
            raise ConflictError(f"an API token named '{name}' exists; revoke it first")
        conn.execute(
            api_tokens.insert().values(
                name=name,
                token_hash=_hash(token),
                created_by=created_by[:120],
                created_at=utcnow(),
                expires_at=expires_at,
            )
        )
    register_secret(token)
    get_logger().info("api token created", extra={"fields": {"token_name": name}})
    return token


def list_api_tokens(settings: Settings) -> list[dict[str, Any]]:
    """Every API token's name and dates; never the token or its hash."""
    t = api_tokens
    with registry.engine(settings).connect() as conn:
        rows = conn.execute(
            sa.select(
                t.c.name,
                t.c.created_by,
                t.c.created_at,
                t.c.expires_at,
                t.c.last_used_at,
                t.c.revoked_at,
            ).order_by(t.c.name, t.c.id)
        ).mappings()
        return [_jsonable(dict(r)) for r in rows]


def revoke_api_token(settings: Settings, name: str) -> int:
    """Revoke the live token called ``name``; NotFoundError when there is none."""
    with registry.engine(settings).begin() as conn:
        count = conn.execute(
            api_tokens.update()
            .where(api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        ).rowcount
    principals.clear()
    if count == 0:
        raise NotFoundError(f"no live API token named '{name}'")
    get_logger().info("api token revoked", extra={"fields": {"token_name": name}})
    return int(count)


# --- principals ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a platform admin (``admin``), an API token (``token``) or a
    tenant user (``tenant``); ``via`` says whether it came from a cookie or a Bearer token."""

    kind: str
    name: str
    tenant_id: str | None = None
    via: str = "bearer"

    @property
    def is_platform(self) -> bool:
        """Platform admins and API tokens; never tenant users."""
        return self.kind in ("admin", "token")

    @property
    def actor(self) -> str:
        """How audit rows and run tags name this caller (never a secret)."""
        if self.kind == "tenant":
            return f"tenant:{self.tenant_id}:{self.name}"
        return f"{self.kind}:{self.name}"

    def to_json(self) -> dict[str, Any]:
        """What ``GET /api/me`` answers."""
        return {
            "kind": self.kind,
            "name": self.name,
            "tenant_id": self.tenant_id,
            "via": self.via,
            "actor": self.actor,
        }


def principal_from_bearer(settings: Settings, token: str) -> Principal | None:
    """The caller a Bearer token stands for: a live API token or a live tenant session."""
    return _bearer_lookup(settings, token)[0]


def _bearer_lookup(settings: Settings, token: str) -> tuple[Principal | None, dt.datetime | None]:
    """:func:`principal_from_bearer` plus when the credential expires (None: never)."""
    if len(token) > 200:
        return None, None
    if token.startswith(API_TOKEN_PREFIX):
        digest = _hash(token)
        now = utcnow()
        with registry.engine(settings).begin() as conn:
            row = (
                conn.execute(sa.select(api_tokens).where(api_tokens.c.token_hash == digest))
                .mappings()
                .first()
            )
            if row is None or not hmac.compare_digest(row["token_hash"], digest):
                return None, None
            expires = _aware(row["expires_at"])
            if row["revoked_at"] is not None or (expires is not None and expires <= now):
                return None, None
            last = _aware(row["last_used_at"])
            if last is None or now - last > LAST_USED_RESOLUTION:
                conn.execute(
                    api_tokens.update().where(api_tokens.c.id == row["id"]).values(last_used_at=now)
                )
            return Principal("token", str(row["name"])), expires
    if token.startswith(TENANT_TOKEN_PREFIX):
        with registry.engine(settings).connect() as conn:
            session = _live_session(conn, token, "tenant")
        if session is None:
            return None, None
        principal = Principal("tenant", str(session["subject"]), str(session["tenant_id"]))
        return principal, _aware(session["expires_at"])
    return None, None


class PrincipalCache:
    """Bearer token -> principal for :data:`PRINCIPAL_TTL_S` seconds, in this process.

    Keyed by the token's SHA-256 (as stored) and the control-plane URL. Only live
    credentials are kept, never past their own expiry. :meth:`clear` bumps a generation, so a
    lookup that started before a revocation cannot put its stale answer back afterwards.
    :meth:`claim_refresh` hands one caller per entry the job of reading a token in use again
    before its entry expires.
    """

    def __init__(self, ttl_s: float = PRINCIPAL_TTL_S, size: int = PRINCIPAL_CACHE_SIZE) -> None:
        self.ttl_s, self.size = ttl_s, size
        self.generation = 0
        # key -> (principal, time.monotonic() it expires, a refresh was claimed)
        self._entries: OrderedDict[tuple[str, str], tuple[Principal, float, bool]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(settings: Settings, token: str) -> tuple[str, str]:
        return settings.control_url, _hash(token)

    def get(self, settings: Settings, token: str) -> Principal | None:
        """The cached principal of ``token``, or None when absent or stale."""
        key = self._key(settings, token)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[1] <= time.monotonic():
                del self._entries[key]
                return None
            return entry[0]

    def put(
        self,
        settings: Settings,
        token: str,
        principal: Principal,
        expires_at: dt.datetime | None,
        generation: int,
    ) -> None:
        """Remember a principal read at ``generation`` (dropped if a revocation came since)."""
        until = time.monotonic() + self.ttl_s
        if expires_at is not None:
            until = min(until, time.monotonic() + (expires_at - utcnow()).total_seconds())
        key = self._key(settings, token)
        with self._lock:
            if generation != self.generation:
                return
            self._entries[key] = (principal, until, False)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def claim_refresh(self, settings: Settings, token: str) -> bool:
        """True for the first caller once ``token``'s entry is within :data:`REFRESH_AHEAD_S`
        of expiring; that caller reads the token again (and :meth:`put` or :meth:`forget`)."""
        key = self._key(settings, token)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[2] or entry[1] - time.monotonic() > REFRESH_AHEAD_S:
                return False
            self._entries[key] = (entry[0], entry[1], True)
            return True

    def forget(self, settings: Settings, token: str) -> None:
        """Drop ``token``'s entry (a refresh found it no longer valid)."""
        with self._lock:
            self._entries.pop(self._key(settings, token), None)

    def clear(self) -> None:
        """Forget every entry: called on every revocation in this process."""
        with self._lock:
            self.generation += 1
            self._entries.clear()


principals = PrincipalCache()


def principal_from_admin_cookie(settings: Settings, value: str) -> Principal | None:
    """The platform admin behind a session cookie, if the session and the admin are live."""
    raw = unsign_session(settings, "admin-session", value, ADMIN_SESSION_TTL)
    if raw is None:
        return None
    with registry.engine(settings).connect() as conn:
        session = _live_session(conn, raw, "platform")
        if session is None:
            return None
        active = conn.execute(
            sa.select(platform_admins.c.is_active).where(
                platform_admins.c.email == session["subject"]
            )
        ).scalar()
    return Principal("admin", str(session["subject"]), via="cookie") if active else None


def principal_from_tenant_cookie(settings: Settings, value: str) -> Principal | None:
    """The tenant user behind a tenant session cookie."""
    raw = unsign_session(settings, "tenant-session", value, TENANT_SESSION_TTL)
    if raw is None:
        return None
    principal = principal_from_bearer(settings, raw)
    return (
        Principal(principal.kind, principal.name, principal.tenant_id, "cookie")
        if (principal is not None and principal.kind == "tenant")
        else None
    )


def bearer_of(headers: Headers) -> str | None:
    """The token of an ``Authorization: Bearer`` header ("" when the header is malformed)."""
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def cookies_of(headers: Headers) -> dict[str, str]:
    """Parse the Cookie header leniently (Starlette's own parser, as ``Request.cookies``)."""
    return cookie_parser(headers.get("cookie", ""))


# --- CSRF ------------------------------------------------------------------------------------


def allowed_origins(scope: Scope, headers: Headers, settings: Settings) -> set[str]:
    """Origins counted as this service: the one the request was addressed to, and
    ``TP_PUBLIC_URL``'s (a TLS-terminating proxy makes those differ)."""
    out: set[str] = set()
    scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme"))
    host = headers.get("host")
    if host:
        out.add(f"{scheme}://{host}".lower())
    public = urlsplit(settings.public_url)
    if public.scheme and public.netloc:
        out.add(f"{public.scheme}://{public.netloc}".lower())
    return out


def csrf_ok(scope: Scope, headers: Headers, settings: Settings, cookie_auth: bool) -> bool:
    """Whether an unsafe request (or a WebSocket handshake) may come from where it comes from.

    Browsers send ``Origin`` on every cross-origin request, every POST and every WebSocket
    handshake, and ``Sec-Fetch-Site`` on all requests, so: a present ``Origin`` must be ours;
    otherwise a present ``Sec-Fetch-Site`` must say same-origin (or none: typed by the user);
    a request with neither header is a non-browser client, refused only if it relies on a
    cookie. This is what protects the Dagster UI's GraphQL mutations, which we cannot change.
    """
    if scope["type"] == "http" and scope["method"] in SAFE_METHODS:
        return True
    origin = headers.get("origin")
    if origin is not None:
        return origin.lower() in allowed_origins(scope, headers, settings)
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    return not cookie_auth


def is_graphql_get_mutation(scope: Scope, graphql_path: str) -> bool:
    """A GraphQL mutation sent with GET (Dagster would run it): refused outright, because
    safe methods skip the CSRF check and SameSite is the only other line of defence."""
    if scope["type"] != "http" or scope["method"] not in SAFE_METHODS:
        return False
    if scope["path"].rstrip("/") != graphql_path:
        return False
    query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("query", [""])[0]
    try:
        document = graphql.parse(query)
    except graphql.GraphQLError:
        return False
    return any(
        isinstance(d, graphql.OperationDefinitionNode)
        and d.operation != graphql.OperationType.QUERY
        for d in document.definitions
    )


# --- the middleware --------------------------------------------------------------------------


SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
)


def _retrieved(task: asyncio.Task[Any]) -> None:
    # Its exception reaches every caller that still waits; none left is no reason to warn.
    if not task.cancelled():
        task.exception()


class AuthMiddleware:
    """Pure ASGI authentication in front of everything (HTTP and WebSocket).

    - ``/health/live``, ``/health/ready`` and the login page are public;
    - ``/api/t/{tenant}/...`` passes through: those handlers check tenant sessions themselves;
    - everything else, the API, ``/metrics``, the Dagster UI, its GraphQL endpoint and its
      WebSocket, needs a platform admin (session cookie or ``tpa_`` Bearer token).

    Unsafe methods and WebSocket handshakes are checked for CSRF (:func:`csrf_ok`) first, on
    every path. The principal is put in ``scope["tp.principal"]`` and ``scope["tp.actor"]``.
    """

    def __init__(self, app: ASGIApp, settings: Settings, graphql_path: str) -> None:
        self.app, self.settings, self.graphql_path = app, settings, graphql_path
        # One database lookup per Bearer token at a time; concurrent callers share it.
        self._lookups: dict[tuple[int, str], asyncio.Task[Principal | None]] = {}
        self._refreshes: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http":
            send = _with_security_headers(send)
        headers = Headers(scope=scope)
        bearer = bearer_of(headers)
        cookies = cookies_of(headers)
        cookie_auth = bearer is None and bool({ADMIN_COOKIE, TENANT_COOKIE} & set(cookies))
        if not csrf_ok(scope, headers, self.settings, cookie_auth):
            await self._deny(
                scope,
                receive,
                send,
                403,
                "csrf_failed",
                "cross-site request refused (Origin / Sec-Fetch-Site check)",
            )
            return
        path = scope["path"]
        if path in PUBLIC_PATHS or path.startswith(TENANT_API_PREFIX):
            await self.app(scope, receive, send)
            return
        try:
            # A cached Bearer principal skips the thread hop and the database read.
            principal = principals.get(self.settings, bearer) if bearer else None
            if principal is None:
                principal = await self._lookup(bearer, cookies)
            elif bearer and principals.claim_refresh(self.settings, bearer):
                task = asyncio.create_task(self._refresh(bearer))
                self._refreshes.add(task)
                task.add_done_callback(self._refreshes.discard)
        except Exception:  # a broken auth store must neither leak details nor let anyone in
            get_logger().exception("authentication store unavailable")
            await self._deny(
                scope,
                receive,
                send,
                503,
                "unavailable",
                "authentication is temporarily unavailable",
            )
            return
        if principal is None:
            if self._wants_login_page(scope, headers):
                target = path + (
                    ("?" + scope["query_string"].decode("latin-1"))
                    if scope.get("query_string")
                    else ""
                )
                response = RedirectResponse(f"/auth/login?next={quote(target, safe='')}", 303)
                await response(scope, receive, send)
                return
            message = (
                "invalid or expired credentials"
                if bearer is not None
                else ("authentication required")
            )
            await self._deny(
                scope,
                receive,
                send,
                401,
                "unauthenticated",
                message,
                {"WWW-Authenticate": "Bearer"},
            )
            return
        if not principal.is_platform:
            await self._deny(
                scope, receive, send, 403, "forbidden", "only platform admins may use this endpoint"
            )
            return
        if is_graphql_get_mutation(scope, self.graphql_path):
            await self._deny(
                scope,
                receive,
                send,
                405,
                "method_not_allowed",
                "GraphQL mutations must be sent with POST",
            )
            return
        scope["tp.principal"] = principal
        scope["tp.actor"] = principal.actor
        await self.app(scope, receive, send)

    async def _lookup(self, bearer: str | None, cookies: Mapping[str, str]) -> Principal | None:
        if not bearer:
            return await run_in_threadpool(self._authenticate, bearer, cookies)
        loop = asyncio.get_running_loop()
        key = (id(loop), identity.token_hash(bearer))
        task = self._lookups.get(key)
        if task is None:
            # A task of its own, awaited through shield(): a caller that goes away (a client
            # disconnecting) does not cancel the lookup the others wait for.
            task = loop.create_task(run_in_threadpool(self._authenticate, bearer, cookies))
            self._lookups[key] = task
            task.add_done_callback(lambda _: self._lookups.pop(key, None))
            task.add_done_callback(_retrieved)
        return await asyncio.shield(task)

    async def _refresh(self, bearer: str) -> None:
        try:
            principal = await run_in_threadpool(self._authenticate, bearer, {})
        except Exception:  # the entry expires on time; the next miss reports the failure
            get_logger().warning("background token refresh failed")
            return
        if principal is None:
            principals.forget(self.settings, bearer)

    def _authenticate(self, bearer: str | None, cookies: Mapping[str, str]) -> Principal | None:
        if bearer is not None:
            # An explicit Bearer wins: a bad one is a 401 even next to a good cookie.
            if not bearer:
                return None
            generation = principals.generation
            principal, expires = _bearer_lookup(self.settings, bearer)
            if principal is not None:
                principals.put(self.settings, bearer, principal, expires, generation)
            return principal
        value = cookies.get(ADMIN_COOKIE)
        return principal_from_admin_cookie(self.settings, value) if value else None

    @staticmethod
    def _wants_login_page(scope: Scope, headers: Headers) -> bool:
        return (
            scope["type"] == "http"
            and scope["method"] in ("GET", "HEAD")
            and not scope["path"].startswith("/api/")
            and "text/html" in headers.get("accept", "")
        )

    @staticmethod
    async def _deny(
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if scope["type"] == "websocket":
            # Closing before accepting makes the server answer the handshake with HTTP 403.
            await send({"type": "websocket.close", "code": 1008})
            return
        await error_response(status, code, message, headers=headers)(scope, receive, send)


def _with_security_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            for key, value in SECURITY_HEADERS:
                if key.decode() not in headers:
                    headers.append(key.decode(), value.decode())
        await send(message)

    return wrapped


def remote_of(request: Request) -> str:
    """The client address (login throttling key)."""
    return request.client.host if request.client else "unknown"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes without buffering them."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise ApiError(400, "bad_request", "Content-Length is not a number") from None
        if too_big:
            raise ApiError(413, "too_large", f"request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# --- the login page --------------------------------------------------------------------------

_LOGIN_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in - tenant-pipelines</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font-family:system-ui,sans-serif;background:#f4f5f7;display:flex;justify-content:center;
padding-top:10vh}} form{{background:#fff;padding:2rem;border-radius:8px;width:20rem;
box-shadow:0 1px 4px #0002}} label{{display:block;margin-top:1rem}} input{{width:100%;
padding:.5rem;box-sizing:border-box}} button{{margin-top:1.5rem;width:100%;padding:.6rem}}
.error{{color:#b00020}}</style></head>
<body><form method="post" action="/auth/login" id="login">
<h1>tenant-pipelines</h1><p>Platform administrators only.</p>{error}
<input type="hidden" name="next" value="{next}">
<label>Email <input name="email" type="email" autocomplete="username" required autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password"
required></label>
<button type="submit">Sign in</button></form></body></html>
"""
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'",
}


def safe_next(value: Any) -> str:
    """A local path to go to after login; anything else (other hosts, schemes) is dropped."""
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or value.startswith("//")
        or "\\" in value
        or any(ord(c) < 32 for c in value)
        or len(value) > 2000
    ):
        return DEFAULT_NEXT
    return value


def login_page(next_url: str, error: str | None = None, status: int = 200) -> HTMLResponse:
    """The sign-in form (no scripts; the form posts back to ``/auth/login``)."""
    block = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    body = _LOGIN_HTML.format(error=block, next=html.escape(safe_next(next_url), quote=True))
    return HTMLResponse(body, status_code=status, headers=_PAGE_HEADERS)


def session_cookie_kwargs(settings: Settings, path: str, max_age: dt.timedelta) -> dict[str, Any]:
    """The cookie attributes every session cookie gets."""
    return {
        "max_age": int(max_age.total_seconds()),
        "path": path,
        "httponly": True,
        "samesite": "strict",
        "secure": settings.public_url.startswith("https://"),
    }


def login_routes(settings: Settings) -> list[Route]:
    """``GET/POST /auth/login`` (public) and ``POST /auth/logout`` (platform admin)."""

    async def show(request: Request) -> Response:
        return login_page(request.query_params.get("next", DEFAULT_NEXT))

    async def submit(request: Request) -> Response:
        is_json = "application/json" in request.headers.get("content-type", "")
        try:
            raw = await read_body(request, MAX_FORM_BODY)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)
        if is_json:
            try:
                data = json.loads(raw or b"{}")
            except (ValueError, UnicodeDecodeError):
                return error_response(400, "bad_json", "request body is not valid JSON")
            if not isinstance(data, dict):
                return error_response(400, "bad_json", "request body must be a JSON object")
        else:
            data = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
        email, password = data.get("email"), data.get("password")
        next_url = safe_next(data.get("next", DEFAULT_NEXT))
        if not isinstance(email, str) or not isinstance(password, str) or not email:
            if is_json:
                return error_response(
                    422,
                    "invalid",
                    "email and password are required",
                    {"email": "required string", "password": "required string"},
                )
            return login_page(next_url, "Email and password are required.", 422)
        remote = remote_of(request)
        try:
            raw_session = await run_in_threadpool(
                login_admin, settings, email, password[:MAX_PASSWORD], remote
            )
        except RateLimited as exc:
            headers = {"Retry-After": str(exc.retry_after)}
            if is_json:
                return error_response(429, exc.code, str(exc), headers=headers)
            page = login_page(next_url, "Too many failed attempts. Try again later.", 429)
            page.headers.update(headers)
            return page
        except AuthError:
            failures = await run_in_threadpool(_recent_failures, settings, email, remote)
            await asyncio.sleep(failure_delay(failures))
            if is_json:
                return error_response(401, "invalid_credentials", "wrong email or password")
            return login_page(next_url, "Wrong email or password.", 401)
        response: Response
        if is_json:
            response = JSONResponse(
                {"admin": {"email": normalize_email(email)}}, headers={"Cache-Control": "no-store"}
            )
        else:
            response = RedirectResponse(next_url, status_code=303)
        response.set_cookie(
            ADMIN_COOKIE,
            sign_session(settings, "admin-session", raw_session),
            **session_cookie_kwargs(settings, "/", ADMIN_SESSION_TTL),
        )
        return response

    async def logout(request: Request) -> Response:
        value = request.cookies.get(ADMIN_COOKIE)
        raw = unsign_session(settings, "admin-session", value, ADMIN_SESSION_TTL) if value else None
        if raw:
            await run_in_threadpool(revoke_session, settings, raw)
        response: Response
        if "application/json" in request.headers.get("accept", ""):
            response = JSONResponse({"status": "logged_out"})
        else:
            response = RedirectResponse("/auth/login", status_code=303)
        response.delete_cookie(ADMIN_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    return [
        Route("/auth/login", show, methods=["GET"]),
        Route("/auth/login", submit, methods=["POST"]),
        Route("/auth/logout", logout, methods=["POST"]),
    ]


def _recent_failures(settings: Settings, email: str, remote: str) -> int:
    try:
        return check_throttle(settings, "platform", normalize_email(email)[:254], remote)
    except RateLimited:
        return MAX_FAILURES_PER_SUBJECT


# --- the tenant admin's own account ----------------------------------------------------------


def serving_tenant(settings: Settings, tenant_id: str, *, ready: bool) -> Tenant:
    """The tenant if its users may act now; 404 unknown, 403 deactivated or expired, 409 not
    provisioned yet (``ready``: it must have been active at least once)."""
    if not ID_PATTERN.match(tenant_id):
        raise NotFoundError("no such tenant")
    tenant = registry.get_tenant(settings, tenant_id)
    if not tenant.is_active or tenant.status == "deactivated":
        raise ApiError(403, "tenant_deactivated", f"tenant '{tenant_id}' is deactivated")
    if tenant.is_expired():
        raise ApiError(403, "tenant_expired", f"tenant '{tenant_id}' is past its valid_until")
    if ready and tenant.activated_at is None:
        raise ApiError(409, "tenant_not_ready", f"tenant '{tenant_id}' is not provisioned yet")
    return tenant


def tenant_reset_password(
    settings: Settings, tenant_id: str, token: str, new_password: str, remote: str
) -> str:
    """Use the tenant admin's one-time reset token; return the user's email.

    The token is looked up by its SHA-256 in *this tenant's* database, so another tenant's
    token never matches; it works once and only before it expires. Setting a password ends
    the user's earlier sessions.
    """
    # Throttled per client address: a per-tenant lock would let anyone lock the admin out.
    scope = f"reset:{tenant_id}"
    check_throttle(settings, scope, remote, remote, MAX_RESET_FAILURES)
    tenant = serving_tenant(settings, tenant_id, ready=False)
    email = None
    if tenant.credentials_state != "pending" and len(token) <= 200:
        email = identity.reset_password(tenant_engine(settings, tenant), token, new_password)
    record_attempt(settings, scope, remote, remote, email is not None)
    if email is None:
        raise ApiError(400, "invalid_token", "the reset token is invalid, used or expired")
    now = utcnow()
    with registry.engine(settings).begin() as conn:
        _revoke_sessions(conn, "tenant", email, tenant_id, now)
        registry.record(
            conn,
            tenant_id,
            "admin_password_set",
            f"tenant:{tenant_id}:{email}",
            tenant.correlation_id,
            {"user": email},
        )
    principals.clear()
    return email


def tenant_login(
    settings: Settings, tenant_id: str, email: str, password: str, remote: str
) -> tuple[str, dict[str, Any]]:
    """Check a tenant user's password; return a new session token and the ``me`` answer."""
    tenant = serving_tenant(settings, tenant_id, ready=True)
    email = normalize_email(email)[:254]
    scope = f"tenant:{tenant_id}"
    check_throttle(settings, scope, email, remote)
    with tenant_engine(settings, tenant).connect() as conn:
        row = conn.execute(
            sa.select(identity.users.c.password_hash, identity.users.c.is_active).where(
                identity.users.c.email == email
            )
        ).first()
    encoded = row.password_hash if row is not None and row.is_active else None
    ok = identity.verify_password(password, encoded)
    record_attempt(settings, scope, email, remote, ok)
    if not ok:
        raise AuthError("wrong email or password")
    token = create_session(settings, "tenant", email, tenant_id, TENANT_SESSION_TTL)
    return token, tenant_me(settings, tenant, email)


def tenant_failures(settings: Settings, tenant_id: str, email: str, remote: str) -> int:
    """Recent failed logins of a tenant user (to slow the next answer)."""
    try:
        return check_throttle(settings, f"tenant:{tenant_id}", normalize_email(email)[:254], remote)
    except RateLimited:
        return MAX_FAILURES_PER_SUBJECT


def tenant_me(settings: Settings, tenant: Tenant, email: str) -> dict[str, Any]:
    """The tenant user, their roles and the permissions those roles grant."""
    u, ur, r = identity.users, identity.user_roles, identity.roles
    rp, p = identity.role_permissions, identity.permissions
    with tenant_engine(settings, tenant).connect() as conn:
        user = conn.execute(
            sa.select(u.c.id, u.c.email, u.c.display_name, u.c.is_active).where(u.c.email == email)
        ).first()
        if user is None or not user.is_active:
            raise unauthenticated("the user of this session no longer exists or is inactive")
        role_names = sorted(
            conn.execute(
                sa.select(r.c.name)
                .select_from(ur.join(r, r.c.id == ur.c.role_id))
                .where(ur.c.user_id == user.id)
            ).scalars()
        )
        perms = sorted(
            set(
                conn.execute(
                    sa.select(p.c.code)
                    .select_from(
                        ur.join(rp, rp.c.role_id == ur.c.role_id).join(
                            p, p.c.id == rp.c.permission_id
                        )
                    )
                    .where(ur.c.user_id == user.id)
                ).scalars()
            )
        )
    return {
        "tenant": {"id": tenant.id, "name": tenant.name},
        "user": {"email": user.email, "display_name": user.display_name},
        "roles": role_names,
        "permissions": perms,
    }


def tenant_principal(settings: Settings, request: Request, tenant_id: str) -> Principal:
    """The tenant user calling ``/api/t/{tenant_id}/...``: 401 without a live tenant session,
    403 for a session of another tenant or a platform credential."""
    bearer = bearer_of(request.headers)
    if bearer is not None:
        principal = principal_from_bearer(settings, bearer) if bearer else None
    else:
        value = request.cookies.get(TENANT_COOKIE)
        principal = principal_from_tenant_cookie(settings, value) if value else None
    if principal is None:
        raise unauthenticated("a tenant session is required")
    if principal.kind != "tenant":
        raise ApiError(403, "forbidden", "platform credentials do not act as a tenant user")
    if principal.tenant_id != tenant_id:
        raise ApiError(403, "forbidden", "this session belongs to another tenant")
    return principal


def tenant_session_of(settings: Settings, request: Request) -> str | None:
    """The raw tenant session token a request carries (Bearer first, then the cookie)."""
    bearer = bearer_of(request.headers)
    if bearer:
        return bearer
    value = request.cookies.get(TENANT_COOKIE)
    return unsign_session(settings, "tenant-session", value, TENANT_SESSION_TTL) if value else None


# --- tenantctl admin ... ---------------------------------------------------------------------


def _read_password(confirm: bool) -> str:
    """A password from the terminal (asked twice) or the first line of stdin; never argv."""
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Repeat password: ") != password:
            raise ValidationError({"password": "the two entries differ"})
        return password
    return sys.stdin.readline().rstrip("\r\n")


def _cmd_admin_create(args: argparse.Namespace, settings: Settings) -> int:
    create_admin(settings, args.email, _read_password(confirm=True))
    print(f"platform admin {normalize_email(args.email)} created")
    return 0


def _cmd_admin_password(args: argparse.Namespace, settings: Settings) -> int:
    set_admin_password(settings, args.email, _read_password(confirm=True))
    print(f"password of {normalize_email(args.email)} changed; their sessions were ended")
    return 0


def _cmd_admin_list(args: argparse.Namespace, settings: Settings) -> int:
    admins = list_admins(settings)
    if args.json:
        print(json.dumps(admins, indent=2))
    else:
        for a in admins:
            state = "active" if a["is_active"] else "disabled"
            print(f"{a['email']:<40} {state:<9} last login {a['last_login_at'] or '-'}")
    return 0


def _cmd_token_create(args: argparse.Namespace, settings: Settings) -> int:
    expires = None
    if args.expires_days is not None:
        if args.expires_days < 1:
            raise ValidationError({"expires_days": "must be at least 1"})
        expires = utcnow() + dt.timedelta(days=args.expires_days)
    token = create_api_token(settings, args.name, f"cli:{getpass.getuser()}", expires)
    if args.json:
        print(
            json.dumps(
                {
                    "name": args.name,
                    "token": token,
                    "expires_at": expires.isoformat() if expires else None,
                }
            )
        )
    else:
        print(f"API token '{args.name}' (shown once; only its hash is stored):\n{token}")
    return 0


def _cmd_token_list(args: argparse.Namespace, settings: Settings) -> int:
    tokens = list_api_tokens(settings)
    if args.json:
        print(json.dumps(tokens, indent=2))
        return 0
    for t in tokens:
        state = "revoked" if t["revoked_at"] else "live"
        print(
            f"{t['name']:<24} {state:<8} created {t['created_at']}  expires "
            f"{t['expires_at'] or 'never'}  last used {t['last_used_at'] or '-'}"
        )
    if not tokens:
        print("no API tokens")
    return 0


def _cmd_token_revoke(args: argparse.Namespace, settings: Settings) -> int:
    revoke_api_token(settings, args.name)
    print(f"API token '{args.name}' revoked")
    return 0


def add_cli_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register ``tenantctl admin create|password|list`` and ``admin token create|list|revoke``.

    Passwords are prompted for (or read from stdin) and never accepted as arguments, which
    would leave them in shell history and ``ps`` output.
    """
    admin = sub.add_parser("admin", help="platform admins and API tokens")
    asub = admin.add_subparsers(dest="admin_command", required=True)
    c = asub.add_parser("create", help="create a platform admin (password prompted or on stdin)")
    c.add_argument("email")
    c.set_defaults(fn=_cmd_admin_create)
    pw = asub.add_parser("password", help="set a platform admin's password (prompted or stdin)")
    pw.add_argument("email")
    pw.set_defaults(fn=_cmd_admin_password)
    ls = asub.add_parser("list", help="list platform admins")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=_cmd_admin_list)

    token = asub.add_parser("token", help="API tokens for automation")
    tsub = token.add_subparsers(dest="token_command", required=True)
    tc = tsub.add_parser("create", help="create an API token and print it once")
    tc.add_argument("--name", required=True)
    tc.add_argument("--expires-days", type=int, help="default: never expires")
    tc.add_argument("--json", action="store_true")
    tc.set_defaults(fn=_cmd_token_create)
    tl = tsub.add_parser("list", help="list API tokens (names and dates, never the tokens)")
    tl.add_argument("--json", action="store_true")
    tl.set_defaults(fn=_cmd_token_list)
    tr = tsub.add_parser("revoke", help="revoke an API token by name")
    tr.add_argument("name")
    tr.set_defaults(fn=_cmd_token_revoke)
