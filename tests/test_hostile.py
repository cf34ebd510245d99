"""Hostile input and load against a real ``tenantctl serve``: hypothesis-generated create
requests and path identifiers over the HTTP API, ``tenantctl create`` subprocesses, and 50
readers with 20 provisions at once. Every input is accepted as valid or refused with a 4xx in
the documented error shape (CLI: one error line, non-zero exit, no traceback), and a refused
input leaves no tenant row, audit row, database, schema, file or Dagster partition behind."""

import contextlib
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from conftest import PG_LIBPQ, REPO, Served, uid, wait_for
from dagster import DagsterInstance
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from tenant_pipelines import auth, registry
from tenant_pipelines.providers import provider_for
from tenant_pipelines.settings import Settings

pytestmark = pytest.mark.slow

NASTY = [
    "Robert'); DROP TABLE tenants;--",
    "x' OR '1'='1",
    '"; DROP DATABASE postgres; --',
    "a\x00b",
    "\x00",
    "../../etc/passwd",
    "..\\..\\windows",
    "/tmp/evil.db",
    "tenant_../../x",
    "pg_catalog",
    "postgres",
    "template1",
    "root",
    "tenant_shared",
    "ÄÖÜ",
    "t\u0301est",
    "\u202etxt.exe",
    "😀" * 10,
    "a\nb",
    "tab\there",
    "\x1b[31mred",
    "%00",
    "%2e%2e%2f",
    "{{7*7}}",
    "${jndi:ldap://x}",
    "<script>alert(1)</script>",
    "",
    " ",
    "A" * 41,
    "a" * 10_240,
    "é" * 5_000,
]
hostile_text = st.one_of(
    st.sampled_from(NASTY),
    st.text(max_size=60),
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=60),
    st.builds(lambda a, b: a + b, st.sampled_from(NASTY), st.text(max_size=10)),
)
wrong_type = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
valid_id = st.builds(lambda: uid("h"))
ident = st.one_of(valid_id, hostile_text, wrong_type)
email = st.one_of(
    st.just("owner@hostile.example.com"),
    st.builds(lambda s: f"{s}@hostile.example.com", hostile_text),
    hostile_text,
    wrong_type,
)
create_body = st.fixed_dictionaries(
    {"id": ident, "name": st.one_of(hostile_text, wrong_type), "admin_email": email},
    optional={
        "provider": st.one_of(st.sampled_from(["postgresql", "sqlite", "mssql"]), hostile_text),
        "strategy": st.one_of(st.sampled_from(["database", "schema"]), hostile_text),
        "location": st.one_of(st.builds(lambda: uid("loc")), hostile_text, wrong_type),
        "modules": st.one_of(
            st.lists(st.sampled_from(["identity", "tenant_settings", "auditing"]), max_size=4),
            st.lists(hostile_text, max_size=3),
            wrong_type,
        ),
        "demo_data": st.one_of(st.booleans(), wrong_type, hostile_text),
        "valid_until": st.one_of(st.just("2999-01-01T00:00:00+00:00"), hostile_text, wrong_type),
        "is_admin": wrong_type,
        "__proto__": wrong_type,
        "id ": hostile_text,
    },
)


class Target:
    """The served service, an API token, and what its accepted tenants are called."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.settings = served.settings
        token = auth.create_api_token(served.settings, uid("hostile"), "test")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.client = httpx.Client(base_url=served.url, timeout=60)
        self.accepted: list[str] = []
        self.home = served.data_dir / "dagster"

    def partitions(self) -> set[str]:
        with DagsterInstance.from_config(str(self.home)) as instance:
            return set(instance.get_dynamic_partitions("tenants"))


@pytest.fixture(scope="module")
def target(served: Served) -> Iterator[Target]:
    t = Target(served)
    yield t
    t.client.close()
    for tenant_id in t.accepted:
        wait_for(
            lambda tid=tenant_id: (
                registry.get_tenant(t.settings, tid).status in registry.FINAL_STATUSES
            ),
            timeout=180,
            interval=0.5,
            what=f"{tenant_id} final",
        )
        with contextlib.suppress(Exception):
            provider_for(t.settings, registry.get_tenant(t.settings, tenant_id)).drop()


def _pg_names() -> tuple[set[str], set[str]]:
    """Databases on the tenant server, and schemas in its shared schema-per-tenant database."""
    with psycopg.connect(PG_LIBPQ, autocommit=True) as conn:
        dbs = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
    schemas: set[str] = set()
    if "tenant_shared" in dbs:
        with psycopg.connect(PG_LIBPQ.rsplit("/", 1)[0] + "/tenant_shared") as conn:
            schemas = {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace")}
    return dbs, schemas


def _files(settings: Settings) -> set[str]:
    root = settings.data_dir
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".db", ".sqlite")}


def _rows_for(settings: Settings, tenant_id: Any) -> tuple[int, int]:
    """Catalog and audit rows carrying ``tenant_id`` (0, 0 for values no query can carry)."""
    if not isinstance(tenant_id, str) or "\x00" in tenant_id or not tenant_id:
        return 0, 0
    with registry.engine(settings).connect() as conn:
        t = conn.execute(
            sa.select(sa.func.count())
            .select_from(registry.tenants)
            .where(registry.tenants.c.id == tenant_id)
        ).scalar()
        a = conn.execute(
            sa.select(sa.func.count())
            .select_from(registry.audit_events)
            .where(registry.audit_events.c.tenant_id == tenant_id)
        ).scalar()
    return int(t or 0), int(a or 0)


def _assert_error_shape(r: httpx.Response) -> dict[str, Any]:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert isinstance(body["error"]["details"], dict)
    text = r.text.lower()
    assert "traceback" not in text and "select " not in text and "postgresql://" not in text
    return dict(body["error"])


HYPO = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=False,
)


@HYPO
@given(body=create_body)
@example(body={"id": "a\x00b", "name": "n", "admin_email": "a@b.example.com"})
@example(
    body={"id": "ok_hostile", "name": "n", "admin_email": "a@b.example.com", "location": "../../x"}
)
@example(body={"id": "x" * 10_240, "name": "y" * 10_240, "admin_email": "z" * 10_240})
@example(body={"id": ["a"], "name": {"$ne": 1}, "admin_email": None, "modules": "identity"})
def test_hostile_create_bodies_are_accepted_or_refused_with_the_error_shape_leaving_nothing(
    target: Target, body: dict[str, Any]
) -> None:
    before_dbs, before_schemas = _pg_names()
    before_files = _files(target.settings)
    before_parts = target.partitions()
    existed = _rows_for(target.settings, body.get("id"))
    r = target.client.post("/api/tenants", json=body, headers=target.headers)
    assert r.status_code < 500, (body, r.text[:500])
    if r.status_code == 202:
        tenant = r.json()["tenant"]
        assert tenant["id"] == body["id"]
        target.accepted.append(tenant["id"])
        return
    error = _assert_error_shape(r)
    assert error["code"] in ("invalid", "bad_json", "conflict"), error
    if error["code"] == "conflict":
        assert existed[0] == 1
        return
    after = _rows_for(target.settings, body.get("id"))
    # An existing tenant (the service's root) keeps its one row; anything else has none.
    assert after == (0, 0) if existed[0] == 0 else after[0] == 1
    # Whatever appeared meanwhile must belong to a tenant row (the service's root tenant and
    # the accepted examples are provisioning in the background).
    known = _catalog(target.settings)
    dbs, schemas = _pg_names()
    prefix = target.settings.location_prefix
    assert not {d for d in dbs - before_dbs if d.startswith(prefix) and d not in known}
    for name in (body.get("location"), f"{prefix}{body.get('id')}"):
        if isinstance(name, str) and name not in known:
            assert name not in dbs - before_dbs and name not in schemas - before_schemas
    new_files = _files(target.settings) - before_files
    assert not {f for f in new_files if not any(k in f for k in known)}, new_files
    new_parts = target.partitions() - before_parts
    assert new_parts <= known, new_parts


def _catalog(settings: Settings) -> set[str]:
    """Ids and locations of every tenant row."""
    with registry.engine(settings).connect() as conn:
        rows = conn.execute(sa.select(registry.tenants.c.id, registry.tenants.c.location)).all()
    return {r.id for r in rows} | {r.location for r in rows}


@HYPO
@given(raw=hostile_text, verb=st.sampled_from(["", "/provisioning", "/audit", "/health"]))
@example(raw="0/", verb="")  # decodes to a trailing slash: once a 307, not an error
def test_hostile_identifiers_in_paths_are_a_404_in_the_error_shape_and_change_nothing(
    target: Target, raw: str, verb: str
) -> None:
    assume(raw.strip("/"))  # "/api/tenants/" is the collection's path, not an id
    # Dot segments never reach the server: the HTTP client resolves "/api/tenants/." to the
    # collection itself (RFC 3986 remove_dot_segments).
    assume(raw.strip("/") not in (".", ".."))
    # Real tenants (the service's root) are not hostile input: acting on them is legitimate.
    assume(_rows_for(target.settings, raw)[0] == 0)
    path = urllib.parse.quote(raw, safe="")
    for method, url in (
        ("GET", f"/api/tenants/{path}{verb}"),
        ("POST", f"/api/tenants/{path}/retry"),
        ("POST", f"/api/tenants/{path}/cancel"),
        ("POST", f"/api/tenants/{path}/credentials"),
    ):
        r = target.client.request(method, url, headers=target.headers)
        error = _assert_error_shape(r)
        assert r.status_code in (400, 404, 405, 409), (url, r.status_code, error)
    assert _rows_for(target.settings, raw) == (0, 0)


@HYPO
@given(
    content=st.one_of(
        st.binary(max_size=200),
        st.sampled_from(
            [b"\x00", b"{", b"null", b"[]", b'"x"', b"1e999999", b'{"id": "\xff"}', b"{" * 5000]
        ),
    )
)
def test_raw_non_json_bodies_are_a_400_and_change_nothing(target: Target, content: bytes) -> None:
    before = target.partitions()
    r = target.client.post(
        "/api/tenants",
        content=content,
        headers={**target.headers, "Content-Type": "application/json"},
    )
    if r.status_code == 202:  # only a valid JSON object with valid fields gets here
        target.accepted.append(r.json()["tenant"]["id"])
        return
    _assert_error_shape(r)
    assert target.partitions() - before <= _catalog(target.settings)


# --- the CLI ---

argv_text = hostile_text.map(lambda s: s.replace("\x00", ""))  # argv cannot carry NUL


def _tenantctl(target: Target, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
    env.update(target.served.env)
    env["DAGSTER_HOME"] = str(target.home)
    return subprocess.run(
        [sys.executable, "-m", "tenant_pipelines.cli", "create", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(tenant_id=argv_text, name=argv_text, admin_email=argv_text, location=argv_text)
@example(
    tenant_id="x'; DROP TABLE tenants;--",
    name="n",
    admin_email="a@b.example.com",
    location="../../etc",
)
@example(tenant_id="ok_cli_hostile", name="\x1b[2J", admin_email="a@b.c", location="")
def test_hostile_cli_create_is_one_error_line_and_a_nonzero_exit_leaving_nothing(
    target: Target, tenant_id: str, name: str, admin_email: str, location: str
) -> None:
    args = [f"--name={name}", f"--admin-email={admin_email}"]
    if location:
        args.append(f"--location={location}")
    before = target.partitions()
    existed = _rows_for(target.settings, tenant_id)
    proc = _tenantctl(target, *args, "--", tenant_id)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    if proc.returncode == 0:
        target.accepted.append(tenant_id)
        return
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    if existed[0] == 0:
        assert _rows_for(target.settings, tenant_id) == (0, 0)
    assert target.partitions() - before <= _catalog(target.settings)


# --- load ---

LOAD_SECONDS = float(os.environ.get("TP_TEST_LOAD_SECONDS", "30"))


def test_fifty_readers_and_twenty_provisions_get_no_5xx_and_every_tenant_ends_final(
    target: Target,
) -> None:
    ids = [uid("load") for _ in range(20)]
    codes: Counter[int] = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + LOAD_SECONDS
    paths = ["/api/tenants?limit=20", "/api/me", "/health/ready"]

    ready: Counter[str] = Counter()

    def note(r: httpx.Response) -> None:
        with lock:
            if r.request.url.path == "/health/ready":
                # Readiness is not an API call: a probe that takes over 3 s answers 503 by
                # design (health.CHECK_TIMEOUT_S). Counted and reported, not asserted.
                down = [k for k, v in r.json()["components"].items() if v["status"] != "ok"]
                ready[f"{r.status_code} {','.join(down)}"] += 1
                return
            codes[r.status_code] += 1
            if r.status_code >= 500:
                errors.append(f"{r.request.method} {r.request.url.path} {r.status_code}")

    def reader(n: int) -> None:
        with httpx.Client(base_url=target.served.url, timeout=60) as client:
            i = n
            while time.monotonic() < stop:
                i += 1
                tenant_id = ids[i % len(ids)]
                path = [
                    *paths,
                    f"/api/tenants/{tenant_id}",
                    f"/api/tenants/{tenant_id}/provisioning",
                    f"/api/tenants/{tenant_id}/audit",
                ][i % 6]
                try:
                    note(client.get(path, headers=target.headers))
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(f"GET {path}: {type(exc).__name__}")

    def provision(tenant_id: str) -> None:
        body = {"id": tenant_id, "name": "Load", "admin_email": f"o@{tenant_id[-6:]}.example.com"}
        with httpx.Client(base_url=target.served.url, timeout=120) as client:
            r = client.post("/api/tenants", json=body, headers=target.headers)
            note(r)
            if r.status_code == 202:
                with lock:
                    target.accepted.append(tenant_id)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(50)]
    threads += [threading.Thread(target=provision, args=(t,)) for t in ids]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - started
    assert not errors, (errors[:20], codes)
    assert codes[202] == 20, codes

    def all_final() -> bool:
        return all(
            registry.get_tenant(target.settings, t).status in registry.FINAL_STATUSES for t in ids
        )

    wait_for(all_final, timeout=300, interval=1, what="every load tenant final")
    finals = Counter(registry.get_tenant(target.settings, t).status for t in ids)
    print(f"load: {sum(codes.values())} API requests in {took:.0f}s {dict(codes)}; finals {finals}")
    print(f"load: /health/ready answers {dict(ready)}")
    assert finals == Counter({"active": 20}), finals
