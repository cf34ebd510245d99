"""Liveness, readiness, the full health report, Prometheus metrics and per-tenant health.

- ``GET /health/live``: the process answers (public).
- ``GET /health/ready``: each component (control-plane database, Dagster instance storage,
  daemon heartbeats, Redis when enabled) and tenant counts; ``ok`` and ``degraded`` answer
  200, a component that is down answers 503 (public: no tenant names, no errors' text).
- ``GET /health``: the same plus the failed and degraded tenants with their scrubbed errors.
- ``GET /metrics``: Prometheus text, derived from the control plane at scrape time.
- ``GET /api/tenants/{id}/health``: runs the verification checks for one tenant.

Who may call what is decided by the authentication middleware, not here. The status model is
documented in docs/observability.md.
"""

import asyncio
import datetime as dt
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import cache, identity, registry, telemetry
from .settings import Settings

if TYPE_CHECKING:
    from dagster import DagsterInstance

    from .api import Service

CHECK_TIMEOUT_S = 3.0
# A report is reused this long: readiness probes are frequent and answers change slowly.
REPORT_TTL_S = 1.0
# The daemon writes a heartbeat every 30 s; two missed beats mean it is gone.
DAEMON_STALE_AFTER_S = 90.0
LIST_LIMIT = 100
REDIS_BATCH = 1000


async def live(_request: Request) -> Response:
    """The process answers."""
    return JSONResponse({"status": "ok"})


# --- components ------------------------------------------------------------------------------


def _timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        out = fn()
        out.setdefault("status", "ok")
    except Exception as exc:  # any failure of a probe means the component is down
        out = {"status": "down", "error": telemetry.scrub(f"{type(exc).__name__}: {exc}")[:500]}
    out["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return out


def check_control_plane(settings: Settings) -> dict[str, Any]:
    """The control-plane database answers a query on the catalog."""

    def probe() -> dict[str, Any]:
        with registry.engine(settings).connect() as conn:
            conn.execute(sa.select(sa.func.count()).select_from(registry.tenants)).scalar_one()
        return {"backend": registry.engine(settings).dialect.name}

    return _timed(probe)


def check_dagster_storage(instance: "DagsterInstance") -> dict[str, Any]:
    """Dagster's run storage and event-log storage answer."""

    def probe() -> dict[str, Any]:
        instance.get_run_records(limit=1)
        instance.event_log_storage.get_maximum_record_id()
        return {}

    return _timed(probe)


def check_daemon(instance: "DagsterInstance", now: float | None = None) -> dict[str, Any]:
    """Every daemon this instance needs sent a heartbeat within :data:`DAEMON_STALE_AFTER_S`."""

    def probe() -> dict[str, Any]:
        current = time.time() if now is None else now
        heartbeats = instance.get_daemon_heartbeats()
        daemons: dict[str, Any] = {}
        for daemon_type in instance.get_required_daemon_types():
            beat = heartbeats.get(daemon_type)
            if beat is None:
                daemons[daemon_type] = {"status": "down", "last_heartbeat_age_s": None}
                continue
            age = max(current - beat.timestamp, 0.0)
            daemons[daemon_type] = {
                "status": "ok" if age <= DAEMON_STALE_AFTER_S else "down",
                "last_heartbeat_age_s": round(age, 1),
                "errors": len(beat.errors or []),
            }
        down = sorted(k for k, v in daemons.items() if v["status"] != "ok")
        out: dict[str, Any] = {"status": "down" if down else "ok", "daemons": daemons}
        if down:
            out["error"] = "no recent heartbeat from: " + ", ".join(down)
        return out

    return _timed(probe)


def check_redis(settings: Settings) -> dict[str, Any]:
    """Redis answers PING (``disabled`` when no Redis is configured)."""
    if not settings.redis_url:
        return {"status": "disabled"}

    def probe() -> dict[str, Any]:
        cache.client(settings.redis_url).ping()
        return {}

    return _timed(probe)


# --- tenants ---------------------------------------------------------------------------------


def degraded_tenants(settings: Settings, active_ids: list[str]) -> dict[str, str]:
    """Active tenants whose permission cache is unusable, with the reason.

    A cheap, bulk version of the verification's cache check: each role's cached set is
    compared with the catalog's role permissions, in pipelined batches. With Redis down every
    active tenant is degraded. The full verification runs per tenant on
    ``GET /api/tenants/{id}/health``.
    """
    if not settings.redis_url or not active_ids:
        return {}
    expected = {role: set(perms) for role, perms in identity.ROLE_PERMISSIONS.items()}
    roles = sorted(expected)
    out: dict[str, str] = {}
    try:
        client = cache.client(settings.redis_url)
        for start in range(0, len(active_ids), REDIS_BATCH):
            batch = active_ids[start : start + REDIS_BATCH]
            with client.pipeline(transaction=False) as pipe:
                for tenant_id in batch:
                    for role in roles:
                        pipe.smembers(cache.role_key(tenant_id, role))
                results = pipe.execute()
            for i, tenant_id in enumerate(batch):
                got = results[i * len(roles) : (i + 1) * len(roles)]
                bad = [
                    role
                    for role, members in zip(roles, got, strict=True)
                    if {m.decode() for m in members} != expected[role]
                ]
                if bad:
                    out[tenant_id] = "cache missing roles: " + ", ".join(bad)
    except Exception as exc:  # Redis down or refusing: no tenant can use its cache
        reason = telemetry.scrub(f"cache unreachable: {type(exc).__name__}")
        return dict.fromkeys(active_ids, reason)
    return out


def tenant_summary(settings: Settings, *, with_lists: bool) -> dict[str, Any]:
    """Counts of ready, provisioning, degraded and failed tenants (and the lists, if asked).

    ``ready`` is active and not degraded; ``degraded`` is active with an unusable cache;
    ``provisioning`` counts ``requested`` and ``provisioning``.
    """
    t = registry.tenants
    with registry.engine(settings).connect() as conn:
        counts = {
            str(s): int(n)
            for s, n in conn.execute(sa.select(t.c.status, sa.func.count()).group_by(t.c.status))
        }
        active_ids = list(
            conn.execute(
                sa.select(t.c.id).where(t.c.status == "active", t.c.is_active.is_(True))
            ).scalars()
        )
        failed_rows = (
            conn.execute(
                sa.select(t.c.id, t.c.status_reason, t.c.updated_at, t.c.run_id, t.c.correlation_id)
                .where(t.c.status == "failed")
                .order_by(t.c.updated_at.desc())
                .limit(LIST_LIMIT)
            ).all()
            if with_lists
            else []
        )
    degraded = degraded_tenants(settings, active_ids)
    out: dict[str, Any] = {
        "ready": len(active_ids) - len(degraded),
        "provisioning": counts.get("requested", 0) + counts.get("provisioning", 0),
        "degraded": len(degraded),
        "failed": counts.get("failed", 0),
        "cancelled": counts.get("cancelled", 0),
        "deactivated": counts.get("deactivated", 0),
        "total": sum(counts.values()),
    }
    if with_lists:
        out["failed_tenants"] = [
            {
                "id": r.id,
                "last_error": telemetry.scrub(r.status_reason or ""),
                "failed_at": _iso(r.updated_at),
                "run_id": r.run_id,
                "correlation_id": r.correlation_id,
            }
            for r in failed_rows
        ]
        out["degraded_tenants"] = [
            {"id": k, "problem": v} for k, v in sorted(degraded.items())[:LIST_LIMIT]
        ]
    return out


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).isoformat()


# --- the report ------------------------------------------------------------------------------


_pools: dict[str, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(name: str, workers: int) -> ThreadPoolExecutor:
    # Health has threads of its own: on Starlette's shared pool, probes queued behind busy
    # API requests and timed out, and a loaded but healthy instance answered 503.
    with _pools_lock:
        if name not in _pools:
            _pools[name] = ThreadPoolExecutor(workers, thread_name_prefix=f"tp-health-{name}")
        return _pools[name]


def overall(components: Mapping[str, Mapping[str, Any]], tenants: Mapping[str, Any] | None) -> str:
    """``failed`` if a component is down, ``degraded`` if any tenant is failed or degraded."""
    if any(c.get("status") == "down" for c in components.values()) or tenants is None:
        return "failed"
    if tenants.get("failed", 0) or tenants.get("degraded", 0):
        return "degraded"
    return "ok"


def build_report(
    settings: Settings, instance: "DagsterInstance", *, full: bool
) -> tuple[int, dict[str, Any]]:
    """The health report and its HTTP status (503 when a component is down), computed now.

    The probes run in parallel; one that does not answer within :data:`CHECK_TIMEOUT_S` is
    reported ``down`` (its thread finishes on its own).
    """
    probes: dict[str, Callable[[], dict[str, Any]]] = {
        "control_plane": lambda: check_control_plane(settings),
        "dagster_storage": lambda: check_dagster_storage(instance),
        "daemon": lambda: check_daemon(instance),
        "redis": lambda: check_redis(settings),
        "tenants": lambda: _timed(lambda: tenant_summary(settings, with_lists=full)),
    }
    pool = _pool("probe", 10)
    futures = {name: pool.submit(fn) for name, fn in probes.items()}
    wait(futures.values(), timeout=CHECK_TIMEOUT_S)
    results: dict[str, dict[str, Any]] = {}
    for name, future in futures.items():
        if future.done():
            results[name] = future.result()
        else:
            results[name] = {"status": "down", "error": f"no answer within {CHECK_TIMEOUT_S:.0f}s"}
    tenants = results.pop("tenants")
    components = results
    tenant_part: dict[str, Any] | None = None
    if tenants.get("status") == "ok":
        tenant_part = {k: v for k, v in tenants.items() if k not in ("status", "latency_ms")}
    status = overall(components, tenant_part)
    body: dict[str, Any] = {
        "status": status,
        "checked_at": dt.datetime.now(dt.UTC).isoformat(),
        "components": components,
        "tenants": tenant_part,
    }
    if not full:
        # Public answer: statuses and counts only, no error text or daemon details.
        body["components"] = {
            name: {"status": c.get("status"), "latency_ms": c.get("latency_ms")}
            for name, c in components.items()
        }
    elif tenant_part is None:
        body["tenants_error"] = tenants.get("error")
    return (503 if status == "failed" else 200), body


class ReportCache:
    """At most one report computation in flight per kind, its answer reused for ``ttl_s``.

    Many probes at once (several load balancers, a busy dashboard) cost one computation.
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._entries: dict[bool, tuple[float, Future[tuple[int, dict[str, Any]]]]] = {}

    async def get(self, service: "Service", *, full: bool) -> tuple[int, dict[str, Any]]:
        """The cached or a fresh report (never older than ``ttl_s`` once computed)."""
        with self._lock:
            entry = self._entries.get(full)
            now = time.monotonic()
            if entry is None or (entry[1].done() and now - entry[0] > self.ttl_s):
                future = _pool("report", 2).submit(
                    build_report, service.settings, service.instance, full=full
                )
                entry = (now, future)
                self._entries[full] = entry
        # wrap_future works from any event loop (each TestClient request may bring its own).
        return await asyncio.wrap_future(entry[1])


def tenant_health(settings: Settings, tenant_id: str) -> dict[str, Any]:
    """Run the verification checks for one tenant (as ``tenant_verified`` would)."""
    from .assets import verification_problems

    tenant = registry.get_tenant(settings, tenant_id)
    started = time.perf_counter()
    try:
        problems = [telemetry.scrub(p) for p in verification_problems(settings, tenant)]
    except Exception as exc:  # an unreachable dependency is a finding, not an error
        problems = [telemetry.scrub(f"verification could not run: {type(exc).__name__}: {exc}")]
    if tenant.status == "active":
        status = "degraded" if problems else "ok"
    elif tenant.status in ("requested", "provisioning"):
        status = "provisioning"
    else:
        status = tenant.status
    return {
        "tenant_id": tenant.id,
        "status": status,
        "tenant_status": tenant.status,
        "healthy": not problems,
        "problems": problems,
        "last_error": telemetry.scrub(tenant.status_reason) if tenant.status_reason else None,
        "checked_at": dt.datetime.now(dt.UTC).isoformat(),
        "duration_ms": round((time.perf_counter() - started) * 1000, 1),
    }


# --- OpenAPI: api.openapi_document merges this over its own entries for these routes -------

_ERROR = {"$ref": "#/components/schemas/Error"}
_ADMIN: list[dict[str, list[str]]] = [{"bearerToken": []}, {"adminSession": []}]
_COUNTS = ("ready", "provisioning", "degraded", "failed", "cancelled", "deactivated", "total")


def _answer(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


_COMPONENT = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"enum": ["ok", "down", "disabled"]},
        "latency_ms": {"type": "number"},
        "error": {"type": "string", "description": "scrubbed; only in GET /health"},
    },
}
_TENANT_COUNTS = {
    "type": ["object", "null"],
    "description": "null when the control plane cannot be read",
    "properties": {
        k: {"type": "integer"}
        for k in (
            "ready",
            "provisioning",
            "degraded",
            "failed",
            "cancelled",
            "deactivated",
            "total",
        )
    },
}
_REPORT = {
    "type": "object",
    "required": ["status", "components", "tenants", "checked_at"],
    "properties": {
        "status": {
            "enum": ["ok", "degraded", "failed"],
            "description": "failed: a component is down (503); degraded: a tenant is failed "
            "or degraded (200)",
        },
        "checked_at": {"type": "string", "format": "date-time"},
        "components": {
            "type": "object",
            "properties": {
                k: _COMPONENT for k in ("control_plane", "dagster_storage", "daemon", "redis")
            },
        },
        "tenants": _TENANT_COUNTS,
    },
}
_ADMIN_ERRORS = {"401": {**_answer("unauthenticated", _ERROR)}, "403": _answer("forbidden", _ERROR)}
OPENAPI: dict[tuple[str, str], dict[str, Any]] = {
    ("/health/live", "GET"): {
        "summary": "Liveness: the process answers",
        "tags": ["health"],
        "security": [],
        "responses": {"200": _answer("alive")},
    },
    ("/health/ready", "GET"): {
        "summary": "Readiness: components and tenant counts (public, no names or errors)",
        "tags": ["health"],
        "security": [],
        "responses": {
            "200": _answer("ok or degraded (see status)", _REPORT),
            "503": _answer("a component is down", _REPORT),
        },
    },
    ("/health", "GET"): {
        "summary": "Full health report: readiness plus failed and degraded tenants",
        "tags": ["health"],
        "security": _ADMIN,
        "responses": {
            **_ADMIN_ERRORS,
            "200": _answer("ok or degraded; tenants.failed_tenants/degraded_tenants", _REPORT),
            "503": _answer("a component is down", _REPORT),
        },
    },
    ("/metrics", "GET"): {
        "summary": "Prometheus metrics, derived from the control plane's durable records",
        "tags": ["health"],
        "security": _ADMIN,
        "responses": {
            **_ADMIN_ERRORS,
            "200": {
                "description": "Prometheus text exposition format 0.0.4",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            "503": {
                "description": "the control plane cannot be read",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
        },
    },
    ("/api/tenants/{id}/health", "GET"): {
        "summary": "Run the verification checks for one tenant",
        "tags": ["health"],
        "security": _ADMIN,
        "parameters": [
            {
                "name": "id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": registry.ID_PATTERN.pattern},
            }
        ],
        "responses": {
            **_ADMIN_ERRORS,
            "200": _answer(
                "the checks ran; status ok (active, no problem), degraded (active with "
                "problems), or the tenant's own status",
                {
                    "type": "object",
                    "required": ["tenant_id", "status", "healthy", "problems"],
                    "properties": {
                        "tenant_id": {"type": "string"},
                        "status": {"type": "string"},
                        "tenant_status": {"type": "string"},
                        "healthy": {"type": "boolean"},
                        "problems": {"type": "array", "items": {"type": "string"}},
                        "last_error": {"type": ["string", "null"]},
                        "checked_at": {"type": "string", "format": "date-time"},
                        "duration_ms": {"type": "number"},
                    },
                },
            ),
            "404": _answer("unknown tenant", _ERROR),
        },
    },
}


def routes(service: "Service") -> list[Route]:
    """Routes for /health, /metrics and per-tenant health; ``service`` is api.Service."""
    from .api import endpoint  # the API's error mapping (404 shape...); api imports us

    # Component errors may quote a settings value: make sure this process masks them all.
    telemetry.register_settings_secrets(service.settings)
    reports = ReportCache(REPORT_TTL_S)

    async def ready(_request: Request) -> Response:
        status, body = await reports.get(service, full=False)
        return JSONResponse(body, status_code=status)

    async def full(_request: Request) -> Response:
        status, body = await reports.get(service, full=True)
        return JSONResponse(body, status_code=status)

    async def metrics(_request: Request) -> Response:
        try:
            text = await run_in_threadpool(telemetry.metrics_text, service.settings)
        except Exception as exc:  # the control plane is down: say so, in Prometheus's terms
            telemetry.get_logger().warning(
                "metrics unavailable", extra={"fields": {"error": type(exc).__name__}}
            )
            return Response(
                f"# metrics unavailable: {type(exc).__name__}\n",
                status_code=503,
                media_type="text/plain",
            )
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def one_tenant(request: Request) -> Any:
        tenant_id = str(request.path_params["id"])
        if not registry.ID_PATTERN.match(tenant_id):
            raise registry.NotFoundError("no such tenant")
        return await run_in_threadpool(tenant_health, service.settings, tenant_id)

    return [
        Route("/health/live", live),
        Route("/health/ready", ready),
        Route("/health", full),
        Route("/metrics", metrics),
        Route("/api/tenants/{id}/health", endpoint(one_tenant), methods=["GET"]),
    ]
