"""Reconcilers: tenants created outside the API, and runs whose outcome the steps could not
record themselves (a killed worker, a run cancelled while queued).

Sensors tick every few seconds at best, so they are the safety net: the API and CLI submit
runs directly, and steps move the tenant's status themselves.
"""

import datetime as dt
import os
from collections.abc import Mapping
from pathlib import Path

import sqlalchemy as sa
from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
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
# A run worker that reported its pid this long ago and is gone did not just start up.
WORKER_GRACE_S = 5.0


def _worker_pid(instance: DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """The pid the run worker reported ("Started process for run") and when, if it did."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT).records
    for rec in reversed(records):
        event = rec.event_log_entry.dagster_event
        data = getattr(event, "event_specific_data", None) if event else None
        pid = getattr(data, "metadata", {}).get("pid") if data is not None else None
        if pid is not None and str(getattr(pid, "value", pid)).isdigit():
            return int(getattr(pid, "value", pid)), rec.event_log_entry.timestamp
    return None


def _process_alive(pid: int, run_id: str) -> bool:
    """Is ``pid`` a live process of this host still running ``run_id`` (not a reused pid)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie (state Z) is dead for our purpose: nothing will ever report its run.
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else ""
    return state != "Z" and run_id.encode() in cmdline


def dead_local_run(instance: DagsterInstance, run: DagsterRun) -> bool:
    """True when ``run`` is STARTED/CANCELING but its local run worker process is gone.

    Only meaningful for launchers that run the worker on this host (the default launcher):
    there Dagster's run monitoring cannot check worker health, and a worker that died with
    its code server (daemon killed) leaves the run STARTED until ``max_runtime_seconds``.
    """
    from dagster._core.launcher import DefaultRunLauncher

    if not isinstance(instance.run_launcher, DefaultRunLauncher) or os.name != "posix":
        return False
    if run.status not in (DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING):
        return False
    found = _worker_pid(instance, run.run_id)
    if found is None:
        return False  # not started yet: run monitoring's start timeout covers it
    pid, reported_at = found
    if dt.datetime.now(dt.UTC).timestamp() - reported_at < WORKER_GRACE_S:
        return False
    return not _process_alive(pid, run.run_id)


def _close_dead_run(instance: DagsterInstance, run: DagsterRun) -> None:
    """Record the end of a run whose worker died, as run monitoring would have."""
    message = "run worker process is gone (killed with the daemon or host); marked by reconciler"
    if run.status == DagsterRunStatus.CANCELING:
        instance.report_run_canceled(run, message=message)
    else:
        # A FAILURE event: run retries resume it from the failed step, the failure
        # sensor marks the tenant failed.
        instance.report_run_failed(run, message=message)


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
        in_flight = conn.execute(
            sa.select(t.c.id, t.c.run_id).where(
                t.c.status.in_(("requested", "provisioning")), t.c.run_id.is_not(None)
            )
        ).all()
    for _tenant_id, run_id in in_flight:
        # The run a tenant waits on may be STARTED in storage with its worker long dead.
        inflight_run = context.instance.get_run_by_id(run_id)
        if inflight_run is not None and dead_local_run(context.instance, inflight_run):
            context.log.warning(f"run {run_id} of {_tenant_id}: worker gone, closing the run")
            _close_dead_run(context.instance, inflight_run)
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
                actor="sensor",
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
        actor="sensor",
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
        actor="sensor",
    )


SENSORS = [reconcile_tenants, tenant_run_failed, tenant_run_cancelled]
