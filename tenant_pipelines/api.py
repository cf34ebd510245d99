"""The HTTP entry point: the JSON API under ``/api``, the Dagster UI and GraphQL under
``/dagster`` (built in-process from the same workspace), ``/health`` and ``/metrics``.
"""

import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import dagster_webserver
from dagster import DagsterInstance
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster_webserver.app import create_app_from_workspace_process_context
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import registry, runs
from .registry import ConflictError, NotFoundError, RegistryError, TenantRequest, ValidationError
from .settings import MODULES, Settings
from .telemetry import get_logger, scrub

DAGSTER_PREFIX = "/dagster"
MAX_BODY = 64 * 1024


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def error_response(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    """The one error shape: ``{"error": {"code", "message", "details"}}``."""
    return JSONResponse(
        {"error": {"code": code, "message": scrub(message), "details": details or {}}},
        status_code=status,
    )


Handler = Callable[[Request], Awaitable[Any]]


def endpoint(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Map our exceptions to the documented error shape; never leak a stack trace."""

    async def wrapped(request: Request) -> Response:
        try:
            result = await fn(request)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message, exc.details)
        except ValidationError as exc:
            return error_response(422, exc.code, "invalid tenant request", exc.errors)
        except NotFoundError as exc:
            return error_response(404, exc.code, str(exc))
        except ConflictError as exc:
            return error_response(409, exc.code, str(exc))
        except RegistryError as exc:
            return error_response(409, exc.code, str(exc))
        except runs.LaunchError as exc:
            return error_response(503, "launch_failed", str(exc))
        except Exception:
            get_logger().exception("unhandled error on %s %s", request.method, request.url.path)
            return error_response(500, "internal", "internal error; see the service log")
        if isinstance(result, Response):
            return result
        status, body = result if isinstance(result, tuple) else (200, result)
        return JSONResponse(body, status_code=status)

    return wrapped


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ApiError(413, "too_large", f"request body is larger than {MAX_BODY} bytes")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_json", "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "request body must be a JSON object")
    return body


CREATE_FIELDS = {
    "id", "name", "admin_email", "provider", "strategy", "location", "modules", "demo_data",
    "valid_until",
}


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
            valid_until = dt.datetime.fromisoformat(str(body["valid_until"]))
        except ValueError:
            errors["valid_until"] = "must be an ISO 8601 timestamp"
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


class Service:
    """What the routes share: settings, the Dagster instance and the workspace."""

    def __init__(self, settings: Settings, ctx: WorkspaceProcessContext) -> None:
        self.settings, self.ctx = settings, ctx

    @property
    def instance(self) -> DagsterInstance:
        return self.ctx.instance

    def actor(self, request: Request) -> str:
        return str(request.scope.get("tp.actor", "anonymous"))

    async def create(self, request: Request) -> Any:
        req = tenant_request(await json_body(request))
        tenant = await run_in_threadpool(
            runs.create_tenant, self.ctx, self.settings, req, self.actor(request)
        )
        return 202, {"tenant": tenant.to_json(), "correlation_id": tenant.correlation_id}

    async def list(self, request: Request) -> Any:
        q = request.query_params
        try:
            limit = min(max(int(q.get("limit", "50")), 1), 500)
            offset = max(int(q.get("offset", "0")), 0)
        except ValueError:
            raise ApiError(400, "bad_query", "limit and offset must be integers") from None
        status = q.get("status")
        if status is not None and status not in registry.STATUSES:
            raise ApiError(400, "bad_query", f"status must be one of {', '.join(registry.STATUSES)}")
        items, total = await run_in_threadpool(
            registry.list_tenants, self.settings, status, limit, offset
        )
        return {"items": [t.to_json() for t in items], "total": total, "limit": limit,
                "offset": offset}

    def _id(self, request: Request) -> str:
        tenant_id = str(request.path_params["id"])
        if not registry.ID_PATTERN.match(tenant_id):
            raise NotFoundError("no such tenant")
        return tenant_id

    async def get(self, request: Request) -> Any:
        tenant = await run_in_threadpool(registry.get_tenant, self.settings, self._id(request))
        return {"tenant": tenant.to_json()}

    async def provisioning(self, request: Request) -> Any:
        tenant_id = self._id(request)
        tenant = await run_in_threadpool(registry.get_tenant, self.settings, tenant_id)
        history = await run_in_threadpool(runs.history, self.instance, tenant_id)
        return {"tenant_id": tenant_id, "status": tenant.status, "runs": history}

    async def audit(self, request: Request) -> Any:
        tenant_id = self._id(request)
        await run_in_threadpool(registry.get_tenant, self.settings, tenant_id)
        events = await run_in_threadpool(registry.audit_trail, self.settings, tenant_id)
        return {"tenant_id": tenant_id, "events": events}

    async def action(self, request: Request) -> Any:
        tenant_id, verb = self._id(request), request.path_params["action"]
        actor = self.actor(request)
        if verb == "retry":
            tenant = await run_in_threadpool(runs.retry, self.ctx, self.settings, tenant_id, actor)
        elif verb == "activate":
            tenant = await run_in_threadpool(
                runs.activate, self.ctx, self.settings, tenant_id, actor
            )
        elif verb == "deactivate":
            tenant = await run_in_threadpool(runs.deactivate, self.settings, tenant_id, actor)
        elif verb == "cancel":
            tenant = await run_in_threadpool(runs.cancel, self.ctx, self.settings, tenant_id, actor)
        else:
            raise ApiError(404, "not_found", f"no action '{verb}'")
        return 202, {"tenant": tenant.to_json(), "correlation_id": tenant.correlation_id}


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


def routes(service: Service) -> list[Route]:
    return [
        Route("/api/tenants", endpoint(service.create), methods=["POST"]),
        Route("/api/tenants", endpoint(service.list), methods=["GET"]),
        Route("/api/tenants/{id}", endpoint(service.get), methods=["GET"]),
        Route("/api/tenants/{id}/provisioning", endpoint(service.provisioning), methods=["GET"]),
        Route("/api/tenants/{id}/audit", endpoint(service.audit), methods=["GET"]),
        Route("/api/tenants/{id}/{action}", endpoint(service.action), methods=["POST"]),
    ]


def create_app(settings: Settings, instance: DagsterInstance) -> ASGIApp:
    """Build the whole service: our routes plus the Dagster UI, one ASGI app."""
    stack = contextlib.ExitStack()
    ctx = stack.enter_context(
        WorkspaceProcessContext(
            instance, runs.workspace_target(), version=dagster_webserver.__version__
        )
    )
    service = Service(settings, ctx)
    dagster_app = create_app_from_workspace_process_context(ctx, path_prefix=DAGSTER_PREFIX)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            stack.close()

    async def live(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    ours = Starlette(
        routes=[*routes(service), Route("/health/live", live)],
        lifespan=lifespan,
    )
    ours.state.service = service
    return PrefixDispatch(ours, dagster_app)
