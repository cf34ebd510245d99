"""The HTTP entry point: the JSON API under ``/api``, the Dagster UI and GraphQL under
``/dagster`` (built in-process from the same workspace), the login page under ``/auth``,
``/health`` and ``/metrics``; all of it behind :class:`auth.AuthMiddleware`.

docs/api.md describes the routes, the error shape and the security decisions;
``GET /api/openapi.json`` is the machine-readable version, built from the mounted routes.
"""

import asyncio
import contextlib
import datetime as dt
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import anyio.to_thread
import dagster_webserver
import sqlalchemy as sa
from dagster import DagsterInstance
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster_webserver.app import create_app_from_workspace_process_context
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import auth, delivery, health, launcher, readmodel, registry, runs
from .auth import ApiError, AuthError, RateLimited, error_response
from .registry import (
    ConflictError,
    LockTimeout,
    NotFoundError,
    RegistryError,
    TenantRequest,
    ValidationError,
)
from .settings import MODULES, Settings
from .telemetry import get_logger, register_secret, trace_tags

DAGSTER_PREFIX = "/dagster"
GRAPHQL_PATH = DAGSTER_PREFIX + "/graphql"
MAX_BODY = 64 * 1024
MAX_LIMIT = 500
# As `dagster-webserver` calls DagsterInstance.optimize_for_webserver: a pooled storage
# connection and a statement timeout instead of a new connection per query; the overflow is
# 4 rather than its 20 to keep a whole service inside max_connections (docs/production.md).
DB_STATEMENT_TIMEOUT_MS = 15000
DB_POOL_RECYCLE_S = 3600
DB_POOL_MAX_OVERFLOW = 4
# Status reads run at most this many at a time (of Starlette's 40 threads): more threads only
# contend for the GIL, and past the storage pools' sizes each extra one opens a connection.
READ_CONCURRENCY = 4
ACTIONS = ("retry", "activate", "deactivate", "cancel")

__all__ = ["ApiError", "Service", "create_app", "error_response", "openapi_document"]

Handler = Callable[[Request], Awaitable[Any]]


def endpoint(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Map our exceptions to the documented error shape; never leak a stack trace or SQL."""

    async def wrapped(request: Request) -> Response:
        try:
            result = await fn(request)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
        except ValidationError as exc:
            return error_response(422, "invalid", "invalid input", exc.errors)
        except NotFoundError as exc:
            return error_response(404, "not_found", str(exc))
        except RateLimited as exc:
            return error_response(
                429, exc.code, str(exc), headers={"Retry-After": str(exc.retry_after)}
            )
        except AuthError as exc:
            return error_response(
                401, "invalid_credentials", str(exc), headers={"WWW-Authenticate": "Bearer"}
            )
        except LockTimeout as exc:
            return error_response(409, "locked", str(exc))
        except ConflictError as exc:
            return error_response(409, "conflict", str(exc))
        except RegistryError as exc:
            return error_response(409, exc.code, str(exc))
        except runs.LaunchError as exc:
            return error_response(503, "launch_failed", str(exc))
        except (sa.exc.OperationalError, sa.exc.InterfaceError):
            # The text of these carries host names and SQL: log the class, answer generically.
            get_logger().exception(
                "database unavailable on %s %s", request.method, request.url.path
            )
            return error_response(503, "unavailable", "a database is unavailable; retry later")
        except Exception:
            get_logger().exception("unhandled error on %s %s", request.method, request.url.path)
            return error_response(500, "internal", "internal error; see the service log")
        if isinstance(result, Response):
            return result
        status, body = result if isinstance(result, tuple) else (200, result)
        return JSONResponse(body, status_code=status)

    return wrapped


async def json_body(request: Request, allowed: frozenset[str] | None = None) -> dict[str, Any]:
    """The JSON object in the body (``{}`` when empty); 413 past :data:`MAX_BODY`, 400 when
    it is not a JSON object, 422 for fields outside ``allowed``."""
    raw = await auth.read_body(request, MAX_BODY)
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "bad_json", "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "request body must be a JSON object")
    if allowed is not None:
        extra = set(body) - allowed
        if extra:
            raise ValidationError({"body": f"unknown fields: {', '.join(sorted(extra))[:200]}"})
    return body


CREATE_FIELDS = frozenset(
    {
        "id",
        "name",
        "admin_email",
        "provider",
        "strategy",
        "location",
        "modules",
        "demo_data",
        "valid_until",
    }
)


def tenant_request(body: dict[str, Any]) -> TenantRequest:
    """Turn a JSON body into a :class:`TenantRequest`, rejecting wrong types and extra fields."""
    errors: dict[str, str] = {}
    extra = set(body) - CREATE_FIELDS
    if extra:
        errors["body"] = f"unknown fields: {', '.join(sorted(map(str, extra)))[:200]}"
    for key in ("id", "name", "admin_email"):
        if not isinstance(body.get(key), str):
            errors[key] = "is required and must be a string"
    for key in ("provider", "strategy", "location"):
        if body.get(key) is not None and not isinstance(body[key], str):
            errors[key] = "must be a string"
    modules = body.get("modules", list(MODULES))
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        errors["modules"] = "must be a list of strings"
    if not isinstance(body.get("demo_data", False), bool):
        errors["demo_data"] = "must be a boolean"
    valid_until = None
    if body.get("valid_until") is not None:
        try:
            if not isinstance(body["valid_until"], str):
                raise ValueError
            valid_until = dt.datetime.fromisoformat(body["valid_until"])
        except ValueError:
            errors["valid_until"] = "must be an ISO 8601 timestamp string"
    if errors:
        raise ValidationError(errors)
    return TenantRequest(
        id=body["id"],
        name=body["name"],
        admin_email=body["admin_email"],
        provider=body.get("provider"),
        strategy=body.get("strategy") or "database",
        location=body.get("location"),
        modules=tuple(modules),
        demo_data=bool(body.get("demo_data", False)),
        valid_until=valid_until,
    )


def _string_fields(body: dict[str, Any], *names: str) -> list[str]:
    errors = {
        n: "is required and must be a string"
        for n in names
        if not isinstance(body.get(n), str) or not body[n]
    }
    if errors:
        raise ValidationError(errors)
    return [str(body[n]) for n in names]


def _tenant_id(request: Request, key: str) -> str:
    tenant_id = str(request.path_params[key])
    if not registry.ID_PATTERN.match(tenant_id):
        # Hostile identifiers never reach a query: they cannot name a tenant anyway.
        raise NotFoundError("no such tenant")
    return tenant_id


NO_STORE = {"Cache-Control": "no-store"}


def page_query(q: Mapping[str, str]) -> tuple[str | None, int, int]:
    """``status``, ``limit`` and ``offset`` of ``GET /api/tenants``, checked."""
    try:
        limit, offset = int(q.get("limit", "50")), int(q.get("offset", "0"))
    except ValueError:
        raise ApiError(400, "bad_query", "limit and offset must be integers") from None
    if not 1 <= limit <= MAX_LIMIT or offset < 0:
        raise ApiError(400, "bad_query", f"limit must be 1-{MAX_LIMIT}, offset at least 0")
    status = q.get("status")
    if status is not None and status not in registry.STATUSES:
        raise ApiError(400, "bad_query", f"status must be one of {', '.join(registry.STATUSES)}")
    return status, limit, offset


class StatusReads:
    """``GET /api/tenants`` and ``GET /api/tenants/{id}/provisioning`` answered straight from
    the read model when it has the answer, before Starlette's routing and middleware.

    These are what automation polls; the rest of the stack cost more CPU than the answer
    itself (docs/performance.md). Anything else, including a request the read model cannot
    answer or a bad query, goes on to the routes, which answer it the usual way.
    """

    TENANTS = "/api/tenants"
    PROVISIONING = "/provisioning"

    def __init__(self, app: ASGIApp, catalog: readmodel.ReadModel) -> None:
        self.app, self.catalog = app, catalog

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self._body(scope) if scope["type"] == "http" and scope["method"] == "GET" else None
        if body is None:
            await self.app(scope, receive, send)
            return
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _body(self, scope: Scope) -> bytes | None:
        path: str = scope["path"]
        if path == self.TENANTS:
            query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
            try:
                return self.catalog.page(*page_query(query))
            except ApiError:
                return None
        if path.startswith(self.TENANTS + "/") and path.endswith(self.PROVISIONING):
            tenant_id = path[len(self.TENANTS) + 1 : -len(self.PROVISIONING)]
            # Only a tenant the read model knows has an answer: no other id gets further.
            return self.catalog.provisioning(tenant_id) if "/" not in tenant_id else None
        return None


class Service:
    """What the routes share: settings, the Dagster instance and the workspace."""

    def __init__(self, settings: Settings, ctx: WorkspaceProcessContext) -> None:
        self.settings, self.ctx = settings, ctx
        self.openapi: dict[str, Any] = {}
        self.reads = anyio.CapacityLimiter(READ_CONCURRENCY)
        # The status reads come from memory (tenant_pipelines/readmodel.py).
        self.catalog = readmodel.ReadModel(settings, registry.Tenant.to_json, self._provisioning)
        # optimize_for_webserver pools a single Dagster storage connection; a second
        # concurrent history read would open and close an overflow connection each time.
        self.history_lock = threading.Lock()

    @property
    def instance(self) -> DagsterInstance:
        return self.ctx.instance

    def writes(self, fn: Handler) -> Handler:
        """``fn``, then the read model brought up to date: a client reads its own writes."""

        async def wrapped(request: Request) -> Any:
            try:
                return await fn(request)
            finally:
                with contextlib.suppress(Exception):  # the poller catches up anyway
                    await run_in_threadpool(self.catalog.refresh)

        return wrapped

    def actor(self, request: Request) -> str:
        """Who the auth middleware says is calling (recorded in audit rows and run tags)."""
        return str(request.scope.get("tp.actor", "anonymous"))

    # --- platform admins ---------------------------------------------------------------------

    async def create(self, request: Request) -> Any:
        """POST /api/tenants: CreateTenant, answered 202 once the run is queued."""
        req = tenant_request(await json_body(request))
        # The request's trace context rides in the run's tags into the run worker.
        tags = trace_tags(request.headers, "POST /api/tenants")
        tenant = await run_in_threadpool(
            runs.create_tenant, self.ctx, self.settings, req, self.actor(request), tags
        )
        return 202, {
            "tenant": tenant.to_json(),
            "status": tenant.status,
            "correlation_id": tenant.correlation_id,
        }

    async def index(self, request: Request) -> Any:
        """GET /api/tenants: a page of tenants, optionally of one status."""
        status, limit, offset = page_query(request.query_params)
        body = self.catalog.page(status, limit, offset)
        if body is not None:
            return Response(body, media_type="application/json")
        return await anyio.to_thread.run_sync(
            self._index, status, limit, offset, limiter=self.reads
        )

    def _index(self, status: str | None, limit: int, offset: int) -> dict[str, Any]:
        items, total = registry.list_tenants(self.settings, status, limit, offset)
        return {
            "items": [t.to_json() for t in items],
            "total": total,
            "limit": limit,
            "offset": offset,
        }

    async def get(self, request: Request) -> Any:
        """GET /api/tenants/{id}."""
        tenant = await run_in_threadpool(
            registry.get_tenant, self.settings, _tenant_id(request, "id")
        )
        return {"tenant": tenant.to_json()}

    async def provisioning(self, request: Request) -> Any:
        """GET /api/tenants/{id}/provisioning: runs and steps from Dagster's run storage."""
        tenant_id = _tenant_id(request, "id")
        body = self.catalog.provisioning(tenant_id)
        if body is None:
            body = await anyio.to_thread.run_sync(self._provisioning, tenant_id, limiter=self.reads)
        return Response(body, media_type="application/json")

    def _provisioning(self, tenant_id: str) -> bytes:
        # One thread hop for both reads: each hop costs more than a cached history read.
        tenant = registry.get_tenant(self.settings, tenant_id)
        now = time.time()
        answer = {
            "tenant_id": tenant_id,
            "status": tenant.status,
            "correlation_id": tenant.correlation_id,
            "runs": self._history(tenant_id),
        }
        return self.catalog.keep_provisioning(tenant, answer, now)

    def _history(self, tenant_id: str) -> list[dict[str, Any]]:
        with self.history_lock:
            return runs.history(self.instance, tenant_id)

    async def audit(self, request: Request) -> Any:
        """GET /api/tenants/{id}/audit: the control plane's audit trail of the tenant."""
        tenant_id = _tenant_id(request, "id")
        await run_in_threadpool(registry.get_tenant, self.settings, tenant_id)
        events = await run_in_threadpool(registry.audit_trail, self.settings, tenant_id)
        return {"tenant_id": tenant_id, "events": events}

    def action(self, verb: str) -> Handler:
        """The handler of ``POST /api/tenants/{id}/<verb>``."""

        async def handle(request: Request) -> Any:
            tenant_id = _tenant_id(request, "id")
            await json_body(request, allowed=frozenset())
            actor = self.actor(request)
            if verb == "deactivate":
                tenant = await run_in_threadpool(runs.deactivate, self.settings, tenant_id, actor)
                return 200, {
                    "tenant": tenant.to_json(),
                    "status": tenant.status,
                    "correlation_id": tenant.correlation_id,
                }
            if verb == "cancel":
                tenant = await run_in_threadpool(
                    runs.cancel, self.ctx, self.settings, tenant_id, actor
                )
            else:
                fn = {"retry": runs.retry, "activate": runs.activate}[verb]
                tags = trace_tags(request.headers, f"POST /api/tenants/{{id}}/{verb}")
                tenant = await run_in_threadpool(
                    fn, self.ctx, self.settings, tenant_id, actor, tags
                )
            return 202, {
                "tenant": tenant.to_json(),
                "status": tenant.status,
                "correlation_id": tenant.correlation_id,
            }

        return handle

    async def credentials(self, request: Request) -> Any:
        """POST /api/tenants/{id}/credentials: the out-of-band reset token, exactly once."""
        tenant_id = _tenant_id(request, "id")
        await json_body(request, allowed=frozenset())
        token = await run_in_threadpool(
            delivery.pickup, self.settings, tenant_id, self.actor(request)
        )
        # Mask it in anything this process might log from here on.
        register_secret(token)
        tenant = await run_in_threadpool(registry.get_tenant, self.settings, tenant_id)
        body = {
            "tenant_id": tenant_id,
            "admin_email": tenant.admin_email,
            "reset_token": token,
            "expires_in_s": self.settings.reset_token_ttl_s,
            "reset_url": delivery.reset_link(self.settings, tenant),
        }
        return JSONResponse(body, headers=NO_STORE)

    async def whoami(self, request: Request) -> Any:
        """GET /api/me: the platform admin or API token calling."""
        principal = request.scope.get("tp.principal")
        if not isinstance(principal, auth.Principal):
            raise auth.unauthenticated()
        return principal.to_json()

    async def openapi_json(self, request: Request) -> Any:
        """GET /api/openapi.json."""
        return self.openapi

    # --- tenant users ------------------------------------------------------------------------

    async def tenant_reset_password(self, request: Request) -> Any:
        """POST /api/t/{tenant}/auth/reset-password: use the one-time token."""
        tenant_id = _tenant_id(request, "tenant")
        body = await json_body(request, allowed=frozenset({"token", "new_password"}))
        token, password = _string_fields(body, "token", "new_password")
        auth.check_password_policy(password, "new_password")
        email = await run_in_threadpool(
            auth.tenant_reset_password,
            self.settings,
            tenant_id,
            token,
            password,
            auth.remote_of(request),
        )
        return JSONResponse({"status": "password_set", "email": email}, headers=NO_STORE)

    async def tenant_login(self, request: Request) -> Any:
        """POST /api/t/{tenant}/auth/login: a tenant session (Bearer token and cookie)."""
        tenant_id = _tenant_id(request, "tenant")
        body = await json_body(request, allowed=frozenset({"email", "password"}))
        email, password = _string_fields(body, "email", "password")
        remote = auth.remote_of(request)
        try:
            token, me = await run_in_threadpool(
                auth.tenant_login,
                self.settings,
                tenant_id,
                email,
                password[: auth.MAX_PASSWORD],
                remote,
            )
        except AuthError:
            failures = await run_in_threadpool(
                auth.tenant_failures, self.settings, tenant_id, email, remote
            )
            await asyncio.sleep(auth.failure_delay(failures))
            raise
        expires = await run_in_threadpool(auth.session_expiry, self.settings, token)
        response = JSONResponse(
            {
                "token": token,
                "token_type": "Bearer",
                "expires_at": expires.isoformat() if expires else None,
                "me": me,
            },
            headers=NO_STORE,
        )
        response.set_cookie(
            auth.TENANT_COOKIE,
            auth.sign_session(self.settings, "tenant-session", token),
            **auth.session_cookie_kwargs(
                self.settings, f"/api/t/{tenant_id}/", auth.TENANT_SESSION_TTL
            ),
        )
        return response

    async def tenant_logout(self, request: Request) -> Any:
        """POST /api/t/{tenant}/auth/logout: end the caller's tenant session."""
        tenant_id = _tenant_id(request, "tenant")
        await run_in_threadpool(auth.tenant_principal, self.settings, request, tenant_id)
        raw = auth.tenant_session_of(self.settings, request)
        if raw:
            await run_in_threadpool(auth.revoke_session, self.settings, raw)
        response = JSONResponse({"status": "logged_out"})
        response.delete_cookie(
            auth.TENANT_COOKIE, path=f"/api/t/{tenant_id}/", httponly=True, samesite="strict"
        )
        return response

    async def tenant_me(self, request: Request) -> Any:
        """GET /api/t/{tenant}/me: the tenant user, roles and permissions."""
        tenant_id = _tenant_id(request, "tenant")
        principal = await run_in_threadpool(
            auth.tenant_principal, self.settings, request, tenant_id
        )
        tenant = await run_in_threadpool(
            lambda: auth.serving_tenant(self.settings, tenant_id, ready=True)
        )
        return await run_in_threadpool(auth.tenant_me, self.settings, tenant, principal.name)


def routes(service: Service) -> list[Route]:
    """The JSON API routes (platform admin ones and the tenant user ones)."""
    out = [
        Route("/api/openapi.json", endpoint(service.openapi_json), methods=["GET"]),
        Route("/api/me", endpoint(service.whoami), methods=["GET"]),
        Route("/api/tenants", endpoint(service.writes(service.create)), methods=["POST"]),
        Route("/api/tenants", endpoint(service.index), methods=["GET"]),
        Route("/api/tenants/{id}", endpoint(service.get), methods=["GET"]),
        Route("/api/tenants/{id}/provisioning", endpoint(service.provisioning), methods=["GET"]),
        Route("/api/tenants/{id}/audit", endpoint(service.audit), methods=["GET"]),
        Route(
            "/api/tenants/{id}/credentials",
            endpoint(service.writes(service.credentials)),
            methods=["POST"],
        ),
    ]
    out += [
        Route(
            f"/api/tenants/{{id}}/{verb}",
            endpoint(service.writes(service.action(verb))),
            methods=["POST"],
        )
        for verb in ACTIONS
    ]
    out += [
        Route(
            "/api/t/{tenant}/auth/reset-password",
            endpoint(service.tenant_reset_password),
            methods=["POST"],
        ),
        Route("/api/t/{tenant}/auth/login", endpoint(service.tenant_login), methods=["POST"]),
        Route("/api/t/{tenant}/auth/logout", endpoint(service.tenant_logout), methods=["POST"]),
        Route("/api/t/{tenant}/me", endpoint(service.tenant_me), methods=["GET"]),
    ]
    return out


class PrefixDispatch:
    """Send ``/dagster`` and everything below it to the Dagster app, unchanged.

    The Dagster app mounts its own routes under the prefix, so a Starlette ``Mount``, which
    strips it, would break them; dispatching on the raw path keeps WebSockets working too.
    """

    def __init__(self, ours: ASGIApp, dagster_app: ASGIApp, prefix: str = DAGSTER_PREFIX) -> None:
        self.ours, self.dagster, self.prefix = ours, dagster_app, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path = scope["path"]
            if path == self.prefix or path.startswith(self.prefix + "/"):
                await self.dagster(scope, receive, send)
                return
        await self.ours(scope, receive, send)


async def _http_error(request: Request, exc: Exception) -> Response:
    # Starlette's own 404/405 in our error shape instead of plain text.
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
    detail = exc.detail if isinstance(exc, HTTPException) else "error"
    return error_response(status, code, str(detail))


def create_app(settings: Settings, instance: DagsterInstance) -> ASGIApp:
    """Build the whole service: our routes plus the Dagster UI, one ASGI app behind auth."""
    settings = settings.ensure_secret_key()
    # Without this, dagster-postgres opens a new connection for every query (NullPool):
    # ~5 ms each, and a status read makes several. The Dagster UI mounted here needs it too.
    instance.optimize_for_webserver(
        statement_timeout=DB_STATEMENT_TIMEOUT_MS,
        pool_recycle=DB_POOL_RECYCLE_S,
        max_overflow=DB_POOL_MAX_OVERFLOW,
    )
    launcher.cache_schema_checks(instance)
    stack = contextlib.ExitStack()
    ctx = stack.enter_context(
        WorkspaceProcessContext(
            instance,
            runs.workspace_target(),
            version=dagster_webserver.__version__,  # type: ignore[attr-defined]
        )
    )
    service = Service(settings, ctx)
    dagster_app = create_app_from_workspace_process_context(ctx, path_prefix=DAGSTER_PREFIX)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(service.catalog.start)
        try:
            yield
        finally:
            service.catalog.stop()
            stack.close()

    async def home(_request: Request) -> Response:
        return RedirectResponse(DAGSTER_PREFIX + "/", status_code=303)

    all_routes: list[BaseRoute] = [
        *routes(service),
        *auth.login_routes(settings),
        Route("/", home, methods=["GET"]),
        *health.routes(service),
    ]
    ours = Starlette(
        routes=all_routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error},
    )
    # A JSON API answers the path it was given: "/api/tenants/x%2F" decodes to a trailing
    # slash, and Starlette's default 307 to the slashless path is no error in our shape.
    ours.router.redirect_slashes = False
    ours.state.service = service
    service.openapi = openapi_document(route_table(ours))
    app = StatusReads(PrefixDispatch(ours, dagster_app), service.catalog)
    return auth.AuthMiddleware(app, settings, GRAPHQL_PATH)


def route_table(app: Starlette) -> list[tuple[str, str]]:
    """``(path, METHOD)`` of every route of our own Starlette app (HEAD left out)."""
    out = []
    for route in app.routes:
        if isinstance(route, Route):
            for method in sorted(route.methods or {"GET"}):
                if method != "HEAD":
                    out.append((route.path, method))
    return out


# --- OpenAPI -----------------------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _err(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


ADMIN: list[dict[str, list[str]]] = [{"bearerToken": []}, {"adminSession": []}]
TENANT: list[dict[str, list[str]]] = [{"tenantToken": []}, {"tenantSession": []}]
PUBLIC: list[dict[str, list[str]]] = []
_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": registry.ID_PATTERN.pattern},
}
_TENANT = {**_ID, "name": "tenant"}
_ADMIN_ERRORS = {"401": _err("unauthenticated"), "403": _err("not a platform admin, or CSRF")}
_TENANT_RESPONSE = _json(
    {
        "type": "object",
        "required": ["tenant", "status", "correlation_id"],
        "properties": {
            "tenant": _ref("Tenant"),
            "status": {"type": "string"},
            "correlation_id": {"type": ["string", "null"]},
        },
    },
    "the tenant",
)


def _op(
    summary: str,
    responses: dict[str, Any],
    security: list[Any] | None = None,
    params: list[Any] | None = None,
    body: dict[str, Any] | None = None,
    tag: str = "tenants",
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "tags": [tag],
        "responses": responses,
        "security": ADMIN if security is None else security,
    }
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if op["security"] is ADMIN:
        op["responses"] = {**_ADMIN_ERRORS, **responses}
    return op


def _action_op(verb: str) -> dict[str, Any]:
    texts = {
        "retry": "Resume a failed or cancelled tenant from its failed step (409 otherwise)",
        "activate": "(Re-)activate: run the pipeline again (409 while a run is in flight)",
        "deactivate": "Stop serving the tenant (idempotent; 200 when already deactivated)",
        "cancel": "Terminate the tenant's provisioning run (409 when none is in flight)",
    }
    ok = "200" if verb == "deactivate" else "202"
    return _op(
        texts[verb],
        {
            ok: _TENANT_RESPONSE,
            "404": _err("unknown tenant"),
            "409": _err("conflict: wrong status or a run in flight"),
            "413": _err("body too large"),
            "422": _err("body has fields"),
        },
        params=[_ID],
    )


DOCUMENTED: dict[tuple[str, str], dict[str, Any]] = {
    ("/api/openapi.json", "GET"): _op(
        "This document", {"200": _json({"type": "object"}, "OpenAPI 3.1")}, tag="meta"
    ),
    ("/api/me", "GET"): _op(
        "The calling platform admin or API token",
        {"200": _json(_ref("Principal"), "the caller")},
        tag="auth",
    ),
    ("/api/tenants", "POST"): _op(
        "CreateTenant: validate, store and start provisioning",
        {
            "202": _TENANT_RESPONSE,
            "400": _err("not a JSON object"),
            "409": _err("the tenant exists"),
            "413": _err("body too large"),
            "422": _err("invalid fields (details per field)"),
            "503": _err("Dagster refused the run"),
        },
        body=_ref("TenantCreate"),
    ),
    ("/api/tenants", "GET"): _op(
        "List tenants, paginated, optionally by status",
        {"200": _json(_ref("TenantPage"), "a page"), "400": _err("bad query parameter")},
        params=[
            {
                "name": "status",
                "in": "query",
                "schema": {"type": "string", "enum": list(registry.STATUSES)},
            },
            {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50},
            },
            {
                "name": "offset",
                "in": "query",
                "schema": {"type": "integer", "minimum": 0, "default": 0},
            },
        ],
    ),
    ("/api/tenants/{id}", "GET"): _op(
        "One tenant",
        {
            "200": _json(
                {"type": "object", "properties": {"tenant": _ref("Tenant")}}, "the tenant"
            ),
            "404": _err("unknown tenant"),
        },
        params=[_ID],
    ),
    ("/api/tenants/{id}/provisioning", "GET"): _op(
        "Provisioning history from Dagster's run storage, newest run first",
        {"200": _json(_ref("Provisioning"), "runs and steps"), "404": _err("unknown tenant")},
        params=[_ID],
    ),
    ("/api/tenants/{id}/audit", "GET"): _op(
        "The tenant's audit trail in the control plane, oldest first",
        {
            "200": _json(
                {
                    "type": "object",
                    "properties": {
                        "tenant_id": {"type": "string"},
                        "events": {"type": "array", "items": {"type": "object"}},
                    },
                },
                "events",
            ),
            "404": _err("unknown tenant"),
        },
        params=[_ID],
    ),
    ("/api/tenants/{id}/credentials", "POST"): _op(
        "Pick up the tenant admin's one-time reset token (out-of-band delivery), exactly once",
        {
            "200": _json(_ref("Credentials"), "the token, shown this once"),
            "404": _err("unknown tenant"),
            "409": _err("not awaiting pickup (already picked up, emailed, or not issued yet)"),
        },
        params=[_ID],
    ),
    **{(f"/api/tenants/{{id}}/{verb}", "POST"): _action_op(verb) for verb in ACTIONS},
    ("/api/t/{tenant}/auth/reset-password", "POST"): _op(
        "Set the tenant admin's password with the one-time reset token",
        {
            "200": _json(
                {
                    "type": "object",
                    "properties": {"status": {"type": "string"}, "email": {"type": "string"}},
                },
                "set",
            ),
            "400": _err("invalid, used, expired or other tenant's token"),
            "403": _err("tenant deactivated or expired"),
            "404": _err("unknown tenant"),
            "413": _err("body too large"),
            "422": _err("missing fields or weak password"),
            "429": _err("too many failed attempts"),
        },
        security=PUBLIC,
        params=[_TENANT],
        body=_ref("ResetPassword"),
        tag="tenant-auth",
    ),
    ("/api/t/{tenant}/auth/login", "POST"): _op(
        "Log a tenant user in: a Bearer token and a tenant-scoped session cookie",
        {
            "200": _json(_ref("TenantLogin"), "logged in"),
            "401": _err("wrong email or password"),
            "403": _err("tenant deactivated or expired"),
            "404": _err("unknown tenant"),
            "409": _err("tenant not provisioned yet"),
            "422": _err("missing fields"),
            "429": _err("too many failed attempts"),
        },
        security=PUBLIC,
        params=[_TENANT],
        body=_ref("Login"),
        tag="tenant-auth",
    ),
    ("/api/t/{tenant}/auth/logout", "POST"): _op(
        "End the tenant session",
        {
            "200": _json({"type": "object"}, "logged out"),
            "401": _err("no tenant session"),
            "403": _err("session of another tenant, platform credential, or CSRF"),
        },
        security=TENANT,
        params=[_TENANT],
        tag="tenant-auth",
    ),
    ("/api/t/{tenant}/me", "GET"): _op(
        "The tenant user, roles and permissions",
        {
            "200": _json(_ref("Me"), "who am I"),
            "401": _err("no tenant session"),
            "403": _err(
                "session of another tenant, platform credential, tenant deactivated or expired"
            ),
            "404": _err("unknown tenant"),
        },
        security=TENANT,
        params=[_TENANT],
        tag="tenant-auth",
    ),
    ("/auth/login", "GET"): _op(
        "The platform admin login page (HTML)",
        {"200": {"description": "HTML form"}},
        security=PUBLIC,
        tag="auth",
    ),
    ("/auth/login", "POST"): {
        **_op(
            "Log a platform admin in (form or JSON); sets the session cookie",
            {
                "200": _json({"type": "object"}, "JSON login succeeded"),
                "303": {"description": "form login succeeded; redirect to next"},
                "401": _err("wrong email or password"),
                "403": _err("cross-site (CSRF)"),
                "422": _err("missing fields"),
                "429": _err("too many failed attempts"),
            },
            security=PUBLIC,
            tag="auth",
        ),
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _ref("Login")},
                "application/x-www-form-urlencoded": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "email": {"type": "string"},
                            "password": {"type": "string"},
                            "next": {"type": "string"},
                        },
                    }
                },
            },
        },
    },
    ("/auth/logout", "POST"): _op(
        "End the platform admin's browser session",
        {
            "200": _json({"type": "object"}, "JSON"),
            "303": {"description": "redirect to the login page"},
        },
        tag="auth",
    ),
    ("/", "GET"): _op(
        "Redirect to the Dagster UI", {"303": {"description": "to /dagster/"}}, tag="ui"
    ),
    # Owned by the observability work (tenant_pipelines.health); documented when mounted.
    ("/health/live", "GET"): _op(
        "Liveness", {"200": _json({"type": "object"}, "alive")}, security=PUBLIC, tag="health"
    ),
    ("/health/ready", "GET"): _op(
        "Readiness of the service's dependencies",
        {"200": _json({"type": "object"}, "ready"), "503": _json({"type": "object"}, "not ready")},
        security=PUBLIC,
        tag="health",
    ),
    ("/health", "GET"): _op(
        "Full health report: readiness plus failed and degraded tenants (scrubbed errors)",
        {
            "200": _json({"type": "object"}, "healthy or degraded"),
            "503": _json({"type": "object"}, "a component is down"),
        },
        tag="health",
    ),
    ("/metrics", "GET"): _op(
        "Prometheus metrics",
        {
            "200": {
                "description": "text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
        tag="health",
    ),
    ("/api/tenants/{id}/health", "GET"): _op(
        "Health of one tenant's database, schema and cache",
        {
            "200": _json({"type": "object"}, "healthy"),
            "404": _err("unknown tenant"),
            "503": _json({"type": "object"}, "unhealthy"),
        },
        params=[_ID],
        tag="health",
    ),
}

DAGSTER_ROUTES: dict[tuple[str, str], dict[str, Any]] = {
    (GRAPHQL_PATH, "POST"): _op(
        "Dagster GraphQL (queries and mutations). WebSocket subscriptions use the same path",
        {"200": {"description": "GraphQL response"}},
        tag="dagster",
    ),
    (GRAPHQL_PATH, "GET"): _op(
        "Dagster GraphQL queries (mutations over GET are refused with 405)",
        {"200": {"description": "GraphQL response"}, "405": _err("mutation over GET")},
        tag="dagster",
    ),
    (DAGSTER_PREFIX + "/{path}", "GET"): {
        **_op(
            "The Dagster UI (HTML, static files); browsers without a session are redirected "
            "to /auth/login",
            {"200": {"description": "UI"}, "303": {"description": "to the login page"}},
            tag="dagster",
        ),
        "parameters": [
            {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
    },
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "details"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "details": {"type": "object"},
                },
            }
        },
    },
    "TenantCreate": {
        "type": "object",
        "required": ["id", "name", "admin_email"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "pattern": registry.ID_PATTERN.pattern},
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
            "admin_email": {"type": "string", "format": "email", "maxLength": 254},
            "provider": {"type": "string", "enum": ["sqlite", "postgresql", "mssql"]},
            "strategy": {"type": "string", "enum": ["database", "schema"]},
            "location": {"type": "string", "pattern": registry.LOCATION_PATTERN.pattern},
            "modules": {
                "type": "array",
                "items": {"type": "string", "enum": list(MODULES)},
                "uniqueItems": True,
            },
            "demo_data": {"type": "boolean"},
            "valid_until": {"type": "string", "format": "date-time"},
        },
    },
    "Tenant": {
        "type": "object",
        "properties": {
            k: {"type": t}
            for k, t in (
                ("id", "string"),
                ("name", "string"),
                ("provider", "string"),
                ("strategy", "string"),
                ("server", "string"),
                ("location", "string"),
                ("admin_email", "string"),
                ("is_active", "boolean"),
                ("demo_data", "boolean"),
                ("status", "string"),
                ("credentials_state", "string"),
                ("created_at", "string"),
                ("updated_at", "string"),
            )
        }
        | {
            "modules": {"type": "array", "items": {"type": "string"}},
            "valid_until": {"type": ["string", "null"]},
            "status_reason": {"type": ["string", "null"]},
            "correlation_id": {"type": ["string", "null"]},
            "run_id": {"type": ["string", "null"]},
            "activated_at": {"type": ["string", "null"]},
        },
    },
    "TenantPage": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": _ref("Tenant")},
            "total": {"type": "integer"},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
        },
    },
    "Step": {
        "type": "object",
        "properties": {
            "step": {"type": "string"},
            "status": {"type": "string"},
            "start": {"type": ["string", "null"]},
            "end": {"type": ["string", "null"]},
            "duration_s": {"type": ["number", "null"]},
            "attempts": {"type": "integer"},
            "error": {"type": ["string", "null"]},
        },
    },
    "Run": {
        "type": "object",
        "properties": {
            "run_id": {"type": "string"},
            "status": {"type": "string"},
            "correlation_id": {"type": ["string", "null"]},
            "parent_run_id": {"type": ["string", "null"]},
            "start": {"type": ["string", "null"]},
            "end": {"type": ["string", "null"]},
            "steps": {"type": "array", "items": _ref("Step")},
        },
    },
    "Provisioning": {
        "type": "object",
        "properties": {
            "tenant_id": {"type": "string"},
            "status": {"type": "string"},
            "correlation_id": {"type": ["string", "null"]},
            "runs": {"type": "array", "items": _ref("Run")},
        },
    },
    "Credentials": {
        "type": "object",
        "properties": {
            "tenant_id": {"type": "string"},
            "admin_email": {"type": "string"},
            "reset_token": {"type": "string"},
            "expires_in_s": {"type": "integer"},
            "reset_url": {"type": "string"},
        },
    },
    "Principal": {
        "type": "object",
        "properties": {
            "kind": {"type": "string", "enum": ["admin", "token"]},
            "name": {"type": "string"},
            "via": {"type": "string", "enum": ["cookie", "bearer"]},
            "actor": {"type": "string"},
        },
    },
    "ResetPassword": {
        "type": "object",
        "required": ["token", "new_password"],
        "additionalProperties": False,
        "properties": {
            "token": {"type": "string"},
            "new_password": {
                "type": "string",
                "minLength": auth.MIN_PASSWORD,
                "maxLength": auth.MAX_PASSWORD,
            },
        },
    },
    "Login": {
        "type": "object",
        "required": ["email", "password"],
        "properties": {"email": {"type": "string"}, "password": {"type": "string"}},
    },
    "Me": {
        "type": "object",
        "properties": {
            "tenant": {
                "type": "object",
                "properties": {"id": {"type": "string"}, "name": {"type": "string"}},
            },
            "user": {
                "type": "object",
                "properties": {"email": {"type": "string"}, "display_name": {"type": "string"}},
            },
            "roles": {"type": "array", "items": {"type": "string"}},
            "permissions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "TenantLogin": {
        "type": "object",
        "properties": {
            "token": {"type": "string"},
            "token_type": {"type": "string"},
            "expires_at": {"type": ["string", "null"]},
            "me": _ref("Me"),
        },
    },
}


def openapi_document(table: list[tuple[str, str]]) -> dict[str, Any]:
    """OpenAPI 3.1 for ``table`` (our routes) plus the mounted Dagster UI and GraphQL.

    Only routes that are really mounted are listed, so the document cannot drift from the
    app; a mounted route without documentation is listed with ``x-undocumented`` (a test
    fails on it).
    """
    # health.py may document its own routes (an ``OPENAPI`` dict keyed like DOCUMENTED), so
    # the observability work can add a route without editing this file.
    documented = {**DOCUMENTED, **getattr(health, "OPENAPI", {}), **DAGSTER_ROUTES}
    paths: dict[str, dict[str, Any]] = {}
    for path, method in [*table, *DAGSTER_ROUTES]:
        op = documented.get((path, method))
        if op is None:
            op = {
                "summary": "undocumented",
                "x-undocumented": True,
                "responses": {"default": {"description": "see the code"}},
            }
            params = [p.strip("{}").split(":")[0] for p in path.split("/") if p.startswith("{")]
            if params:
                op["parameters"] = [
                    {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                    for p in params
                ]
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tenant-pipelines",
            "version": "1",
            "description": "Control plane for tenants; see docs/api.md.",
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearerToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "API token from `tenantctl admin token create`",
                },
                "adminSession": {"type": "apiKey", "in": "cookie", "name": auth.ADMIN_COOKIE},
                "tenantToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "tenant session token from /auth/login",
                },
                "tenantSession": {"type": "apiKey", "in": "cookie", "name": auth.TENANT_COOKIE},
            },
        },
        "security": ADMIN,
    }
