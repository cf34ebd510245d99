"""Platform-admin authentication on a real control-plane database (SQLite file and
PostgreSQL), the CSRF and redirect rules, and ``tenantctl admin ...`` as a subprocess."""

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from conftest import REPO, uid
from starlette.datastructures import Headers

from tenant_pipelines import auth, registry
from tenant_pipelines.registry import ConflictError, NotFoundError, ValidationError
from tenant_pipelines.settings import Settings

PASSWORD = "correct horse battery staple"


def admin_row(settings: Settings, email: str) -> Any:
    with registry.engine(settings).connect() as conn:
        return (
            conn.execute(
                sa.select(auth.platform_admins).where(auth.platform_admins.c.email == email)
            )
            .mappings()
            .first()
        )


# --- admins and passwords ----------------------------------------------------------------------


def test_admin_password_is_stored_as_a_salted_scrypt_hash(settings: Settings) -> None:
    a, b = f"{uid('a')}@example.com", f"{uid('b')}@example.com"
    auth.create_admin(settings, a.upper(), PASSWORD)
    auth.create_admin(settings, b, PASSWORD)
    row_a, row_b = admin_row(settings, a), admin_row(settings, b)
    assert row_a is not None, "emails are stored lower-cased"
    assert row_a["password_hash"].startswith("scrypt$")
    assert PASSWORD not in row_a["password_hash"]
    assert row_a["password_hash"] != row_b["password_hash"], "each hash has its own salt"


@pytest.mark.parametrize(
    ("email", "password", "field"),
    [
        ("not-an-email", PASSWORD, "email"),
        ("ok@example.com", "short", "password"),
        ("ok@example.com", " " * 20, "password"),
        ("ok@example.com", "x" * (auth.MAX_PASSWORD + 1), "password"),
        ("ok@example.com", "nul\x00inside password", "password"),
    ],
)
def test_create_admin_rejects_bad_emails_and_weak_passwords(
    settings: Settings, email: str, password: str, field: str
) -> None:
    with pytest.raises(ValidationError) as exc:
        auth.create_admin(settings, email, password)
    assert field in exc.value.errors
    assert auth.list_admins(settings) == []


def test_create_admin_twice_is_a_conflict(settings: Settings) -> None:
    email = f"{uid()}@example.com"
    auth.create_admin(settings, email, PASSWORD)
    with pytest.raises(ConflictError):
        auth.create_admin(settings, email, "another long password")


def test_login_opens_a_session_that_only_the_signed_cookie_resolves(settings: Settings) -> None:
    email = f"{uid()}@example.com"
    auth.create_admin(settings, email, PASSWORD)
    raw = auth.login_admin(settings, email, PASSWORD, "10.0.0.1")
    cookie = auth.sign_session(settings, "admin-session", raw)
    principal = auth.principal_from_admin_cookie(settings, cookie)
    assert principal == auth.Principal("admin", email, via="cookie")
    assert principal.actor == f"admin:{email}" and principal.is_platform
    assert auth.principal_from_admin_cookie(settings, raw) is None, "unsigned id is refused"
    assert auth.principal_from_admin_cookie(settings, cookie[:-2] + "xx") is None
    other_key = dataclasses.replace(settings, secret_key="another secret key of the service")
    assert auth.principal_from_admin_cookie(other_key, cookie) is None
    tenant_purpose = auth.sign_session(settings, "tenant-session", raw)
    assert auth.principal_from_admin_cookie(settings, tenant_purpose) is None
    with registry.engine(settings).connect() as conn:
        stored = conn.execute(sa.select(auth.auth_sessions.c.session_hash)).scalars().all()
    assert raw not in stored, "only the session id's hash is stored"
    auth.revoke_session(settings, raw)
    assert auth.principal_from_admin_cookie(settings, cookie) is None


def test_changing_an_admin_password_ends_their_sessions(settings: Settings) -> None:
    email = f"{uid()}@example.com"
    auth.create_admin(settings, email, PASSWORD)
    cookie = auth.sign_session(
        settings, "admin-session", auth.login_admin(settings, email, PASSWORD, "10.0.0.1")
    )
    auth.set_admin_password(settings, email, "a brand new pass phrase")
    assert auth.principal_from_admin_cookie(settings, cookie) is None
    with pytest.raises(auth.AuthError):
        auth.login_admin(settings, email, PASSWORD, "10.0.0.1")
    assert auth.login_admin(settings, email, "a brand new pass phrase", "10.0.0.1")
    with pytest.raises(NotFoundError):
        auth.set_admin_password(settings, "nobody@example.com", "a brand new pass phrase")


def test_disabled_admin_cannot_log_in_or_use_an_open_session(settings: Settings) -> None:
    email = f"{uid()}@example.com"
    auth.create_admin(settings, email, PASSWORD)
    cookie = auth.sign_session(
        settings, "admin-session", auth.login_admin(settings, email, PASSWORD, "10.0.0.1")
    )
    with registry.engine(settings).begin() as conn:
        conn.execute(auth.platform_admins.update().values(is_active=False))
    assert auth.principal_from_admin_cookie(settings, cookie) is None
    with pytest.raises(auth.AuthError):
        auth.login_admin(settings, email, PASSWORD, "10.0.0.2")


# --- throttling --------------------------------------------------------------------------------


def test_five_failures_lock_the_account_whatever_the_address(settings: Settings) -> None:
    email = f"{uid()}@example.com"
    auth.create_admin(settings, email, PASSWORD)
    for i in range(auth.MAX_FAILURES_PER_SUBJECT):
        with pytest.raises(auth.AuthError):
            auth.login_admin(settings, email, "wrong password", f"10.0.1.{i}")
    with pytest.raises(auth.RateLimited) as exc:
        auth.login_admin(settings, email, PASSWORD, "10.0.2.1")
    assert 0 < exc.value.retry_after <= auth.LOGIN_WINDOW.total_seconds() + 1
    # The window slides: once the failures are older than it, the right password works.
    with registry.engine(settings).begin() as conn:
        conn.execute(
            auth.login_attempts.update().values(
                at=registry.utcnow() - auth.LOGIN_WINDOW - dt.timedelta(seconds=1)
            )
        )
    assert auth.login_admin(settings, email, PASSWORD, "10.0.2.1")


def test_a_successful_login_clears_earlier_failures(settings: Settings) -> None:
    email = f"{uid()}@example.com"
    auth.create_admin(settings, email, PASSWORD)
    for _ in range(auth.MAX_FAILURES_PER_SUBJECT - 1):
        with pytest.raises(auth.AuthError):
            auth.login_admin(settings, email, "wrong password", "10.0.0.1")
    auth.login_admin(settings, email, PASSWORD, "10.0.0.1")
    for _ in range(auth.MAX_FAILURES_PER_SUBJECT - 1):
        with pytest.raises(auth.AuthError):
            auth.login_admin(settings, email, "wrong password", "10.0.0.1")
    assert auth.login_admin(settings, email, PASSWORD, "10.0.0.1")


def test_one_address_spraying_many_accounts_is_throttled(settings: Settings) -> None:
    for i in range(auth.MAX_FAILURES_PER_REMOTE):
        auth.record_attempt(settings, "platform", f"user{i}@example.com", "10.9.9.9", False)
    with pytest.raises(auth.RateLimited):
        auth.check_throttle(settings, "platform", "fresh@example.com", "10.9.9.9")
    assert auth.check_throttle(settings, "platform", "fresh@example.com", "10.9.9.8") == 0
    # Tenant logins are throttled on their own: a platform lockout does not spill over.
    assert auth.check_throttle(settings, "tenant:t_one", "fresh@example.com", "10.9.9.9") == 0


def test_unknown_and_known_accounts_fail_alike(settings: Settings) -> None:
    with pytest.raises(auth.AuthError) as unknown:
        auth.login_admin(settings, "ghost@example.com", PASSWORD, "10.0.0.1")
    email = f"{uid()}@example.com"
    auth.create_admin(settings, email, PASSWORD)
    with pytest.raises(auth.AuthError) as known:
        auth.login_admin(settings, email, "wrong password", "10.0.0.1")
    assert str(unknown.value) == str(known.value)


# --- API tokens --------------------------------------------------------------------------------


def test_api_token_is_stored_as_a_hash_and_works_until_revoked(settings: Settings) -> None:
    name = uid("ci")
    token = auth.create_api_token(settings, name, "test")
    assert token.startswith(auth.API_TOKEN_PREFIX) and len(token) > 40
    listed = json.dumps(auth.list_api_tokens(settings))
    assert token not in listed and auth.identity.token_hash(token) not in listed
    with registry.engine(settings).connect() as conn:
        stored = conn.execute(sa.select(auth.api_tokens.c.token_hash)).scalars().all()
    assert token not in stored
    assert auth.principal_from_bearer(settings, token) == auth.Principal("token", name)
    with pytest.raises(ConflictError):
        auth.create_api_token(settings, name, "test")
    assert auth.revoke_api_token(settings, name) == 1
    assert auth.principal_from_bearer(settings, token) is None
    with pytest.raises(NotFoundError):
        auth.revoke_api_token(settings, name)
    assert auth.create_api_token(settings, name, "test") != token, "a name can be reused"


def test_expired_api_token_is_refused(settings: Settings) -> None:
    past = registry.utcnow() - dt.timedelta(seconds=1)
    token = auth.create_api_token(settings, uid("old"), "test", expires_at=past)
    assert auth.principal_from_bearer(settings, token) is None


@pytest.mark.parametrize("name", ["", "-lead", "has space", "x" * 65, "semi;colon", "ü"])
def test_api_token_names_are_restricted(settings: Settings, name: str) -> None:
    with pytest.raises(ValidationError):
        auth.create_api_token(settings, name, "test")


def test_tenant_session_is_not_a_platform_credential(settings: Settings) -> None:
    raw = auth.create_session(settings, "tenant", "a@b.example", "t_one", dt.timedelta(hours=1))
    principal = auth.principal_from_bearer(settings, raw)
    assert principal == auth.Principal("tenant", "a@b.example", "t_one")
    assert not principal.is_platform
    cookie = auth.sign_session(settings, "tenant-session", raw)
    assert auth.principal_from_admin_cookie(settings, cookie) is None
    assert auth.principal_from_bearer(settings, "tpa_" + raw[4:]) is None


def test_credentials_work_on_a_postgresql_control_plane(pg_settings: Settings) -> None:
    email = f"{uid()}@example.com"
    auth.create_admin(pg_settings, email, PASSWORD)
    raw = auth.login_admin(pg_settings, email, PASSWORD, "10.0.0.1")
    cookie = auth.sign_session(pg_settings, "admin-session", raw)
    assert auth.principal_from_admin_cookie(pg_settings, cookie) is not None
    token = auth.create_api_token(pg_settings, "ci", "test")
    assert auth.principal_from_bearer(pg_settings, token) == auth.Principal("token", "ci")


def test_control_revision_0002_downgrades_and_upgrades_cleanly(pg_settings: Settings) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(pg_settings.migrations_dir / "control"))
    cfg.attributes["version_table"] = "alembic_version_control"
    with registry.engine(pg_settings).begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "control_0001")
        assert "platform_admins" not in sa.inspect(conn).get_table_names()
        command.upgrade(cfg, "head")
        tables = set(sa.inspect(conn).get_table_names())
    assert {"platform_admins", "api_tokens", "auth_sessions", "login_attempts"} <= tables


def test_nothing_secret_is_logged(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tenant_pipelines")
    email = f"{uid()}@example.com"
    auth.create_admin(settings, email, PASSWORD)
    raw = auth.login_admin(settings, email, PASSWORD, "10.0.0.1")
    with pytest.raises(auth.AuthError):
        auth.login_admin(settings, email, "wrong password", "10.0.0.1")
    token = auth.create_api_token(settings, "ci", "test")
    auth.revoke_api_token(settings, "ci")
    text = caplog.text + json.dumps([r.__dict__.get("fields") for r in caplog.records])
    assert "platform admin logged in" in text
    for secret in (PASSWORD, "wrong password", raw, token):
        assert secret not in text


# --- CSRF, GraphQL over GET, redirects ---------------------------------------------------------


def scope(
    method: str, headers: dict[str, str], kind: str = "http", path: str = "/api/x", query: str = ""
) -> dict[str, Any]:
    return {
        "type": kind,
        "method": method,
        "path": path,
        "scheme": "ws" if kind == "websocket" else "http",
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }


@pytest.mark.parametrize(
    ("method", "headers", "cookie_auth", "ok"),
    [
        ("GET", {"Origin": "https://evil.example"}, True, True),  # safe methods pass
        ("POST", {"Origin": "http://svc:8000"}, True, True),
        ("POST", {"Origin": "https://tp.example.com"}, True, True),  # TP_PUBLIC_URL
        ("POST", {"Origin": "https://evil.example"}, True, False),
        ("POST", {"Origin": "https://evil.example"}, False, False),
        ("POST", {"Origin": "null"}, True, False),
        ("POST", {"Origin": "http://svc:8001"}, True, False),  # another port is another origin
        ("POST", {"Origin": "https://svc:8000"}, True, False),
        ("POST", {"Sec-Fetch-Site": "same-origin"}, True, True),
        ("POST", {"Sec-Fetch-Site": "none"}, True, True),
        ("POST", {"Sec-Fetch-Site": "same-site"}, True, False),
        ("POST", {"Sec-Fetch-Site": "cross-site"}, True, False),
        ("POST", {}, True, False),  # a cookie without provenance headers
        ("POST", {}, False, True),  # a non-browser client with a Bearer token
        ("DELETE", {"Origin": "https://evil.example"}, True, False),
    ],
)
def test_csrf_rules(
    settings: Settings, method: str, headers: dict[str, str], cookie_auth: bool, ok: bool
) -> None:
    s = dataclasses.replace(settings, public_url="https://tp.example.com/")
    sc = scope(method, {"Host": "svc:8000", **headers})
    assert auth.csrf_ok(sc, Headers(scope=sc), s, cookie_auth) is ok


def test_websocket_handshakes_are_checked_like_unsafe_requests(settings: Settings) -> None:
    evil = scope("GET", {"Host": "svc:8000", "Origin": "https://evil.example"}, "websocket")
    ours = scope("GET", {"Host": "svc:8000", "Origin": "http://svc:8000"}, "websocket")
    assert not auth.csrf_ok(evil, Headers(scope=evil), settings, True)
    assert auth.csrf_ok(ours, Headers(scope=ours), settings, True)


@pytest.mark.parametrize(
    ("query", "refused"),
    [
        ("query=%7Bversion%7D", False),
        ("query=mutation%7BterminateRun(runId:%22x%22)%7B__typename%7D%7D", True),
        ("query=query%20A%7Bversion%7Dmutation%20B%7BlogTelemetry%7D", True),
        ("query=subscription%7Bx%7D", True),
        ("query=%7B%7B%7B", False),  # not GraphQL: Dagster answers the parse error itself
        ("", False),
    ],
)
def test_graphql_mutations_over_get_are_detected(query: str, refused: bool) -> None:
    sc = scope("GET", {}, path="/dagster/graphql", query=query)
    assert auth.is_graphql_get_mutation(sc, "/dagster/graphql") is refused
    other = scope("GET", {}, path="/api/tenants", query=query)
    assert auth.is_graphql_get_mutation(other, "/dagster/graphql") is False


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/dagster/runs?x=1", "/dagster/runs?x=1"),
        ("https://evil.example/", auth.DEFAULT_NEXT),
        ("//evil.example/", auth.DEFAULT_NEXT),
        ("/\\evil.example", auth.DEFAULT_NEXT),
        ("/dagster\r\nSet-Cookie: x=1", auth.DEFAULT_NEXT),
        ("javascript:alert(1)", auth.DEFAULT_NEXT),
        (None, auth.DEFAULT_NEXT),
    ],
)
def test_login_redirects_only_to_local_paths(target: Any, expected: str) -> None:
    assert auth.safe_next(target) == expected


def test_login_page_escapes_the_next_parameter() -> None:
    page = auth.login_page('/x"><script>alert(1)</script>').body.decode()
    assert "<script>" not in page


# --- tenantctl admin ... -----------------------------------------------------------------------


def tenantctl(settings: Settings, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in settings.env().items()}
    env.update({"PATH": "/usr/bin:/bin", "HOME": str(settings.data_dir)})
    env["DAGSTER_HOME"] = str(settings.data_dir / "dagster")
    Path(env["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "tenant_pipelines.cli", *args],
        input=stdin,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_tenantctl_admin_create_reads_the_password_from_stdin_never_argv(
    settings: Settings,
) -> None:
    email = f"{uid()}@example.com"
    assert tenantctl(settings, "admin", "create", email, "--password", PASSWORD).returncode == 2
    done = tenantctl(settings, "admin", "create", email, stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    assert auth.login_admin(settings, email, PASSWORD, "10.0.0.1")
    again = tenantctl(settings, "admin", "create", email, stdin=PASSWORD + "\n")
    assert again.returncode == 1 and "already exists" in again.stderr
    weak = tenantctl(settings, "admin", "create", f"{uid()}@example.com", stdin="short\n")
    assert weak.returncode == 1 and "password" in weak.stderr and "Traceback" not in weak.stderr
    listed = tenantctl(settings, "admin", "list", "--json")
    assert email in listed.stdout and "scrypt" not in listed.stdout


def test_tenantctl_admin_tokens_are_shown_once_listed_without_secrets_and_revoked(
    settings: Settings,
) -> None:
    made = tenantctl(settings, "admin", "token", "create", "--name", "ci", "--json")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["token"]
    assert auth.principal_from_bearer(settings, token) == auth.Principal("token", "ci")
    listed = tenantctl(settings, "admin", "token", "list")
    assert "ci" in listed.stdout and "live" in listed.stdout and token not in listed.stdout
    assert tenantctl(settings, "admin", "token", "revoke", "ci").returncode == 0
    assert auth.principal_from_bearer(settings, token) is None
    assert "revoked" in tenantctl(settings, "admin", "token", "list").stdout
    assert tenantctl(settings, "admin", "token", "revoke", "ci").returncode == 1
    expiring = tenantctl(
        settings, "admin", "token", "create", "--name", "cd", "--expires-days", "0"
    )
    assert expiring.returncode == 1


# --- the middleware's principal cache ----------------------------------------------------------


def _whoami_app(settings: Settings) -> Any:
    """AuthMiddleware in front of an app that answers who the caller is."""
    from starlette.testclient import TestClient

    async def app(scope: Any, receive: Any, send: Any) -> None:
        principal = scope["tp.principal"]
        body = json.dumps(principal.to_json()).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return TestClient(auth.AuthMiddleware(app, settings, "/dagster/graphql"))


def test_revoking_a_token_in_this_process_refuses_it_at_once(settings: Settings) -> None:
    name = uid("ci")
    token = auth.create_api_token(settings, name, "test")
    client = _whoami_app(settings)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/me", headers=headers).json()["name"] == name
    assert auth.principals.get(settings, token) == auth.Principal("token", name), "cached"
    auth.revoke_api_token(settings, name)
    assert auth.principals.get(settings, token) is None
    assert client.get("/api/me", headers=headers).status_code == 401


def test_a_revocation_by_another_process_is_honoured_once_the_entry_expires(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = uid("ci")
    token = auth.create_api_token(settings, name, "test")
    client = _whoami_app(settings)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/me", headers=headers).status_code == 200
    # What `tenantctl admin token revoke` does from its own process: this cache is not told.
    with registry.engine(settings).begin() as conn:
        conn.execute(auth.api_tokens.update().values(revoked_at=registry.utcnow()))
    assert client.get("/api/me", headers=headers).status_code == 200, "the documented window"
    assert auth.principal_from_bearer(settings, token) is None, "the uncached lookup is exact"
    later = auth.time.monotonic() + auth.PRINCIPAL_TTL_S + 1
    monkeypatch.setattr(auth.time, "monotonic", lambda: later)
    assert client.get("/api/me", headers=headers).status_code == 401


def test_a_cached_principal_never_outlives_its_token(settings: Settings) -> None:
    soon = registry.utcnow() + dt.timedelta(seconds=1)
    token = auth.create_api_token(settings, uid("ci"), "test", expires_at=soon)
    principal, expires = auth._bearer_lookup(settings, token)
    assert principal is not None and expires == soon
    cache = auth.PrincipalCache(ttl_s=3600)
    cache.put(settings, token, principal, expires, cache.generation)
    assert cache.get(settings, token) == principal
    expired = auth.PrincipalCache(ttl_s=3600)
    past = registry.utcnow() - dt.timedelta(seconds=1)
    expired.put(settings, token, principal, past, expired.generation)
    assert expired.get(settings, token) is None


def test_a_lookup_that_raced_a_revocation_is_not_cached(settings: Settings) -> None:
    token = auth.create_api_token(settings, uid("ci"), "test")
    principal, expires = auth._bearer_lookup(settings, token)
    assert principal is not None
    cache = auth.PrincipalCache()
    generation = cache.generation  # the lookup started here ...
    cache.clear()  # ... a revocation committed meanwhile ...
    cache.put(settings, token, principal, expires, generation)  # ... and its answer is late
    assert cache.get(settings, token) is None
    cache.put(settings, token, principal, expires, cache.generation)
    assert cache.get(settings, token) == principal


def _counting_lookups(monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> list[str]:
    """Record each database lookup of a Bearer token the middleware makes (the real one)."""
    calls: list[str] = []
    real = auth._bearer_lookup

    def lookup(settings: Settings, token: str) -> Any:
        calls.append(token)
        time.sleep(delay)  # a slow database: the concurrent callers overlap for sure
        return real(settings, token)

    monkeypatch.setattr(auth, "_bearer_lookup", lookup)
    return calls


def _whoami_asgi(settings: Settings) -> auth.AuthMiddleware:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["tp.actor"].encode()})

    return auth.AuthMiddleware(app, settings, "/dagster/graphql")


def test_concurrent_misses_of_one_token_share_one_database_lookup(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    token = auth.create_api_token(settings, uid("ci"), "test")
    auth.principals.clear()
    calls = _counting_lookups(monkeypatch, delay=0.2)
    middleware = _whoami_asgi(settings)

    async def many() -> list[int]:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            headers = {"Authorization": f"Bearer {token}"}
            answers = await asyncio.gather(
                *(client.get("/api/me", headers=headers) for _ in range(20))
            )
        return [r.status_code for r in answers]

    assert asyncio.run(many()) == [200] * 20
    assert calls == [token]


def test_a_caller_that_goes_away_does_not_cancel_the_lookup_others_wait_for(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = uid("ci")
    token = auth.create_api_token(settings, name, "test")
    auth.principals.clear()
    calls = _counting_lookups(monkeypatch, delay=0.3)
    middleware = _whoami_asgi(settings)

    async def scenario() -> auth.Principal | None:
        first = asyncio.create_task(middleware._lookup(token, {}))
        second = asyncio.create_task(middleware._lookup(token, {}))
        await asyncio.sleep(0.1)
        first.cancel()  # its client disconnected mid-lookup
        return await second

    assert asyncio.run(scenario()) == auth.Principal("token", name)
    assert calls == [token]


def test_a_token_in_use_is_read_again_before_its_entry_expires(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    name = uid("ci")
    token = auth.create_api_token(settings, name, "test")
    # Entries of 3 s; a use in the last REFRESH_AHEAD_S (1 s) of one starts a refresh.
    monkeypatch.setattr(auth, "principals", auth.PrincipalCache(ttl_s=3.0))
    calls = _counting_lookups(monkeypatch)
    middleware = _whoami_asgi(settings)
    headers = {"Authorization": f"Bearer {token}"}

    async def scenario() -> list[int]:
        transport = httpx.ASGITransport(app=middleware)
        codes = []

        async def get() -> None:
            codes.append((await client.get("/api/me", headers=headers)).status_code)

        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await get()  # t=0: a miss, entry until t=3
            await asyncio.sleep(2.2)
            await get()  # served from the cache; one background lookup renews the entry
            await asyncio.gather(*middleware._refreshes)
            assert len(calls) == 2
            await asyncio.sleep(1.0)
            await get()  # t=3.2: past the first entry's end, still cached (renewed to 5.2)
            assert len(calls) == 2
            # Revoked by another process: served within the documented window...
            with registry.engine(settings).begin() as conn:
                conn.execute(auth.api_tokens.update().values(revoked_at=registry.utcnow()))
            await get()
            # ...until the next refresh finds out and drops the entry instead of renewing it.
            await asyncio.sleep(1.3)
            await get()
            await asyncio.gather(*middleware._refreshes)
            await get()
        return codes

    assert asyncio.run(scenario()) == [200, 200, 200, 200, 200, 401]


def test_a_tenant_logout_in_this_process_empties_the_cache(settings: Settings) -> None:
    raw = auth.create_session(settings, "tenant", "a@b.example", "t_one", dt.timedelta(hours=1))
    client = _whoami_app(settings)
    # A tenant session is not a platform credential: refused, but its principal is cached.
    assert client.get("/api/me", headers={"Authorization": f"Bearer {raw}"}).status_code == 403
    assert auth.principals.get(settings, raw) is not None
    auth.revoke_session(settings, raw)
    assert auth.principals.get(settings, raw) is None
    assert client.get("/api/me", headers={"Authorization": f"Bearer {raw}"}).status_code == 401
