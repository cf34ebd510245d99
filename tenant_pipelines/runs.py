"""Dagster run control and run history for tenants.

Runs are launched the way the Dagster UI launches them: the ``launchRun`` and
``launchRunReexecution`` GraphQL mutations, executed in-process against a workspace
context, so the run goes through the queue (one run per tenant at a time) and carries our
tags. History is read from run storage by the ``dagster/partition`` tag and step stats,
which are indexed; the event log is read only for the error of a failed step. A finished
run never changes, so its history entry is computed once and kept (:data:`settled_runs`).
"""

import asyncio
import datetime as dt
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunRecord, RunsFilter
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import GrpcServerTarget, ModuleTarget, WorkspaceLoadTarget
from dagster_graphql.schema import create_schema

from . import registry
from .assets import ACTOR_TAG, CORRELATION_TAG, TENANT_TAG, provision_tenant, tenants_partitions
from .code_server import CODE_SERVER_ENV
from .settings import Settings
from .telemetry import scrub

LOCATION = "tenant_pipelines"
RELOAD_TIMEOUT_S = 30.0
REPOSITORY = "__repository__"
PARTITION_TAG = "dagster/partition"
STARTING_GRACE_S = 5.0
UNFINISHED = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]

# What launchRun and launchRunReexecution can answer: one selection serves both.
_LAUNCH_RESULT = """
  __typename
  ... on LaunchRunSuccess { run { runId } }
  ... on PythonError { message }
  ... on RunConfigValidationInvalid { errors { message } }
  ... on InvalidSubsetError { message }
  ... on PipelineNotFoundError { message }
  ... on RunConflict { message }
"""
_LAUNCH = (
    "mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {" + _LAUNCH_RESULT + "} }"
)
_REEXECUTE = (
    "mutation($p: ReexecutionParams!) { launchRunReexecution(reexecutionParams: $p) {"
    + _LAUNCH_RESULT
    + "} }"
)
_TERMINATE = """
mutation($runId: String!) { terminateRun(runId: $runId) {
  __typename
  ... on TerminateRunFailure { message }
  ... on RunNotFoundError { message }
  ... on PythonError { message }
} }"""

_schema: Any = None


class LaunchError(Exception):
    """Dagster refused to launch or terminate a run; the message says why."""


def workspace_target() -> WorkspaceLoadTarget:
    """Our code location, under the name workspace.yaml gives it (the daemon's view): the code
    server ``tenantctl serve`` shares (``TP_CODE_SERVER_SOCKET``), else one of our own."""
    socket = os.environ.get(CODE_SERVER_ENV)
    if socket:
        return GrpcServerTarget(host="localhost", port=None, socket=socket, location_name=LOCATION)
    return ModuleTarget(
        module_name="tenant_pipelines.definitions",
        attribute="defs",
        working_directory=None,
        location_name=LOCATION,
    )


def workspace(instance: DagsterInstance) -> WorkspaceProcessContext:
    """A workspace context for launching runs from this process (CLI, tests)."""
    # The code server's INFO lines would interleave with the CLI's own output.
    return WorkspaceProcessContext(instance, workspace_target(), code_server_log_level="WARNING")


def graphql(ctx: WorkspaceProcessContext, query: str, variables: Mapping[str, Any]) -> Any:
    """Execute a GraphQL document in-process, as the webserver would."""
    global _schema
    if _schema is None:
        _schema = create_schema()
    result = asyncio.run(
        _schema.execute_async(
            query, context_value=ctx.create_request_context(), variable_values=dict(variables)
        )
    )
    if result.errors:
        raise LaunchError(scrub(str(result.errors[0])))
    return result.data


def _run_id(data: Mapping[str, Any]) -> str:
    if data["__typename"] != "LaunchRunSuccess":
        detail = data.get("message") or data.get("errors") or data["__typename"]
        raise LaunchError(scrub(f"{data['__typename']}: {detail}"))
    return str(data["run"]["runId"])


def run_tags(
    tenant_id: str, correlation_id: str, actor: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    return {
        PARTITION_TAG: tenant_id,
        TENANT_TAG: tenant_id,
        CORRELATION_TAG: correlation_id,
        ACTOR_TAG: actor,
        **(extra or {}),
    }


def submit(
    ctx: WorkspaceProcessContext,
    tenant_id: str,
    correlation_id: str,
    actor: str,
    extra_tags: Mapping[str, str] | None = None,
) -> str:
    """Add the tenant's partition if needed and queue a provisioning run; return its id."""
    ctx.instance.add_dynamic_partitions(tenants_partitions.name or "tenants", [tenant_id])
    tags = run_tags(tenant_id, correlation_id, actor, extra_tags)
    params = {
        "selector": {
            "repositoryLocationName": LOCATION,
            "repositoryName": REPOSITORY,
            "jobName": provision_tenant.name,
        },
        "runConfigData": {},
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
    }
    return _launch_mutation(ctx, _LAUNCH, {"p": params}, "launchRun")


def _launch_mutation(
    ctx: WorkspaceProcessContext, query: str, variables: Mapping[str, Any], field: str
) -> str:
    data = graphql(ctx, query, variables)[field]
    if data["__typename"] == "PythonError" and "UserCodeUnreachable" in str(data.get("message")):
        # tenantctl serve restarted the shared code server (same socket): the workspace still
        # holds the dead server's channel until the location is reloaded, and the new server
        # may take a few seconds to answer.
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        ctx.reload_code_location(LOCATION)
        while ctx.has_code_location_error(LOCATION) and time.monotonic() < deadline:
            time.sleep(0.5)
            ctx.reload_code_location(LOCATION)
        data = graphql(ctx, query, variables)[field]
    return _run_id(data)


def reexecute_from_failure(
    ctx: WorkspaceProcessContext, parent_run_id: str, extra_tags: Mapping[str, str]
) -> str:
    """Queue a re-execution of ``parent_run_id`` that skips the steps which succeeded."""
    params = {
        "parentRunId": parent_run_id,
        "strategy": "FROM_FAILURE",
        "extraTags": [{"key": k, "value": v} for k, v in extra_tags.items()],
    }
    return _launch_mutation(ctx, _REEXECUTE, {"p": params}, "launchRunReexecution")


def terminate(ctx: WorkspaceProcessContext, run_id: str) -> None:
    """Ask Dagster to terminate a run (queued runs are cancelled outright)."""
    data = graphql(ctx, _TERMINATE, {"runId": run_id})["terminateRun"]
    if data["__typename"] not in ("TerminateRunSuccess",):
        raise LaunchError(scrub(str(data.get("message") or data["__typename"])))


def runs_of(instance: DagsterInstance, tenant_id: str, limit: int = 50) -> list[Any]:
    """The tenant's provisioning runs, newest first."""
    return list(instance.get_runs(_run_filter(tenant_id), limit=limit))


def unfinished_run(instance: DagsterInstance, tenant_id: str) -> str | None:
    """The id of a queued or running provisioning run of the tenant, if any."""
    runs = instance.get_runs(
        RunsFilter(
            job_name=provision_tenant.name, tags={PARTITION_TAG: tenant_id}, statuses=UNFINISHED
        ),
        limit=1,
    )
    return runs[0].run_id if runs else None


def _ts(value: float | None) -> str | None:
    return dt.datetime.fromtimestamp(value, dt.UTC).isoformat() if value else None


def step_errors(instance: DagsterInstance, run_id: str) -> dict[str, str]:
    """The scrubbed error message of each failed step of a run."""
    out: dict[str, str] = {}
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE).records
    for rec in records:
        event = rec.event_log_entry.dagster_event
        if event is None or event.step_key is None:
            continue
        data = event.event_specific_data
        error = getattr(data, "error", None)
        user = getattr(data, "user_failure_data", None)
        message = (user.description if user and user.description else None) or (
            error.message.strip() if error else "failed"
        )
        out[event.step_key] = scrub(message)
    return out


def _run_filter(tenant_id: str) -> RunsFilter:
    return RunsFilter(job_name=provision_tenant.name, tags={PARTITION_TAG: tenant_id})


def _run_entry(instance: DagsterInstance, record: RunRecord) -> dict[str, Any]:
    """One run of :func:`history`: the run and each step's status, from step stats."""
    run = record.dagster_run
    stats = {s.step_key: s for s in instance.get_run_step_stats(run.run_id)}
    errors = step_errors(instance, run.run_id) if run.status == DagsterRunStatus.FAILURE else {}
    steps = []
    for key, s in stats.items():
        duration = (s.end_time - s.start_time) if s.end_time and s.start_time else None
        steps.append(
            {
                "step": key,
                "status": s.status.value if s.status else "IN_PROGRESS",
                "start": _ts(s.start_time),
                "end": _ts(s.end_time),
                "duration_s": round(duration, 4) if duration is not None else None,
                "attempts": s.attempts,
                "error": errors.get(key),
            }
        )
    return {
        "run_id": run.run_id,
        "status": run.status.value,
        "correlation_id": run.tags.get(CORRELATION_TAG),
        "parent_run_id": run.parent_run_id,
        "start": _ts(record.start_time),
        "end": _ts(record.end_time),
        "steps": sorted(steps, key=lambda s: s["start"] or "~"),
    }


class _SettledRuns:
    """History entries of finished runs, by run id (a bounded LRU shared by all threads).

    A finished run never changes, so its entry is computed once: a status read then costs
    one query for the tenant's latest run ids instead of a run record, step stats and event
    log reads for every run.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run_id: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._entries.get(run_id)
            if entry is not None:
                self._entries.move_to_end(run_id)
            return entry

    def put(self, run_id: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self._entries[run_id] = entry
            self._entries.move_to_end(run_id)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# A few KB per run: 4,096 runs cover the latest runs of every tenant at the sizes.
SETTLED_CACHE_SIZE = 4096
# A terminated run is marked finished while its worker may still be writing its last step
# events; an entry is kept only once its run ended this long ago.
SETTLED_AFTER_S = 10.0
settled_runs = _SettledRuns(SETTLED_CACHE_SIZE)


def _settled(record: RunRecord, now: float) -> bool:
    end = record.end_time
    return record.dagster_run.is_finished and end is not None and now - end > SETTLED_AFTER_S


def history(instance: DagsterInstance, tenant_id: str, limit: int = 20) -> list[dict[str, Any]]:
    """The tenant's latest ``limit`` provisioning runs, newest first, with each step's status.

    The returned dicts may be shared with later calls (finished runs are cached): read them,
    do not change them.
    """
    run_ids = instance.get_run_ids(_run_filter(tenant_id), limit=limit)
    found = {rid: entry for rid in run_ids if (entry := settled_runs.get(rid)) is not None}
    missing = [rid for rid in run_ids if rid not in found]
    if missing:
        now = time.time()
        for record in instance.get_run_records(RunsFilter(run_ids=missing)):
            entry = _run_entry(instance, record)
            found[record.dagster_run.run_id] = entry
            if _settled(record, now):
                settled_runs.put(record.dagster_run.run_id, entry)
    # A run deleted between the two reads is left out.
    return [found[rid] for rid in run_ids if rid in found]


# --- tenant operations shared by the CLI and the API -----------------------------------------


def _launch(
    ctx: WorkspaceProcessContext,
    settings: Settings,
    tenant_id: str,
    correlation: str,
    actor: str,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> str:
    """Launch (or re-execute) and record the run on the tenant; on refusal mark it failed."""
    try:
        if parent_run_id:
            tags = run_tags(tenant_id, correlation, actor, extra_tags)
            run_id = reexecute_from_failure(ctx, parent_run_id, tags)
        else:
            run_id = submit(ctx, tenant_id, correlation, actor, extra_tags)
    except Exception as exc:
        reason = scrub(f"launch failed: {exc}")
        registry.transition(
            settings,
            tenant_id,
            "failed",
            allowed_from=("requested",),
            reason=reason,
            event="failed",
            details={"error": reason},
        )
        raise LaunchError(reason) from None
    registry.set_fields(settings, tenant_id, run_id=run_id)
    return run_id


def create_tenant(
    ctx: WorkspaceProcessContext,
    settings: Settings,
    req: registry.TenantRequest,
    actor: str,
    extra_tags: Mapping[str, str] | None = None,
    allow_reserved: bool = False,
) -> registry.Tenant:
    """CreateTenant: validate and store the request, then queue its provisioning at once."""
    tenant = registry.create_tenant(settings, req, actor, allow_reserved=allow_reserved)
    _launch(ctx, settings, tenant.id, tenant.correlation_id or "", actor, extra_tags=extra_tags)
    return registry.get_tenant(settings, tenant.id)


def retry(
    ctx: WorkspaceProcessContext,
    settings: Settings,
    tenant_id: str,
    actor: str,
    extra_tags: Mapping[str, str] | None = None,
) -> registry.Tenant:
    """Resume a failed or cancelled tenant from its failed step.

    Only one of several concurrent callers wins the status change; the others get
    :class:`registry.ConflictError`, so a retry never starts a second concurrent run.
    """
    tenant = registry.get_tenant(settings, tenant_id)
    if tenant.status not in registry.RETRYABLE_STATUSES:
        raise registry.ConflictError(
            f"tenant '{tenant_id}' is {tenant.status}; only failed or cancelled tenants are retried"
        )
    if not tenant.is_active or tenant.is_expired():
        raise registry.ConflictError(f"tenant '{tenant_id}' is deactivated or past valid_until")
    correlation = registry.new_correlation_id()
    if not registry.transition(
        settings,
        tenant_id,
        "requested",
        allowed_from=registry.RETRYABLE_STATUSES,
        reason=None,
        correlation_id=correlation,
        actor=actor,
        event="retry_requested",
        details={"previous_run_id": tenant.run_id},
    ):
        raise registry.ConflictError(f"tenant '{tenant_id}' is already being retried")
    parent = _resumable_parent(ctx.instance, tenant_id)
    _launch(
        ctx, settings, tenant_id, correlation, actor, parent_run_id=parent, extra_tags=extra_tags
    )
    return registry.get_tenant(settings, tenant_id)


def _resumable_parent(instance: DagsterInstance, tenant_id: str) -> str | None:
    runs = runs_of(instance, tenant_id, limit=1)
    # A tenant turns failed inside its run's last step, a moment before the run itself
    # ends FAILURE; wait that moment out so the retry resumes instead of starting over.
    deadline = time.monotonic() + STARTING_GRACE_S
    while runs and not runs[0].is_finished and time.monotonic() < deadline:
        time.sleep(0.1)
        runs = runs_of(instance, tenant_id, limit=1)
    if runs and runs[0].status in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
        return str(runs[0].run_id)
    return None


def activate(
    ctx: WorkspaceProcessContext,
    settings: Settings,
    tenant_id: str,
    actor: str,
    extra_tags: Mapping[str, str] | None = None,
) -> registry.Tenant:
    """Re-activate a tenant: run the whole pipeline again (a fast no-op when healthy)."""
    tenant = registry.get_tenant(settings, tenant_id)
    if tenant.is_expired():
        raise registry.ConflictError(f"tenant '{tenant_id}' is past valid_until")
    # No check for an unfinished run here: a tenant turns active in its run's last step,
    # a moment before the run ends, and the queue's per-tenant limit already runs the new
    # run after it. The conditional status change below is what refuses a tenant in flight.
    correlation = registry.new_correlation_id()
    if not registry.transition(
        settings,
        tenant_id,
        "requested",
        allowed_from=("active", "failed", "cancelled", "deactivated"),
        reason=None,
        correlation_id=correlation,
        actor=actor,
        event="activated",
        extra={"is_active": True},
    ):
        raise registry.ConflictError(f"tenant '{tenant_id}' is already being provisioned")
    _launch(ctx, settings, tenant_id, correlation, actor, extra_tags=extra_tags)
    return registry.get_tenant(settings, tenant_id)


def deactivate(settings: Settings, tenant_id: str, actor: str) -> registry.Tenant:
    """Keep the tenant but stop serving it; a run in flight stops at its next step."""
    tenant = registry.get_tenant(settings, tenant_id)
    if tenant.status == "deactivated":
        return tenant
    registry.transition(
        settings,
        tenant_id,
        "deactivated",
        reason=f"deactivated by {actor}",
        actor=actor,
        event="deactivated",
        extra={"is_active": False},
    )
    return registry.get_tenant(settings, tenant_id)


def cancel(
    ctx: WorkspaceProcessContext, settings: Settings, tenant_id: str, actor: str
) -> registry.Tenant:
    """Terminate the tenant's provisioning run; the tenant ends ``cancelled``."""
    registry.get_tenant(settings, tenant_id)
    run_id = unfinished_run(ctx.instance, tenant_id)
    if run_id is None:
        raise registry.ConflictError(f"tenant '{tenant_id}' has no provisioning in progress")
    # Dagster refuses to terminate a run that is STARTING, and a queued run can become
    # STARTING between any check and the terminate; it is STARTED a moment later.
    deadline = time.monotonic() + STARTING_GRACE_S
    while True:
        try:
            terminate(ctx, run_id)
            break
        except LaunchError as exc:
            if "STARTING" not in str(exc) and "NOT_STARTED" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise registry.ConflictError(
                    f"the run of '{tenant_id}' is still starting; cancel again in a moment"
                ) from None
            time.sleep(0.1)
    run = ctx.instance.get_run_by_id(run_id)
    if run is not None and run.status == DagsterRunStatus.CANCELED:
        # A queued run is cancelled on the spot: no step will record it.
        registry.transition(
            settings,
            tenant_id,
            "cancelled",
            allowed_from=("requested", "provisioning"),
            reason="run terminated",
            actor=actor,
            event="cancelled",
            details={"run_id": run_id},
        )
    else:
        registry.audit(settings, tenant_id, "cancel_requested", actor, None, {"run_id": run_id})
    return registry.get_tenant(settings, tenant_id)
