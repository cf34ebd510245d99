"""The provisioning steps, one op each, and the partitioned job that runs them.

Every step goes through :func:`_step`, which owns what all steps share: the per-tenant lock,
the deactivated/expired checks, the status machine, the audit trail, secret scrubbing, and
the split between transient errors (retried with exponential backoff) and permanent ones
(failed at once). The step bodies only do their own work, idempotently.

The steps are ops, not software-defined assets: measured side by side (docs/performance.md),
an asset step costs about twice the CPU and wall time of the same op, because Dagster fetches
every parent's data version and writes a materialization per step. Each step's metadata goes
on its output instead; the job's partitions view in the UI is the per-tenant view.
"""

import logging
import smtplib
import time
from collections.abc import Callable
from typing import Any

import psycopg
import redis
import sqlalchemy as sa
from dagster import (
    Backoff,
    ConfigurableResource,
    DagsterExecutionInterruptedError,
    DagsterRunStatus,
    DynamicPartitionsDefinition,
    Failure,
    In,
    Jitter,
    Nothing,
    OpDefinition,
    OpExecutionContext,
    Out,
    RetryPolicy,
    in_process_executor,
    job,
    op,
)

from . import cache, identity, migrate, registry
from .providers import GuardError, provider_for, tenant_engine
from .registry import LockTimeout, NotFoundError, Tenant
from .settings import Settings
from .telemetry import get_logger, register_secret, scrub

tenants_partitions = DynamicPartitionsDefinition(name="tenants")

TENANT_TAG = "tenant_pipelines/tenant"
CORRELATION_TAG = "tenant_pipelines/correlation_id"
ACTOR_TAG = "tenant_pipelines/actor"

RETRY = RetryPolicy(max_retries=4, delay=0.5, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)
TRANSIENT: tuple[type[BaseException], ...] = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    psycopg.OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    LockTimeout,
    ConnectionError,
    TimeoutError,
    smtplib.SMTPException,
)
IN_FLIGHT = ("requested", "provisioning", "failed", "cancelled", "active")


class TransientStepError(Exception):
    """A scrubbed transient error: Dagster retries the step with backoff."""


class Platform(ConfigurableResource):  # type: ignore[type-arg]
    """The control plane's settings, each field from its ``TP_*`` environment variable."""

    data_dir: str
    control_url: str
    migrations_dir: str
    tenant_pg_url: str = ""
    tenant_pg_shared_db: str = "tenant_shared"
    tenant_pg_template: str = "1"
    location_prefix: str = "tenant_"
    mssql_url: str = ""
    redis_url: str = ""
    smtp_host: str = ""
    smtp_port: str = "25"
    smtp_starttls: str = "0"
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_sender: str = "tenant-pipelines@localhost"
    public_url: str = ""
    lock_timeout_s: str = "30"
    reset_token_ttl_s: str = str(72 * 3600)

    def settings(self) -> Settings:
        """The typed settings these fields describe."""
        env = {"TP_" + k.upper(): str(v) for k, v in self.model_dump().items()}
        settings = Settings.from_env(env)
        register_secret(sa.make_url(settings.control_url).password)
        if settings.tenant_pg_url:
            register_secret(sa.make_url(settings.tenant_pg_url).password)
        register_secret(settings.smtp_password)
        return settings


def _tenant_failed(
    settings: Settings, tenant_id: str, step: str, message: str, context: OpExecutionContext
) -> None:
    registry.transition(
        settings,
        tenant_id,
        "failed",
        allowed_from=("requested", "provisioning"),
        reason=f"{step}: {message}",
        run_id=context.run_id,
        actor="system",
        event="failed",
        details={"step": step, "error": message, "run_id": context.run_id},
    )


def _step(
    context: OpExecutionContext,
    platform: Platform,
    step: str,
    body: Callable[[Settings, Tenant], dict[str, Any]],
) -> dict[str, Any]:
    """Run one step body for the run's tenant; returns the step's metadata."""
    from . import telemetry

    settings = platform.settings()
    tenant_id = context.partition_key
    attempt = context.retry_number + 1
    telemetry.configure_logging()
    log = get_logger()
    tags = context.run.tags
    correlation = tags.get(CORRELATION_TAG) or context.run_id.replace("-", "")
    fields: dict[str, Any] = {
        "tenant_id": tenant_id,
        "correlation_id": correlation,
        "step": step,
        "attempt": attempt,
        "run_id": context.run_id,
    }
    # A re-execution copies its parent's tags, traceparent included; it gets its own trace.
    tag_value = tags.get(telemetry.TRACEPARENT_TAG)
    inherited = False
    if tag_value and context.run.parent_run_id:
        parent_run = context.instance.get_run_by_id(context.run.parent_run_id)
        inherited = bool(parent_run and parent_run.tags.get(telemetry.TRACEPARENT_TAG) == tag_value)
    span_attributes: dict[str, str | int] = {
        "tenant.id": tenant_id,
        "correlation.id": correlation,
        "attempt": attempt,
    }
    with telemetry.step_span(
        step,
        run_id=context.run_id,
        tag_value=tag_value,
        inherited=inherited,
        attributes=span_attributes,
    ) as span:
        fields["trace_id"] = span.trace_id
        started = time.monotonic()
        try:
            if _terminating(context):
                # Dagster issue 15026: an interrupt that landed between attempts came back
                # as a retry; a run being terminated must not run another step.
                raise DagsterExecutionInterruptedError()
            with registry.tenant_lock(settings, tenant_id, settings.lock_timeout_s):
                try:
                    tenant = registry.get_tenant(settings, tenant_id)
                except NotFoundError:
                    raise Failure(
                        f"no tenant '{tenant_id}' in the control plane", allow_retries=False
                    ) from None
                if not tenant.is_active:
                    raise Failure(f"tenant '{tenant_id}' is deactivated", allow_retries=False)
                if tenant.is_expired():
                    raise Failure(f"tenant '{tenant_id}' is past valid_until", allow_retries=False)
                if tenant.status != "provisioning" or tenant.run_id != context.run_id:
                    moved = registry.transition(
                        settings,
                        tenant_id,
                        "provisioning",
                        allowed_from=IN_FLIGHT,
                        correlation_id=correlation,
                        run_id=context.run_id,
                        actor=tags.get(ACTOR_TAG, "dagster"),
                        event="started",
                        details={"run_id": context.run_id, "first_step": step},
                    )
                    if not moved:
                        raise Failure(
                            f"tenant '{tenant_id}' is {tenant.status}", allow_retries=False
                        )
                    tenant = registry.get_tenant(settings, tenant_id)
                telemetry.json_only(
                    logging.INFO,
                    "step started: " + telemetry.kv(fields),
                    {**fields, "event": "step_started"},
                )
                metadata = body(settings, tenant)
                duration = time.monotonic() - started
                succeeded = {"step": step, "attempt": attempt, "duration_s": round(duration, 4)}
                if step == FINAL_STEP:
                    # The last step's success, 'completed' and the move to active are one
                    # transaction: no trail ever shows a verified tenant that is not active.
                    if not registry.transition(
                        settings,
                        tenant_id,
                        "active",
                        allowed_from=("provisioning",),
                        reason=None,
                        event="completed",
                        details={"run_id": context.run_id},
                        pre_events=[("step_succeeded", succeeded)],
                    ):
                        current = registry.get_tenant(settings, tenant_id)
                        raise Failure(
                            f"tenant is {current.status}; not marked active", allow_retries=False
                        )
                    metadata = {**metadata, "status": "active"}
        except DagsterExecutionInterruptedError:
            duration = time.monotonic() - started
            span.cancelled()
            registry.transition(
                settings,
                tenant_id,
                "cancelled",
                allowed_from=("provisioning", "requested"),
                reason=f"{step}: run terminated",
                actor="system",
                event="cancelled",
                details={"step": step, "run_id": context.run_id},
            )
            end = {**fields, "duration_s": round(duration, 4), "outcome": "cancelled"}
            log.warning(
                "step cancelled: " + telemetry.kv(end),
                extra={"fields": {**end, "event": "step_finished"}},
            )
            telemetry.flush()
            # Not a bare re-raise: with a RetryPolicy and the in-process executor, Dagster
            # turns the interrupt into a retry and the run can end SUCCESS (issue 15026).
            # A non-retryable failure while the run is CANCELING ends it CANCELED.
            raise Failure(f"{step}: run terminated", allow_retries=False) from None
        except Exception as exc:
            duration = time.monotonic() - started
            message = scrub(
                (exc.description or "step failed") if isinstance(exc, Failure) else _describe(exc)
            )
            transient = isinstance(exc, TRANSIENT) or getattr(exc, "transient", False)
            retrying = transient and attempt <= RETRY.max_retries
            registry.audit(
                settings,
                tenant_id,
                "step_failed",
                "system",
                correlation,
                {
                    "step": step,
                    "attempt": attempt,
                    "error": message,
                    "will_retry": retrying,
                    "duration_s": round(duration, 4),
                },
            )
            span.failed(message, type(exc).__name__, retrying=retrying)
            end = {
                **fields,
                "duration_s": round(duration, 4),
                "outcome": "retrying" if retrying else "failed",
                "will_retry": retrying,
            }
            log.warning(
                "step failed: " + telemetry.kv(end) + f" error={message}",
                extra={"fields": {**end, "error": message, "event": "step_finished"}},
            )
            if retrying:
                raise TransientStepError(message) from None
            _tenant_failed(settings, tenant_id, step, message, context)
            telemetry.flush()
            raise Failure(f"{step} failed: {message}", allow_retries=False) from None
        if step != FINAL_STEP:
            registry.audit(settings, tenant_id, "step_succeeded", "system", correlation, succeeded)
        span.succeeded()
        end = {**fields, "duration_s": round(duration, 4), "outcome": "success"}
        log.info(
            "step succeeded: " + telemetry.kv(end),
            extra={"fields": {**end, "event": "step_finished"}},
        )
    if step == FINAL_STEP:
        # The run's last step: the worker exits soon, push the spans out now.
        telemetry.flush()
    return {**metadata, "duration_s": round(duration, 4)}


def _terminating(context: OpExecutionContext) -> bool:
    run = context.instance.get_run_by_id(context.run_id)
    return run is not None and run.status in (
        DagsterRunStatus.CANCELING,
        DagsterRunStatus.CANCELED,
    )


def _describe(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {lines[0] if lines else ''}"


# --- the steps -------------------------------------------------------------------------------


def validate(settings: Settings, tenant: Tenant) -> dict[str, Any]:
    """Re-check the stored request (it may have been inserted outside the API)."""
    req = registry.TenantRequest(
        id=tenant.id,
        name=tenant.name,
        admin_email=tenant.admin_email,
        provider=tenant.provider,
        strategy=tenant.strategy,
        location=tenant.location,
        modules=tenant.modules,
        demo_data=tenant.demo_data,
        valid_until=None,
    )
    try:
        registry.validate_request(settings, None, req)
    except registry.ValidationError as exc:
        raise Failure(f"invalid tenant: {exc}", allow_retries=False) from None
    return {
        "provider": tenant.provider,
        "strategy": tenant.strategy,
        "modules": list(tenant.modules),
    }


def database(settings: Settings, tenant: Tenant) -> dict[str, Any]:
    try:
        created = provider_for(settings, tenant).ensure()
    except GuardError as exc:
        raise Failure(str(exc), allow_retries=False) from None
    return {"created": created, "location": tenant.location, "server": tenant.server}


def migrations(settings: Settings, tenant: Tenant) -> dict[str, Any]:
    from .telemetry import module_span

    try:
        results = migrate.apply(
            settings.migrations_dir, tenant_engine(settings, tenant), tenant, on_module=module_span
        )
    except migrate.MigrationError as exc:
        if exc.transient:
            raise
        raise Failure(
            scrub(str(exc)),
            allow_retries=False,
            metadata={
                "module": exc.module,
                "revision": exc.revision or "",
                "error": scrub(exc.error),
            },
        ) from None
    return {r.module: f"{r.before or 'base'} -> {r.after}" for r in results} | {
        "applied": sum(r.changed for r in results)
    }


def seeded(settings: Settings, tenant: Tenant) -> dict[str, Any]:
    return dict(identity.seed(tenant_engine(settings, tenant), tenant, tenant.correlation_id))


def credentials(settings: Settings, tenant: Tenant) -> dict[str, Any]:
    """Issue the tenant admin's one-time reset token and hand it to the delivery channel."""
    from . import delivery

    return delivery.deliver(settings, tenant)


def cached(settings: Settings, tenant: Tenant) -> dict[str, Any]:
    if not settings.redis_url:
        return {"skipped": "redis not configured"}
    role_perms = identity.role_permission_sets(tenant_engine(settings, tenant))
    keys = cache.warm(settings.redis_url, tenant.id, role_perms)
    return {"keys": keys, "prefix": cache.prefix(tenant.id)}


def verification_problems(settings: Settings, tenant: Tenant) -> list[str]:
    """What is wrong with a provisioned tenant, checked as the tenant would connect."""
    problems = []
    if not provider_for(settings, tenant).exists():
        return [f"{tenant.provider} {tenant.strategy} '{tenant.location}' is missing"]
    eng = tenant_engine(settings, tenant)
    for module, (cur, head) in migrate.status(settings.migrations_dir, eng, tenant).items():
        if cur != head:
            problems.append(f"module {module} at {cur or 'base'}, head is {head}")
    if problems:
        return problems
    with eng.connect() as conn:
        if identity.admin_user_id(conn, tenant) is None:
            problems.append("admin user missing")
    role_perms = identity.role_permission_sets(eng)
    if role_perms != {r: sorted(p) for r, p in identity.ROLE_PERMISSIONS.items()}:
        problems.append("roles and permissions differ from the catalog")
    if settings.redis_url:
        missing = cache.missing_roles(settings.redis_url, tenant.id, role_perms)
        if missing:
            problems.append(f"cache missing roles: {', '.join(missing)}")
    return problems


def verified(settings: Settings, tenant: Tenant) -> dict[str, Any]:
    """Check the tenant as it will connect; ``_step`` then marks it active."""
    problems = verification_problems(settings, tenant)
    if problems:
        raise Failure("verification failed: " + "; ".join(problems), allow_retries=False)
    return {"checks": "migrations at head, admin user, roles, cache"}


def _op(
    name: str,
    after: list[str],
    body: Callable[[Settings, Tenant], dict[str, Any]],
    description: str,
) -> OpDefinition:
    @op(
        name=name,
        ins={dep: In(Nothing) for dep in after},
        out=Out(Nothing),
        retry_policy=RETRY,
        description=description,
    )
    def _fn(context: OpExecutionContext, platform: Platform) -> None:
        context.add_output_metadata(_step(context, platform, name, body))

    return _fn


validated_op = _op("tenant_validated", [], validate, "The tenant's request, validated.")
database_op = _op(
    "tenant_database",
    ["tenant_validated"],
    database,
    "The tenant's database, schema or file, created when missing.",
)
migrations_op = _op(
    "tenant_migrations",
    ["tenant_database"],
    migrations,
    "Every enabled module's Alembic migrations, applied in order.",
)
identity_op = _op(
    "tenant_identity",
    ["tenant_migrations"],
    seeded,
    "Roles, permissions, the admin user and tenant settings, upserted.",
)
credentials_op = _op(
    "tenant_credentials",
    ["tenant_identity"],
    credentials,
    "The admin's one-time reset token, issued and delivered.",
)
cache_op = _op(
    "tenant_cache",
    ["tenant_identity"],
    cached,
    "Each role's permission set in Redis (skipped without Redis).",
)
verified_op = _op(
    "tenant_verified",
    ["tenant_credentials", "tenant_cache"],
    verified,
    "The tenant checked as it will connect; marks it active.",
)
STEPS = [
    validated_op,
    database_op,
    migrations_op,
    identity_op,
    credentials_op,
    cache_op,
    verified_op,
]
STEP_NAMES = [s.name for s in STEPS]
FINAL_STEP = STEP_NAMES[-1]


@job(
    partitions_def=tenants_partitions,
    executor_def=in_process_executor,
    description="Provision one tenant (the partition) from request to active.",
)
def provision_tenant() -> None:
    migrated = migrations_op(tenant_database=database_op(tenant_validated=validated_op()))
    seeded_ = identity_op(tenant_migrations=migrated)
    verified_op(
        tenant_credentials=credentials_op(tenant_identity=seeded_),
        tenant_cache=cache_op(tenant_identity=seeded_),
    )
