"""The HTTP API of a real ``tenantctl serve`` (PostgreSQL control plane and tenants, Redis,
Dagster daemon): authorization matrix, CSRF, bad input, idempotent actions, OpenAPI."""

import asyncio
import contextlib
import datetime as dt
import functools
import http.server
import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from conftest import Served, free_port, uid, wait_for
from openapi_spec_validator import validate
from starlette.applications import Starlette

from tenant_pipelines import api, auth, delivery, registry
from tenant_pipelines.providers import provider_for
from tenant_pipelines.settings import Settings

PASSWORD = "correct horse battery staple"
TENANT_PASSWORD = "tenant admin pass phrase"
EVIL = "https://evil.example"
DAGSTER_PAGE = '"assetPrefix":"/dagster"'  # in the UI's HTML shell


@dataclass
class Admin:
    """A platform admin of the served service: an API token and a logged-in browser."""

    email: str
    token: str
    browser: httpx.Client
    origin: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class TenantUser:
    tenant_id: str
    email: str
    token: str


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def drop_tenant(served: Served, tenant_id: str) -> None:
    """Remove a test tenant's database and catalog row from the served control plane."""
    with contextlib.suppress(registry.NotFoundError):
        tenant = registry.get_tenant(served.settings, tenant_id)
        with contextlib.suppress(Exception):
            provider_for(served.settings, tenant).drop()
    with registry.engine(served.settings).begin() as conn:
        conn.execute(registry.tenants.delete().where(registry.tenants.c.id == tenant_id))


@pytest.fixture(scope="module")
def admin(served: Served) -> Iterator[Admin]:
    email = f"{uid('admin')}@example.com"
    auth.create_admin(served.settings, email, PASSWORD)
    token = auth.create_api_token(served.settings, uid("ci"), "test")
    browser = httpx.Client(base_url=served.url, timeout=30)
    r = browser.post(
        "/auth/login", json={"email": email, "password": PASSWORD}, headers={"Origin": served.url}
    )
    assert r.status_code == 200, r.text
    yield Admin(email, token, browser, served.url, bearer(token))
    browser.close()


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=30) as c:
        yield c


def create_tenant(client: httpx.Client, admin: Admin, **fields: Any) -> str:
    tenant_id = fields.pop("id", None) or uid("api")
    body = {
        "id": tenant_id,
        "name": "API test",
        "admin_email": f"owner@{tenant_id.replace('_', '-')}.example.com",
        **fields,
    }
    r = client.post("/api/tenants", json=body, headers=admin.headers)
    assert r.status_code == 202, r.text
    return tenant_id


def wait_status(
    client: httpx.Client, admin: Admin, tenant_id: str, *statuses: str, timeout: float = 90
) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        tenant = client.get(f"/api/tenants/{tenant_id}", headers=admin.headers).json()["tenant"]
        return tenant if tenant["status"] in statuses else None

    return dict(wait_for(done, timeout=timeout, interval=0.25, what=f"{tenant_id} {statuses}"))


def wait_idle(client: httpx.Client, admin: Admin, tenant_id: str) -> None:
    """Until no provisioning run of the tenant is queued or running."""

    def idle() -> bool:
        runs = client.get(f"/api/tenants/{tenant_id}/provisioning", headers=admin.headers)
        return all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs.json()["runs"])

    wait_for(idle, timeout=90, interval=0.25, what=f"{tenant_id} idle")


def provisioned_user(served: Served, client: httpx.Client, admin: Admin) -> TenantUser:
    """A tenant created through the API, its admin's password set through the one-time
    token picked up out of band, and a tenant session."""
    tenant_id = create_tenant(client, admin)
    wait_status(client, admin, tenant_id, "active")
    r = client.post(f"/api/tenants/{tenant_id}/credentials", headers=admin.headers)
    assert r.status_code == 200, r.text
    pickup = r.json()
    r = client.post(
        f"/api/t/{tenant_id}/auth/reset-password",
        json={"token": pickup["reset_token"], "new_password": TENANT_PASSWORD},
    )
    assert r.status_code == 200, r.text
    r = client.post(
        f"/api/t/{tenant_id}/auth/login",
        json={"email": pickup["admin_email"], "password": TENANT_PASSWORD},
    )
    assert r.status_code == 200, r.text
    return TenantUser(tenant_id, pickup["admin_email"], r.json()["token"])


@pytest.fixture(scope="module")
def tenant_user(served: Served, client: httpx.Client, admin: Admin) -> Iterator[TenantUser]:
    user = provisioned_user(served, client, admin)
    yield user
    drop_tenant(served, user.tenant_id)


@pytest.fixture(scope="module")
def other_user(served: Served, client: httpx.Client, admin: Admin) -> Iterator[TenantUser]:
    user = provisioned_user(served, client, admin)
    yield user
    drop_tenant(served, user.tenant_id)


# --- authorization matrix ----------------------------------------------------------------------

MISSING = "zz_" + uuid.uuid4().hex[:12]  # a valid identifier no tenant has
BODIES: dict[tuple[str, str], Any] = {
    ("/api/tenants", "POST"): {"id": "x"},  # invalid on purpose: 422 means "authorized"
    ("/api/t/{tenant}/auth/reset-password", "POST"): {"token": "nope", "new_password": "x" * 20},
    ("/api/t/{tenant}/auth/login", "POST"): {"email": "nobody@example.com", "password": "x"},
    ("/auth/login", "POST"): {"email": "nobody@example.com", "password": "nope"},
}


def spec_operations(served: Served, admin: Admin) -> list[tuple[str, str, dict[str, Any]]]:
    doc = httpx.get(served.url + "/api/openapi.json", headers=admin.headers, timeout=30).json()
    return [
        (path, method.upper(), op)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    ]


def concrete(path: str, tenant_id: str) -> str:
    return path.replace("{id}", MISSING).replace("{tenant}", tenant_id).replace("{path}", "runs")


def call(
    client: httpx.Client,
    method: str,
    path: str,
    body: Any,
    headers: dict[str, str],
    cookies: dict[str, str] | None = None,
) -> httpx.Response:
    client.cookies.clear()
    return client.request(
        method, path, json=body if method == "POST" else None, headers=headers, cookies=cookies
    )


def credential_sets(
    served: Served, admin: Admin, tenant_user: TenantUser, other_user: TenantUser
) -> dict[str, tuple[dict[str, str], dict[str, str]]]:
    """name -> (headers, cookies) for each kind of caller the matrix tries."""
    expired = auth.create_api_token(
        served.settings,
        uid("expired"),
        "test",
        expires_at=registry.utcnow() - dt.timedelta(minutes=1),
    )
    revoked_name = uid("revoked")
    revoked = auth.create_api_token(served.settings, revoked_name, "test")
    auth.revoke_api_token(served.settings, revoked_name)
    admin_cookie = admin.browser.cookies[auth.ADMIN_COOKIE]
    same_origin = {"Origin": served.url}
    return {
        "none": ({}, {}),
        "bad_bearer": (bearer("tpa_" + "A" * 43), {}),
        "garbage_header": ({"Authorization": "Basic YWRtaW46YWRtaW4="}, {}),
        "forged_cookie": (same_origin, {auth.ADMIN_COOKIE: admin_cookie[:-4] + "AAAA"}),
        "expired_token": (bearer(expired), {}),
        "revoked_token": (bearer(revoked), {}),
        "tenant_admin": (bearer(tenant_user.token), {}),
        "other_tenant_admin": (bearer(other_user.token), {}),
        "platform_token": (admin.headers, {}),
        "platform_cookie": (same_origin, {auth.ADMIN_COOKIE: admin_cookie}),
    }


def expectation(path: str, op: dict[str, Any], who: str) -> str:
    """What the matrix expects: "ok" (authorized), "unauth" (401, or the login redirect for
    UI pages), "forbidden" (403)."""
    if op.get("security") == []:
        return "ok"
    if path.startswith("/api/t/"):
        if who == "tenant_admin":
            return "ok"
        if who in ("other_tenant_admin", "platform_token"):
            return "forbidden"
        return "unauth"
    if who in ("platform_token", "platform_cookie"):
        return "ok"
    if who in ("tenant_admin", "other_tenant_admin"):
        return "forbidden"
    return "unauth"


def error_code(r: httpx.Response) -> str | None:
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


def verdict(r: httpx.Response) -> str:
    if r.status_code == 401 and error_code(r) == "unauthenticated":
        return "unauth"
    if r.status_code == 303 and r.headers["location"].startswith("/auth/login"):
        return "unauth"
    if r.status_code == 403 and error_code(r) == "forbidden":
        return "forbidden"
    return "ok" if r.status_code < 500 else f"error {r.status_code}"


SKIP_STATEFUL = {("/auth/logout", "POST"), ("/api/t/{tenant}/auth/logout", "POST")}


def test_authorization_matrix_covers_every_documented_route_and_caller(
    served: Served,
    admin: Admin,
    tenant_user: TenantUser,
    other_user: TenantUser,
    client: httpx.Client,
) -> None:
    creds = credential_sets(served, admin, tenant_user, other_user)
    operations = spec_operations(served, admin)
    assert len(operations) >= 20
    wrong = []
    for path, method, op in operations:
        if (path, method) in SKIP_STATEFUL:
            continue  # covered by the logout tests: they end the very sessions used here
        for who, (headers, cookies) in creds.items():
            url = concrete(path, tenant_user.tenant_id)
            accept = {"Accept": "text/html"} if path.startswith("/dagster/{") else {}
            r = call(
                client, method, url, BODIES.get((path, method)), {**headers, **accept}, cookies
            )
            want, got = expectation(path, op, who), verdict(r)
            if want != got:
                wrong.append(
                    f"{method} {url} as {who}: want {want}, got {r.status_code} {r.text[:120]}"
                )
    assert not wrong, "\n".join(wrong)


def test_logout_routes_refuse_strangers_and_end_only_the_callers_session(
    served: Served,
    admin: Admin,
    client: httpx.Client,
    tenant_user: TenantUser,
) -> None:
    assert call(client, "POST", "/auth/logout", None, {}).status_code == 401
    url = f"/api/t/{tenant_user.tenant_id}/auth/logout"
    assert call(client, "POST", url, None, {}).status_code == 401
    assert call(client, "POST", url, None, admin.headers).status_code == 403
    # A second session of the same user survives the first one's logout.
    r = client.post(
        f"/api/t/{tenant_user.tenant_id}/auth/login",
        json={"email": tenant_user.email, "password": TENANT_PASSWORD},
    )
    second = r.json()["token"]
    assert call(client, "POST", url, None, bearer(second)).status_code == 200
    me = f"/api/t/{tenant_user.tenant_id}/me"
    assert call(client, "GET", me, None, bearer(second)).status_code == 401
    assert call(client, "GET", me, None, bearer(tenant_user.token)).status_code == 200


def test_platform_admin_browser_logout_revokes_the_cookie(served: Served, admin: Admin) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as browser:
        r = browser.post(
            "/auth/login",
            json={"email": admin.email, "password": PASSWORD},
            headers={"Origin": served.url},
        )
        assert r.status_code == 200
        stolen = browser.cookies[auth.ADMIN_COOKIE]
        assert browser.get("/api/me").json()["kind"] == "admin"
        r = browser.post(
            "/auth/logout", headers={"Origin": served.url, "Accept": "application/json"}
        )
        assert r.status_code == 200
        replay = httpx.get(served.url + "/api/me", cookies={auth.ADMIN_COOKIE: stolen})
        assert replay.status_code == 401


def test_dagster_ui_page_and_graphql_need_a_platform_admin(
    served: Served, admin: Admin, client: httpx.Client, tenant_user: TenantUser
) -> None:
    html = {"Accept": "text/html"}
    r = call(client, "GET", "/dagster/runs", None, html)
    assert r.status_code == 303
    assert r.headers["location"] == "/auth/login?next=%2Fdagster%2Fruns"
    r = call(client, "GET", "/dagster/", None, {**html, **admin.headers})
    assert r.status_code == 200 and DAGSTER_PAGE in r.text
    r = call(client, "GET", "/dagster/", None, {**html, **bearer(tenant_user.token)})
    assert r.status_code == 403
    query = {"query": "{ version }"}
    mutation = {"query": 'mutation { terminateRun(runId: "nope") { __typename } }'}
    for body in (query, mutation):
        assert client.post("/dagster/graphql", json=body).status_code == 401
        assert (
            client.post(
                "/dagster/graphql", json=body, headers=bearer(tenant_user.token)
            ).status_code
            == 403
        )
        r = client.post("/dagster/graphql", json=body, headers=admin.headers)
        assert r.status_code == 200 and "errors" not in r.json(), r.text
    r = client.post("/dagster/graphql", json=mutation, headers=admin.headers)
    assert r.json()["data"]["terminateRun"]["__typename"] == "RunNotFoundError"


def _ws(served: Served, headers: dict[str, str]) -> str:
    async def go() -> str:
        url = served.url.replace("http", "ws") + "/dagster/graphql"
        try:
            async with websockets.connect(
                url, subprotocols=["graphql-ws"], additional_headers=headers, open_timeout=10
            ) as ws:
                await ws.send(json.dumps({"type": "connection_init", "payload": {}}))
                return str(json.loads(await ws.recv())["type"])
        except websockets.InvalidStatus as exc:
            return f"refused {exc.response.status_code}"

    return asyncio.run(go())


def test_dagster_websocket_needs_a_platform_admin_and_a_same_origin_page(
    served: Served, admin: Admin, tenant_user: TenantUser
) -> None:
    cookie = f"{auth.ADMIN_COOKIE}={admin.browser.cookies[auth.ADMIN_COOKIE]}"
    assert _ws(served, {}) == "refused 403"
    assert _ws(served, bearer("tpa_nope")) == "refused 403"
    assert _ws(served, bearer(tenant_user.token)) == "refused 403"
    assert _ws(served, {"Cookie": cookie, "Origin": EVIL}) == "refused 403"
    assert _ws(served, admin.headers) == "connection_ack"
    assert _ws(served, {"Cookie": cookie, "Origin": served.url}) == "connection_ack"


# --- CSRF -------------------------------------------------------------------------------------


def test_cross_site_form_post_with_a_valid_session_cookie_is_refused(
    served: Served, admin: Admin, client: httpx.Client
) -> None:
    tenant_id = create_tenant(client, admin)
    try:
        wait_status(client, admin, tenant_id, "active")
        cookie = {auth.ADMIN_COOKIE: admin.browser.cookies[auth.ADMIN_COOKIE]}
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        attempts = [
            {**form, "Origin": EVIL},
            {**form, "Origin": "null"},
            {**form, "Sec-Fetch-Site": "cross-site"},
            {**form, "Sec-Fetch-Site": "same-site"},
            form,  # neither header: a cookie alone never authorizes a state change
        ]
        for headers in attempts:
            client.cookies.clear()
            r = client.post(
                f"/api/tenants/{tenant_id}/deactivate",
                content=b"x=1",
                headers=headers,
                cookies=cookie,
            )
            assert r.status_code == 403, (headers, r.text)
            assert r.json()["error"]["code"] == "csrf_failed"
            # The classic GraphQL CSRF: a form whose action carries the mutation.
            r = client.post(
                "/dagster/graphql?query=mutation%7BterminateRun(runId:%22x%22)%7B__typename%7D%7D",
                content=b"",
                headers=headers,
                cookies=cookie,
            )
            assert r.status_code == 403, r.text
        r = client.get(
            "/dagster/graphql?query=mutation%7BterminateRun(runId:%22x%22)%7B__typename%7D%7D",
            cookies=cookie,
        )
        assert r.status_code == 405
        assert (
            client.get(f"/api/tenants/{tenant_id}", headers=admin.headers).json()["tenant"][
                "status"
            ]
            == "active"
        )
        # The same request from our own page goes through.
        client.cookies.clear()
        r = client.post(
            f"/api/tenants/{tenant_id}/deactivate", headers={"Origin": served.url}, cookies=cookie
        )
        assert r.status_code == 200, r.text
        assert r.json()["tenant"]["status"] == "deactivated"
        r = client.post(
            "/dagster/graphql",
            cookies=cookie,
            headers={"Sec-Fetch-Site": "same-origin"},
            json={"query": 'mutation { terminateRun(runId: "x") { __typename } }'},
        )
        assert r.status_code == 200
    finally:
        drop_tenant(served, tenant_id)


def test_login_page_sets_an_httponly_strict_cookie_and_rejects_cross_site_posts(
    served: Served, admin: Admin
) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as browser:
        page = browser.get("/auth/login?next=/dagster/runs")
        assert page.status_code == 200 and 'name="password"' in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        form = {"email": admin.email, "password": PASSWORD, "next": "/dagster/runs"}
        r = browser.post("/auth/login", data=form, headers={"Origin": EVIL})
        assert r.status_code == 403
        r = browser.post(
            "/auth/login",
            data={**form, "password": "wrong password!"},
            headers={"Origin": served.url},
        )
        assert r.status_code == 401 and "Wrong email or password" in r.text
        r = browser.post(
            "/auth/login",
            data={**form, "next": "https://evil.example/"},
            headers={"Origin": served.url},
        )
        assert r.status_code == 303 and r.headers["location"] == "/dagster/"
        set_cookie = r.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie
        assert "path=/" in set_cookie
        r = browser.get("/dagster/runs", headers={"Accept": "text/html"})
        assert r.status_code == 200 and DAGSTER_PAGE in r.text


def test_failed_admin_logins_are_throttled_with_retry_after(served: Served) -> None:
    email = f"{uid('locked')}@example.com"
    auth.create_admin(served.settings, email, PASSWORD)
    with httpx.Client(base_url=served.url, timeout=30) as c:
        for _ in range(auth.MAX_FAILURES_PER_SUBJECT):
            r = c.post("/auth/login", json={"email": email, "password": "wrong password"})
            assert r.status_code == 401
        r = c.post("/auth/login", json={"email": email, "password": PASSWORD})
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "too_many_attempts"
        assert 0 < int(r.headers["retry-after"]) <= auth.LOGIN_WINDOW.total_seconds() + 1
        assert auth.ADMIN_COOKIE not in c.cookies


# --- tenant actions ---------------------------------------------------------------------------


def test_create_returns_202_with_status_and_correlation_and_history_reads_dagster(
    served: Served, admin: Admin, client: httpx.Client
) -> None:
    tenant_id = uid("hist")
    try:
        r = client.post(
            "/api/tenants",
            headers=admin.headers,
            json={
                "id": tenant_id,
                "name": "History",
                "admin_email": f"a@{tenant_id.replace('_', '-')}.example.com",
            },
        )
        assert r.status_code == 202
        body = r.json()
        assert body["tenant"]["id"] == tenant_id and len(body["correlation_id"]) == 32
        assert body["status"] in ("requested", "provisioning")
        assert body["tenant"]["run_id"]
        wait_status(client, admin, tenant_id, "active")
        wait_idle(client, admin, tenant_id)
        history = client.get(f"/api/tenants/{tenant_id}/provisioning", headers=admin.headers)
        runs = history.json()["runs"]
        assert runs[0]["correlation_id"] == body["correlation_id"]
        assert runs[0]["status"] == "SUCCESS"
        steps = {s["step"]: s for s in runs[0]["steps"]}
        assert "tenant_verified" in steps
        for step in steps.values():
            assert step["status"] == "SUCCESS" and step["attempts"] >= 1
            assert step["start"] and step["end"] and step["duration_s"] is not None
        events = client.get(f"/api/tenants/{tenant_id}/audit", headers=admin.headers).json()
        assert events["events"][0]["actor"].startswith("token:")

        def listed_active() -> bool:
            page = client.get(
                "/api/tenants", params={"status": "active", "limit": 500}, headers=admin.headers
            ).json()
            return tenant_id in [t["id"] for t in page["items"]] or page["total"] > 500

        # The run worker moved it to active: the list shows it within readmodel.POLL_S.
        wait_for(listed_active, timeout=10, interval=0.1, what="the list to show it active")
    finally:
        drop_tenant(served, tenant_id)


def test_status_reads_show_a_new_run_at_once_and_pages_match_the_catalog(
    served: Served, admin: Admin, client: httpx.Client
) -> None:
    tenant_id = create_tenant(client, admin)
    try:
        wait_status(client, admin, tenant_id, "active")
        wait_idle(client, admin, tenant_id)
        path = f"/api/tenants/{tenant_id}/provisioning"
        first = client.get(path, headers=admin.headers).json()["runs"]
        assert len(first) == 1 and first[0]["status"] == "SUCCESS"
        again = client.post(f"/api/tenants/{tenant_id}/activate", json={}, headers=admin.headers)
        assert again.status_code == 202
        now = client.get(path, headers=admin.headers).json()
        assert [r["run_id"] for r in now["runs"]] == [again.json()["tenant"]["run_id"]] + [
            first[0]["run_id"]
        ]
        assert now["correlation_id"] == again.json()["correlation_id"]
        assert now["runs"][1] == first[0], "a finished run reads the same every time"
        wait_idle(client, admin, tenant_id)
        done = client.get(path, headers=admin.headers).json()["runs"]
        assert [r["status"] for r in done] == ["SUCCESS", "SUCCESS"]

        # A page shows the catalog row exactly as Tenant.to_json renders it, once the read
        # model has polled the run worker's last change (readmodel.POLL_S).
        def page_matches() -> bool:
            tenant = registry.get_tenant(served.settings, tenant_id)
            return listed(client, admin, tenant_id) == tenant.to_json()

        wait_for(page_matches, timeout=10, interval=0.1, what="the page to match the catalog")
    finally:
        drop_tenant(served, tenant_id)


def test_retry_activate_and_cancel_never_start_a_second_concurrent_run(
    served: Served, admin: Admin, client: httpx.Client
) -> None:
    tenant_id = create_tenant(client, admin)
    try:
        wait_status(client, admin, tenant_id, "active")
        wait_idle(client, admin, tenant_id)
        r = client.post(f"/api/tenants/{tenant_id}/retry", headers=admin.headers)
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        assert (
            client.post(f"/api/tenants/{tenant_id}/cancel", headers=admin.headers).status_code
            == 409
        )
        first = client.post(f"/api/tenants/{tenant_id}/activate", headers=admin.headers)
        assert first.status_code == 202, first.text
        second = client.post(f"/api/tenants/{tenant_id}/activate", headers=admin.headers)
        assert second.status_code == 409, second.text
        retry = client.post(f"/api/tenants/{tenant_id}/retry", headers=admin.headers)
        assert retry.status_code == 409
        wait_status(client, admin, tenant_id, "active")
        wait_idle(client, admin, tenant_id)
        runs = client.get(f"/api/tenants/{tenant_id}/provisioning", headers=admin.headers).json()[
            "runs"
        ]
        assert len(runs) == 2
        for verb in ("deactivate", "deactivate"):
            r = client.post(f"/api/tenants/{tenant_id}/{verb}", headers=admin.headers)
            assert r.status_code == 200 and r.json()["tenant"]["status"] == "deactivated"
        trail = client.get(f"/api/tenants/{tenant_id}/audit", headers=admin.headers).json()
        assert [e["event"] for e in trail["events"]].count("deactivated") == 1
    finally:
        drop_tenant(served, tenant_id)


def test_credentials_can_be_picked_up_exactly_once_and_never_reach_the_log(
    served: Served, admin: Admin, client: httpx.Client
) -> None:
    tenant_id = create_tenant(client, admin)
    try:
        wait_status(client, admin, tenant_id, "active")
        r = client.post(f"/api/tenants/{tenant_id}/credentials", headers=admin.headers)
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
        token = r.json()["reset_token"]
        assert len(token) >= 40
        again = client.post(f"/api/tenants/{tenant_id}/credentials", headers=admin.headers)
        assert again.status_code == 409
        trail = client.get(f"/api/tenants/{tenant_id}/audit", headers=admin.headers).text
        assert token not in trail and "credentials_delivered" in trail
        assert token not in served.log.read_text()
    finally:
        drop_tenant(served, tenant_id)


def test_tenant_admin_is_refused_once_the_tenant_is_deactivated_or_expired(
    served: Served, admin: Admin, client: httpx.Client
) -> None:
    user = provisioned_user(served, client, admin)
    try:
        me = f"/api/t/{user.tenant_id}/me"
        login = f"/api/t/{user.tenant_id}/auth/login"
        creds = {"email": user.email, "password": TENANT_PASSWORD}
        assert client.get(me, headers=bearer(user.token)).status_code == 200
        client.post(f"/api/tenants/{user.tenant_id}/deactivate", headers=admin.headers)
        r = client.get(me, headers=bearer(user.token))
        assert r.status_code == 403 and r.json()["error"]["code"] == "tenant_deactivated"
        assert client.post(login, json=creds).status_code == 403
        r = client.post(f"/api/tenants/{user.tenant_id}/activate", headers=admin.headers)
        assert r.status_code == 202
        wait_status(client, admin, user.tenant_id, "active")
        assert client.get(me, headers=bearer(user.token)).status_code == 200
        registry.set_fields(
            served.settings, user.tenant_id, valid_until=registry.utcnow() - dt.timedelta(seconds=1)
        )
        r = client.get(me, headers=bearer(user.token))
        assert r.status_code == 403 and r.json()["error"]["code"] == "tenant_expired"
        assert client.post(login, json=creds).status_code == 403
    finally:
        drop_tenant(served, user.tenant_id)


def test_reset_token_of_another_tenant_does_not_work(
    served: Served, admin: Admin, client: httpx.Client
) -> None:
    first, second = create_tenant(client, admin), create_tenant(client, admin)
    try:
        wait_status(client, admin, first, "active")
        wait_status(client, admin, second, "active")
        token = client.post(f"/api/tenants/{first}/credentials", headers=admin.headers).json()[
            "reset_token"
        ]
        body = {"token": token, "new_password": TENANT_PASSWORD}
        r = client.post(f"/api/t/{second}/auth/reset-password", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_token"
        assert client.post(f"/api/t/{first}/auth/reset-password", json=body).status_code == 200
        assert client.post(f"/api/t/{first}/auth/reset-password", json=body).status_code == 400
    finally:
        drop_tenant(served, first)
        drop_tenant(served, second)


# --- bad input ----------------------------------------------------------------------------------

HOSTILE_IDS = [
    "..%2F..%2Fetc",
    "a'%3B%20DROP%20TABLE%20tenants%3B--",
    "%00",
    "ROOT",
    "x" * 300,
    "t%C3%A9st",
    "pg_catalog%2Fx",
    "%252e%252e",
]
HUGE = b'{"id": "' + b"x" * (api.MAX_BODY + 10) + b'"}'


def snapshot(served: Served) -> tuple[int, int]:
    """Tenant rows and audit rows in the control plane: bad input must change neither."""
    import sqlalchemy as sa

    with registry.engine(served.settings).connect() as conn:
        tenants = conn.execute(sa.select(sa.func.count()).select_from(registry.tenants)).scalar()
        events = conn.execute(
            sa.select(sa.func.count()).select_from(registry.audit_events)
        ).scalar()
    return int(tenants or 0), int(events or 0)


CREATE_BAD: list[tuple[Any, int, str | None]] = [
    ({}, 422, "id"),
    ({"name": "n", "admin_email": "a@b.example"}, 422, "id"),
    ({"id": 5, "name": "n", "admin_email": "a@b.example"}, 422, "id"),
    (
        {"id": "Robert'); DROP TABLE tenants;--", "name": "n", "admin_email": "a@b.example"},
        422,
        "id",
    ),
    ({"id": "pg_evil", "name": "n", "admin_email": "a@b.example"}, 422, "id"),
    ({"id": "root", "name": "n", "admin_email": "a@b.example"}, 422, "id"),
    ({"id": "ok_id_1", "name": "\x00bad", "admin_email": "a@b.example"}, 422, "name"),
    ({"id": "ok_id_1", "name": ["n"], "admin_email": "a@b.example"}, 422, "name"),
    ({"id": "ok_id_1", "name": "n", "admin_email": "not an email"}, 422, "admin_email"),
    (
        {"id": "ok_id_1", "name": "n", "admin_email": "a@b.example", "modules": "identity"},
        422,
        "modules",
    ),
    (
        {"id": "ok_id_1", "name": "n", "admin_email": "a@b.example", "modules": ["auditing"]},
        422,
        "modules",
    ),
    (
        {"id": "ok_id_1", "name": "n", "admin_email": "a@b.example", "provider": "oracle"},
        422,
        "provider",
    ),
    (
        {"id": "ok_id_1", "name": "n", "admin_email": "a@b.example", "demo_data": "yes"},
        422,
        "demo_data",
    ),
    (
        {"id": "ok_id_1", "name": "n", "admin_email": "a@b.example", "valid_until": 12},
        422,
        "valid_until",
    ),
    (
        {
            "id": "ok_id_1",
            "name": "n",
            "admin_email": "a@b.example",
            "valid_until": "2001-01-01T00:00:00+00:00",
        },
        422,
        "valid_until",
    ),
    (
        {"id": "ok_id_1", "name": "n", "admin_email": "a@b.example", "location": "postgres"},
        422,
        "location",
    ),
    ({"id": "ok_id_1", "name": "n", "admin_email": "a@b.example", "is_admin": True}, 422, "body"),
    ([1, 2], 400, None),
    ("a string", 400, None),
]


def test_bad_create_requests_get_the_documented_error_and_change_nothing(
    served: Served, admin: Admin, client: httpx.Client
) -> None:
    before = snapshot(served)
    for body, status, field_name in CREATE_BAD:
        r = client.post("/api/tenants", json=body, headers=admin.headers)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"code", "message", "details"}
        if field_name:
            assert field_name in error["details"], (body, error)
    raw = [
        (b"{not json", 400),
        (b"\xff\xfe", 400),
        (HUGE, 413),
        (b"[" * 100_000, 413),
        (b"[" * 50_000, 400),
    ]
    for content, status in raw:
        r = client.post(
            "/api/tenants",
            content=content,
            headers={**admin.headers, "Content-Type": "application/json"},
        )
        assert r.status_code == status, (content[:20], r.text)
        assert "Traceback" not in r.text and "postgres" not in r.text.lower()
    assert client.get("/api/tenants/ok_id_1", headers=admin.headers).status_code == 404
    assert snapshot(served) == before


def test_bad_input_on_every_other_endpoint_gets_the_documented_error_and_changes_nothing(
    served: Served, admin: Admin, client: httpx.Client, tenant_user: TenantUser
) -> None:
    t = tenant_user.tenant_id
    before = snapshot(served)
    cases: list[tuple[str, str, Any, int]] = []
    for hostile in HOSTILE_IDS + [MISSING]:
        for suffix in ("", "/provisioning", "/audit"):
            cases.append(("GET", f"/api/tenants/{hostile}{suffix}", None, 404))
        for verb in (*api.ACTIONS, "credentials"):
            cases.append(("POST", f"/api/tenants/{hostile}/{verb}", None, 404))
        cases.append(
            (
                "POST",
                f"/api/t/{hostile}/auth/reset-password",
                {"token": "x", "new_password": TENANT_PASSWORD},
                404,
            )
        )
        cases.append(
            ("POST", f"/api/t/{hostile}/auth/login", {"email": "a@b.example", "password": "x"}, 404)
        )
    for verb in (*api.ACTIONS, "credentials"):
        cases.append(("POST", f"/api/tenants/{t}/{verb}", {"force": True}, 422))
        cases.append(("POST", f"/api/tenants/{t}/{verb}", [1], 400))
    for query in (
        "limit=abc",
        "limit=0",
        "limit=100000",
        "offset=-1",
        "status=bogus",
        "offset=1e9",
    ):
        cases.append(("GET", f"/api/tenants?{query}", None, 400))
    reset = f"/api/t/{t}/auth/reset-password"
    cases += [
        ("POST", reset, {}, 422),
        ("POST", reset, {"token": "x"}, 422),
        ("POST", reset, {"token": 1, "new_password": TENANT_PASSWORD}, 422),
        ("POST", reset, {"token": "x", "new_password": "short"}, 422),
        ("POST", reset, {"token": "x", "new_password": "y" * 2000}, 422),
        ("POST", reset, {"token": "x", "new_password": TENANT_PASSWORD, "role": "admin"}, 422),
        ("POST", reset, {"token": "x" * 5000, "new_password": TENANT_PASSWORD}, 400),
        ("POST", reset, "nope", 400),
    ]
    login = f"/api/t/{t}/auth/login"
    cases += [
        ("POST", login, {}, 422),
        ("POST", login, {"email": ["a"], "password": "x"}, 422),
        ("POST", login, {"email": "a@b.example"}, 422),
        ("POST", "/auth/login", {"email": 1, "password": "x"}, 422),
        ("POST", "/auth/login", [], 400),
        ("GET", "/api/nope", None, 404),
        ("DELETE", "/api/tenants", None, 405),
    ]
    wrong = []
    for method, path, body, status in cases:
        headers = admin.headers if not path.startswith(("/api/t/", "/auth/")) else {}
        r = client.request(method, path, json=body, headers=headers)
        ok = r.status_code == status and set(r.json().get("error", {})) == {
            "code",
            "message",
            "details",
        }
        if not ok:
            wrong.append(
                f"{method} {path} {str(body)[:40]}: want {status}, got "
                f"{r.status_code} {r.text[:150]}"
            )
    for path in (f"/api/tenants/{t}/retry", reset, login):
        headers = {**admin.headers, "Content-Type": "application/json"}
        r = client.post(path, content=HUGE, headers=headers)
        if r.status_code != 413:
            wrong.append(f"POST {path} huge: {r.status_code}")
    assert not wrong, "\n".join(wrong)
    tenant = client.get(f"/api/tenants/{t}", headers=admin.headers).json()["tenant"]
    assert tenant["status"] == "active"
    # Only the throttle's own bookkeeping may have been written, not tenants or audit rows.
    assert snapshot(served) == before


# --- OpenAPI ------------------------------------------------------------------------------------


def test_openapi_document_is_valid_openapi_3_and_lists_every_mounted_route(
    served: Served, admin: Admin, client: httpx.Client
) -> None:
    doc = client.get("/api/openapi.json", headers=admin.headers).json()
    validate(doc)
    assert doc["openapi"].startswith("3.")
    undocumented = [
        (p, m)
        for p, ops in doc["paths"].items()
        for m, op in ops.items()
        if op.get("x-undocumented")
    ]
    assert not undocumented
    for path in (
        "/api/tenants",
        "/api/tenants/{id}/provisioning",
        "/api/t/{tenant}/me",
        "/api/tenants/{id}/credentials",
        "/dagster/graphql",
        "/auth/login",
    ):
        assert path in doc["paths"]
    # Every documented operation is really routed: nothing answers with the router's 404/405.
    for path, method, _op in spec_operations(served, admin):
        if (path, method) in SKIP_STATEFUL:
            continue
        r = call(client, method, concrete(path, MISSING), BODIES.get((path, method)), admin.headers)
        unrouted = error_code(r) == "method_not_allowed" or (
            r.status_code == 404
            and error_code(r) == "not_found"
            and r.json()["error"]["message"] == "Not Found"
        )
        assert not unrouted, (method, path, r.status_code, r.text[:200])


def test_openapi_document_matches_the_route_table_exactly() -> None:
    app = Starlette(
        routes=[
            *api.routes(api.Service(None, None)),  # type: ignore[arg-type]
            *auth.login_routes(None),
        ]
    )  # type: ignore[arg-type]
    table = api.route_table(app)
    doc = api.openapi_document(table)
    listed = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    assert set(table) | set(api.DAGSTER_ROUTES) == listed
    assert not [
        p for p, ops in doc["paths"].items() for op in ops.values() if op.get("x-undocumented")
    ]
    validate(doc)


def test_pickup_of_a_tenant_that_emails_its_token_is_a_conflict(
    served: Served, admin: Admin, client: httpx.Client, tenant_user: TenantUser
) -> None:
    # tenant_user's token was already picked up: a second pickup must not mint a new one.
    r = client.post(f"/api/tenants/{tenant_user.tenant_id}/credentials", headers=admin.headers)
    assert r.status_code == 409
    tenant = registry.get_tenant(served.settings, tenant_user.tenant_id)
    assert tenant.credentials_state == "delivered"
    assert delivery.reset_link(served.settings, tenant).endswith(
        f"/api/t/{tenant_user.tenant_id}/auth/reset-password"
    )


# --- a real browser (headless Chromium over the DevTools protocol) ----------------------------


class Chromium:
    """Headless Chromium driven through the DevTools protocol (no extra packages)."""

    def __init__(self, binary: str, profile: Path) -> None:
        import subprocess

        port = free_port()
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--remote-debugging-port={port}",
                "--remote-allow-origins=*",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def page_url() -> str | None:
            with contextlib.suppress(httpx.HTTPError):
                pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                return next((p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page"), None)
            return None

        from websockets.sync.client import connect

        self.ws = connect(wait_for(page_url, timeout=30, what="chromium"), max_size=None)
        self.next_id = 0

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == self.next_id:
                return dict(message.get("result", {}))

    def eval(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        return result.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def wait(self, expression: str, what: str) -> Any:
        try:
            return wait_for(lambda: self.eval(expression), timeout=60, interval=0.2, what=what)
        except AssertionError as exc:
            page = self.eval("location.href + ' ' + (document.body || {}).innerText")
            raise AssertionError(f"{exc}; the page is {str(page)[:500]}") from None

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium is not installed")
def test_browser_logs_in_uses_the_ui_and_cannot_be_driven_by_another_origin(
    served: Served, admin: Admin, client: httpx.Client, tmp_path: Path
) -> None:
    tenant_id = create_tenant(client, admin)
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    (evil_dir / "index.html").write_text("<!doctype html><title>evil</title><p>hello</p>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(evil_dir))
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    browser = Chromium(str(shutil.which("chromium")), tmp_path / "profile")
    try:
        wait_status(client, admin, tenant_id, "active")
        browser.goto(served.url + "/dagster/runs")
        browser.wait(
            "location.pathname === '/auth/login' && document.readyState === 'complete'"
            " && !!document.getElementById('login')",
            "the login page",
        )
        assert browser.eval(
            f"document.querySelector('[name=email]').value = {json.dumps(admin.email)};"
            f"document.querySelector('[name=password]').value = {json.dumps(PASSWORD)};"
            "document.getElementById('login').submit(); true"
        )
        browser.wait("location.pathname === '/dagster/runs'", "the UI after login")
        assert browser.eval("document.cookie") == "", "the session cookie is HttpOnly"
        browser.wait("document.querySelectorAll('script').length > 0", "the UI shell")
        mutation = json.dumps({"query": 'mutation { terminateRun(runId: "x") { __typename } }'})
        status = browser.eval(
            "fetch('/dagster/graphql', {method: 'POST', headers: {'Content-Type': "
            f"'application/json'}}, body: {json.dumps(mutation)}}}).then(r => r.status)"
        )
        assert status == 200, "the UI's own same-origin mutations work"
        # Another origin on the same site (same host, other port): SameSite lets the
        # cookie through, so only the Origin check stands between the page and the API.
        browser.goto(f"http://127.0.0.1:{evil.server_address[1]}/index.html")
        browser.wait(
            "document.title === 'evil' && document.readyState === 'complete'", "the attacker's page"
        )
        for action in (
            f"/api/tenants/{tenant_id}/deactivate",
            "/dagster/graphql?query=mutation%7BterminateRun(runId:%22x%22)%7B__typename%7D%7D",
        ):
            assert browser.eval(
                "const f = document.createElement('form'); f.method = 'POST';"
                f"f.action = {json.dumps(served.url + action)};"
                "document.body.appendChild(f); f.submit(); true"
            )
            text = browser.wait(
                f"location.origin === {json.dumps(served.url)} && document.body.innerText",
                "the refused form post",
            )
            assert "csrf_failed" in text
            browser.goto(f"http://127.0.0.1:{evil.server_address[1]}/index.html")
            browser.wait(
                "document.title === 'evil' && document.readyState === 'complete'",
                "the attacker's page again",
            )
        tenant = client.get(f"/api/tenants/{tenant_id}", headers=admin.headers).json()
        assert tenant["tenant"]["status"] == "active"
    finally:
        browser.close()
        evil.shutdown()
        drop_tenant(served, tenant_id)


def listed(client: httpx.Client, admin: Admin, tenant_id: str) -> dict[str, Any] | None:
    """The tenant as ``GET /api/tenants`` pages show it (None if it is on no page)."""
    offset = 0
    while True:
        r = client.get(
            "/api/tenants", params={"limit": 500, "offset": offset}, headers=admin.headers
        )
        assert r.status_code == 200, r.text
        body = r.json()
        for item in body["items"]:
            if item["id"] == tenant_id:
                return dict(item)
        offset += len(body["items"])
        if not body["items"] or offset >= body["total"]:
            return None


def test_status_reads_show_own_writes_at_once_and_other_processes_changes_soon(
    served: Served, client: httpx.Client, admin: Admin
) -> None:
    tenant_id = create_tenant(client, admin)
    try:
        # Read-your-writes: the create answered only after the read model took it in.
        assert listed(client, admin, tenant_id) is not None
        wait_status(client, admin, tenant_id, "active")

        # The last step marks the tenant active just before its run ends: the run's SUCCESS
        # shows within the read model's freshness (readmodel.POLL_S).
        def succeeded() -> bool:
            path = f"/api/tenants/{tenant_id}/provisioning"
            runs = client.get(path, headers=admin.headers).json()["runs"]
            return bool(runs) and runs[0]["status"] == "SUCCESS"

        wait_for(succeeded, timeout=5, interval=0.05, what="the run's SUCCESS")
        # A change made by another process (this test, straight into the catalog).
        registry.set_fields(served.settings, tenant_id, status_reason="changed elsewhere")

        def seen() -> bool:
            item = listed(client, admin, tenant_id)
            return item is not None and item["status_reason"] == "changed elsewhere"

        wait_for(seen, timeout=10, interval=0.1, what="the list to show the change")
        # A new run: its provisioning answer is read again, not served from the kept one.
        r = client.post(f"/api/tenants/{tenant_id}/activate", json={}, headers=admin.headers)
        assert r.status_code == 202, r.text
        again = client.get(f"/api/tenants/{tenant_id}/provisioning", headers=admin.headers)
        assert len(again.json()["runs"]) == 2, again.text
        wait_status(client, admin, tenant_id, "active")
    finally:
        drop_tenant(served, tenant_id)


def test_polled_reads_answered_from_the_read_model_equal_the_routes_and_the_rest_passes(
    settings: Settings,
) -> None:
    from conftest import Tenants

    from tenant_pipelines import readmodel

    t = Tenants(settings)
    known = [t.create().id for _ in range(3)]
    model = readmodel.ReadModel(settings, registry.Tenant.to_json)
    model.refresh()
    tenant = model.tenant(known[0])
    assert tenant is not None
    kept = model.keep_provisioning(tenant, {"tenant_id": tenant.id, "runs": []}, time.time())
    passed: list[str] = []

    async def routes(scope: Any, receive: Any, send: Any) -> None:
        passed.append(f"{scope['method']} {scope['path']}?{scope['query_string'].decode()}")
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def get_all(calls: list[tuple[str, str]]) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=api.StatusReads(routes, model))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return [await c.request(method, url) for method, url in calls]

    fast = [
        ("GET", "/api/tenants"),
        ("GET", "/api/tenants?limit=2&offset=1"),
        ("GET", "/api/tenants?status=requested&limit=1&limit=2"),  # the last value counts
        ("GET", f"/api/tenants/{known[0]}/provisioning"),
    ]
    answers = asyncio.run(get_all(fast))
    assert passed == []
    items, total = registry.list_tenants(settings, None, 50, 0)
    expected = {"items": [x.to_json() for x in items], "total": total, "limit": 50, "offset": 0}
    assert answers[0].json() == expected
    assert [x["id"] for x in answers[1].json()["items"]] == [x.id for x in items[1:3]]
    assert answers[2].json()["limit"] == 2 and answers[2].json()["total"] == len(known)
    assert answers[3].content == kept
    assert all(r.headers["content-type"] == "application/json" for r in answers)
    assert all(int(r.headers["content-length"]) == len(r.content) for r in answers)

    # Bad queries, tenants with no kept answer, other methods and paths: the routes answer.
    others = [
        ("GET", "/api/tenants?limit=0"),
        ("GET", "/api/tenants?limit=x"),
        ("GET", "/api/tenants?status=bogus"),
        ("GET", f"/api/tenants/{known[1]}/provisioning"),
        ("GET", "/api/tenants/nobody/provisioning"),
        ("GET", f"/api/tenants/x/{known[0]}/provisioning"),
        ("HEAD", "/api/tenants"),
        ("POST", "/api/tenants"),
        ("GET", "/api/tenants/"),
        ("GET", f"/api/tenants/{known[0]}"),
    ]
    assert [r.status_code for r in asyncio.run(get_all(others))] == [418] * len(others)
    assert len(passed) == len(others)
