"""Reconcilers: tenants created outside the API, and runs whose outcome the steps could not
record themselves (a killed worker, a run cancelled while queued).

Sensors tick every few seconds at best, so they are the safety net: the API and CLI submit
runs directly, and steps move the tenant's status themselves.
"""

import datetime as dt
from collections.abc import Mapping

import sqlalchemy as sa
from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    RunStatusSensorContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    run_failure_sensor,
    run_status_sensor,
    sensor,
)

from . import registry
from .assets import ACTOR_TAG, CORRELATION_TAG, Platform, provision_tenant, tenants_partitions
from .runs import PARTITION_TAG, UNFINISHED
from .telemetry import scrub

# A tenant the API just created gets its run within milliseconds; only older ones are orphans.
ORPHAN_AFTER = dt.timedelta(seconds=10)


@sensor(
    job=provision_tenant,
    minimum_interval_seconds=5,
    default_status=DefaultSensorStatus.RUNNING,
    description="Provisions tenants that appeared in the control plane without a run.",
)
def reconcile_tenants(
    context: SensorEvaluationContext, platform: Platform
) -> SensorResult | SkipReason:
    settings = platform.settings()
    cutoff = registry.utcnow() - ORPHAN_AFTER
    t = registry.tenants
    with registry.engine(settings).connect() as conn:
        rows = conn.execute(
            sa.select(t.c.id, t.c.correlation_id, t.c.run_id)
            .where(t.c.status == "requested", t.c.updated_at < cutoff)
            .limit(100)
        ).all()
        stuck = conn.execute(
            sa.select(t.c.id, t.c.run_id).where(
                t.c.status == "provisioning", t.c.updated_at < cutoff
            )
        ).all()
    requests = []
    for tenant_id, correlation, run_id in rows:
        if run_id and context.instance.get_run_by_id(run_id) is not None:
            continue
        if not correlation:
            correlation = registry.new_correlation_id()
            registry.set_fields(settings, tenant_id, correlation_id=correlation)
        requests.append(
            RunRequest(
                run_key=f"{tenant_id}:{correlation}",
                partition_key=tenant_id,
                tags={CORRELATION_TAG: correlation, ACTOR_TAG: "sensor"},
            )
        )
    for tenant_id, run_id in stuck:
        # A tenant whose run is gone or finished without saying so lost its worker.
        run = context.instance.get_run_by_id(run_id) if run_id else None
        if run is None or run.status not in UNFINISHED:
            status = run.status.value if run else "missing"
            registry.transition(
                settings,
                tenant_id,
                "failed",
                allowed_from=("provisioning",),
                reason=f"run {run_id or '?'} ended {status} without finishing the tenant",
                only_run_id=run_id,
                event="failed",
                details={"run_id": run_id, "by": "reconciler"},
            )
    if not requests:
        return SkipReason("no orphaned tenants")
    keys = [r.partition_key for r in requests if r.partition_key]
    return SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[tenants_partitions.build_add_request(keys)],
    )


def _tenant_of(run_tags: Mapping[str, str]) -> str | None:
    return run_tags.get(PARTITION_TAG)


@run_failure_sensor(
    monitored_jobs=[provision_tenant],
    default_status=DefaultSensorStatus.RUNNING,
    description="Marks a tenant failed when its run fails outside a step (killed worker...).",
)
def tenant_run_failed(context: RunFailureSensorContext, platform: Platform) -> None:
    tenant_id = _tenant_of(context.dagster_run.tags)
    if not tenant_id:
        return
    message = context.failure_event.message or "run failed"
    registry.transition(
        platform.settings(),
        tenant_id,
        "failed",
        allowed_from=("requested", "provisioning"),
        reason=scrub(message)[:2000],
        only_run_id=context.dagster_run.run_id,
        event="failed",
        details={"run_id": context.dagster_run.run_id, "by": "sensor"},
    )


@run_status_sensor(
    run_status=DagsterRunStatus.CANCELED,
    monitored_jobs=[provision_tenant],
    default_status=DefaultSensorStatus.RUNNING,
    description="Marks a tenant cancelled when its run was terminated.",
)
def tenant_run_cancelled(context: RunStatusSensorContext, platform: Platform) -> None:
    tenant_id = _tenant_of(context.dagster_run.tags)
    if not tenant_id:
        return
    registry.transition(
        platform.settings(),
        tenant_id,
        "cancelled",
        allowed_from=("requested", "provisioning"),
        reason="run terminated",
        only_run_id=context.dagster_run.run_id,
        event="cancelled",
        details={"run_id": context.dagster_run.run_id, "by": "sensor"},
    )


SENSORS = [reconcile_tenants, tenant_run_failed, tenant_run_cancelled]
