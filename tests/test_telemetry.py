"""Traces, structured logs, metrics and scrubbing.

In-process runs (conftest.provision) check the details quickly; a real ``tenantctl serve``
(daemon, run-worker processes, PostgreSQL tenants behind a password, SMTP with a login)
checks what crosses the run-worker boundary: spans written by the worker, JSON log lines,
Dagster's event log, /metrics, and a search for secrets in everything the system kept.
"""

import contextlib
import datetime as dt
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from alembic import command
from alembic.config import Config
from conftest import (
    PG_LIBPQ,
    REPO,
    Served,
    Tenants,
    free_port,
    make_settings,
    pg_database,
    provision,
    serve_env,
    uid,
    wait_for,
)
from dagster import DagsterInstance, instance_for_test
from dagster._serdes import serialize_value
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from tenant_pipelines import auth, registry, runs, telemetry
from tenant_pipelines.assets import STEP_NAMES
from tenant_pipelines.providers import provider_for
from tenant_pipelines.settings import DEFAULT_MIGRATIONS_DIR, Settings

# --- shared helpers --------------------------------------------------------------------------

FAILING_REVISION = '''"""Fails while the FAIL flag exists, quoting its connection URL.

Revision ID: auditing_9000
"""
from pathlib import Path

from alembic import op

revision = "auditing_9000"
down_revision = "auditing_0001"
branch_labels = None
depends_on = None
FLAG = Path(__file__).resolve().parents[2] / "FAIL"


def upgrade() -> None:
    if FLAG.exists():
        url = op.get_bind().engine.url.render_as_string(hide_password=False)
        raise RuntimeError(f"cannot load reference data from {url}")


def downgrade() -> None:
    pass
'''


def failing_migrations(root: Path) -> Path:
    """A copy of the migrations whose auditing module fails while ``<copy>/FAIL`` exists."""
    target = root / "migrations"
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, target, ignore=shutil.ignore_patterns("__pycache__"))
    (target / "auditing" / "versions" / "9000_flagged.py").write_text(FAILING_REVISION)
    return target


@contextlib.contextmanager
def pg_role() -> Iterator[tuple[str, str]]:
    """A PostgreSQL login role with a password (trust auth accepts any, but it is in the URL)."""
    name, password = f"tp_obs_{uuid.uuid4().hex[:8]}", "pw-" + secrets.token_urlsafe(18)
    with psycopg.connect(PG_LIBPQ, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            )
        )
    try:
        yield name, password
    finally:
        with psycopg.connect(PG_LIBPQ, autocommit=True) as conn:
            owned = conn.execute(
                "SELECT datname FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba "
                "WHERE r.rolname = %s",
                (name,),
            ).fetchall()
            for (db,) in owned:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
                )
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def span_exporter() -> InMemorySpanExporter:
    """An in-memory exporter on this process's tracer provider (spans of in-process runs)."""
    exporter = InMemorySpanExporter()
    telemetry.tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def spans_of(exporter: InMemorySpanExporter, tenant_id: str) -> list[dict[str, Any]]:
    out = [telemetry.span_to_dict(s) for s in exporter.get_finished_spans()]
    step_ids = {s["span_id"] for s in out if s["attributes"].get("tenant.id") == tenant_id}
    return [s for s in out if s["span_id"] in step_ids or s["parent_span_id"] in step_ids]


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def expected_metrics(settings: Settings) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The metric values recomputed in Python from the raw audit rows and tenants table."""
    with registry.engine(settings).connect() as conn:
        rows = conn.execute(sa.select(registry.audit_events).order_by(registry.audit_events.c.id))
        events = [dict(r._mapping) for r in rows]
        statuses = conn.execute(
            sa.select(registry.tenants.c.status, registry.tenants.c.is_active)
        ).all()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def histogram(name: str, label: str, values: dict[str, list[float]], bounds: Any) -> None:
        for key, vals in values.items():
            for b in bounds:
                le = str(float(b))
                out[(name + "_bucket", tuple(sorted({label: key, "le": le}.items())))] = float(
                    sum(v <= b for v in vals)
                )
            out[(name + "_bucket", tuple(sorted({label: key, "le": "+Inf"}.items())))] = len(vals)
            out[(name + "_count", ((label, key),))] = float(len(vals))

    steps: dict[str, list[float]] = {}
    failures: dict[str, int] = {}
    for e in events:
        step, d = e["details"].get("step"), e["details"].get("duration_s")
        if e["event"] not in ("step_succeeded", "step_failed") or not isinstance(step, str):
            continue
        if isinstance(d, int | float) and not isinstance(d, bool):
            steps.setdefault(step, []).append(float(d))
        if e["event"] == "step_failed":
            failures[step] = failures.get(step, 0) + 1
    started: dict[tuple[str, str], Any] = {}
    outcome: dict[tuple[str, str], tuple[str, Any]] = {}
    for e in events:
        key = (e["tenant_id"], e["correlation_id"])
        if e["correlation_id"] and e["event"] == "started":
            started.setdefault(key, e["at"])
        if e["correlation_id"] and e["event"] in ("completed", "failed", "cancelled"):
            outcome.setdefault(key, (e["event"], e["at"]))
    provision_durations: dict[str, list[float]] = {}
    for key, (event, at) in outcome.items():
        if key in started:
            seconds = max((at - started[key]).total_seconds(), 0.0)
            provision_durations.setdefault(event, []).append(seconds)
    histogram("provision_step_duration_seconds", "step", steps, telemetry.STEP_BUCKETS)
    histogram(
        "provision_duration_seconds", "outcome", provision_durations, telemetry.PROVISION_BUCKETS
    )
    for step, n in failures.items():
        out[("provision_step_failures_total", (("step", step),))] = float(n)
    counts: dict[str, int] = dict.fromkeys(registry.STATUSES, 0)
    for status, _ in statuses:
        counts[status] = counts.get(status, 0) + 1
    for status, n in counts.items():
        out[("tenants_by_status", (("status", status),))] = float(n)
    out[("active_tenants", ())] = float(
        sum(1 for status, active in statuses if status == "active" and active)
    )
    return out


def assert_metrics_match_records(text: str, settings: Settings) -> None:
    got = metric_samples(text)
    want = expected_metrics(settings)
    for key, value in want.items():
        assert key in got, f"missing {key}"
        assert got[key] == pytest.approx(value), key


# --- scrubbing and logs, no service needed -------------------------------------------------


def test_scrub_masks_url_passwords_key_values_bearer_tokens_and_registered_secrets() -> None:
    telemetry.register_secret("reset-token-value-123")
    text = (
        "postgresql+psycopg://app:s3cr3t@db:5432/x password=hunter22 token: abc.def "
        "Authorization: Bearer xyz.123 got reset-token-value-123 authorization=Basic dXNlcjpw"
    )
    out = telemetry.scrub(text)
    for secret in ("s3cr3t", "hunter22", "abc.def", "xyz.123", "reset-token-value-123", "dXNlcjpw"):
        assert secret not in out
    assert "postgresql+psycopg://app:***@db:5432/x" in out


def test_scrub_filter_masks_message_fields_and_chained_tracebacks() -> None:
    logger = telemetry.get_logger()
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep()
    logger.addHandler(handler)
    try:
        try:
            try:
                raise ValueError("redis://:topsecret1@cache:6379/0 refused")
            except ValueError as inner:
                raise RuntimeError("wrapped") from inner
        except RuntimeError:
            logger.exception(
                "failed with %s", "password=hunter22", extra={"fields": {"url": "x://u:pw99@h"}}
            )
    finally:
        logger.removeHandler(handler)
    record = seen[-1]
    rendered = logging.Formatter().format(record) + json.dumps(record.fields)  # type: ignore[attr-defined]
    json_line = telemetry.JsonFormatter().format(record)
    for secret in ("topsecret1", "hunter22", "pw99"):
        assert secret not in rendered
        assert secret not in json_line
    assert "redis://:***@cache" in rendered


def test_exporters_follow_otel_environment_and_default_to_none() -> None:
    names = telemetry._exporter_names
    assert names({}) == []
    assert names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == ["otlp"]
    assert names({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}) == ["otlp"]
    assert names({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"}) == []
    assert names({"OTEL_TRACES_EXPORTER": "console,otlp"}) == ["console", "otlp"]
    assert names({"TP_TRACE_FILE": "/tmp/x.jsonl"}) == ["file"]


# --- in-process runs -------------------------------------------------------------------------


def test_step_spans_are_children_of_the_request_span_with_module_spans_under_migrate(
    settings: Settings,
    tenants: Tenants,
    instance: DagsterInstance,
    span_exporter: InMemorySpanExporter,
) -> None:
    tenant = tenants.create()
    tags = telemetry.trace_tags({}, "POST /api/tenants")
    result = provision(settings, instance, tenant.id, **tags)
    assert result.success
    spans = [telemetry.span_to_dict(s) for s in span_exporter.get_finished_spans()]
    request = next(
        s for s in spans if tags[telemetry.TRACEPARENT_TAG].split("-")[2] == s["span_id"]
    )
    steps = {s["name"]: s for s in spans if s["attributes"].get("tenant.id") == tenant.id}
    assert set(steps) == set(STEP_NAMES)
    for name, s in steps.items():
        assert s["trace_id"] == request["trace_id"]
        assert s["parent_span_id"] == request["span_id"]
        assert s["attributes"]["step"] == name
        assert s["attributes"]["correlation.id"] == tenant.correlation_id
        assert s["attributes"]["attempt"] == 1
        assert s["attributes"]["outcome"] == "success"
        assert s["status"] == "UNSET"
    modules = [s for s in spans if s["parent_span_id"] == steps["tenant_migrations"]["span_id"]]
    assert [s["name"] for s in modules] == [
        "migrate identity",
        "migrate tenant_settings",
        "migrate auditing",
    ]
    # The tenant database is a clone of the pre-migrated template: every module is at head.
    assert all(s["attributes"]["migration.changed"] is False for s in modules)


@pytest.fixture
def logged_instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    """A Dagster instance with the repository's ``python_logs`` (managed loggers) settings."""
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    (tmp_path / "dagster").mkdir()
    with instance_for_test(
        temp_dir=str(tmp_path / "dagster"), overrides={"python_logs": config["python_logs"]}
    ) as inst:
        yield inst


def test_failed_step_span_records_the_scrubbed_error_and_step_logs_reach_the_event_log(
    tmp_path: Path,
    logged_instance: DagsterInstance,
    span_exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    instance = logged_instance
    with pg_role() as (role, password):
        migrations = failing_migrations(tmp_path)
        (migrations / "FAIL").touch()
        s = make_settings(
            tmp_path / "data",
            tenant_pg_url=f"postgresql+psycopg://{role}:{password}@127.0.0.1:5432/postgres",
            migrations_dir=migrations,
            tenant_pg_template=False,
        )
        for k, v in s.env().items():
            monkeypatch.setenv(k, v)
        registry.upgrade(s)
        t = Tenants(s)
        try:
            tenant = t.create()
            result = provision(s, instance, tenant.id)
            assert not result.success
            spans = spans_of(span_exporter, tenant.id)
            migrate_span = next(x for x in spans if x["name"] == "tenant_migrations")
            assert migrate_span["status"] == "ERROR"
            assert migrate_span["attributes"]["outcome"] == "failed"
            failing = next(x for x in spans if x["name"] == "migrate auditing")
            assert failing["parent_span_id"] == migrate_span["span_id"]
            assert failing["status"] == "ERROR"
            message = migrate_span["events"][0]["attributes"]["exception.message"]
            assert f"postgresql+psycopg://{role}:***@127.0.0.1" in message
            assert password not in json.dumps(spans)
            # The step log lines are in Dagster's event log, with their fields and scrubbed.
            logs = [
                e.user_message
                for e in instance.all_logs(result.run_id)
                if e.user_message.startswith("step ")
            ]
            assert any(
                m.startswith("step failed:")
                and "step=tenant_migrations" in m
                and "outcome=failed" in m
                and "duration_s=" in m
                and f"correlation_id={tenant.correlation_id}" in m
                for m in logs
            ), logs
            for step in ("tenant_validated", "tenant_database"):
                assert any(
                    m.startswith("step succeeded:")
                    and f"step={step}" in m
                    and f"tenant_id={tenant.id}" in m
                    and "outcome=success" in m
                    for m in logs
                )
            everything = "\n".join(serialize_value(e) for e in instance.all_logs(result.run_id))
            assert f"{role}:***@" in everything
            assert password not in everything
        finally:
            t.cleanup()
            registry.engine(s).dispose()


def test_step_start_and_end_are_json_lines_with_tenant_correlation_duration_and_outcome(
    settings: Settings,
    tenants: Tenants,
    instance: DagsterInstance,
    capfd: pytest.CaptureFixture[str],
) -> None:
    tenant = tenants.create()
    assert provision(settings, instance, tenant.id).success
    lines = []
    for raw in capfd.readouterr().err.splitlines():
        with contextlib.suppress(ValueError):
            line = json.loads(raw)
            if isinstance(line, dict) and line.get("tenant_id") == tenant.id:
                lines.append(line)
    for step in STEP_NAMES:
        start = [x for x in lines if x.get("step") == step and x["event"] == "step_started"]
        end = [x for x in lines if x.get("step") == step and x["event"] == "step_finished"]
        assert len(start) == 1 and len(end) == 1, step
        assert end[0]["correlation_id"] == tenant.correlation_id
        assert end[0]["outcome"] == "success"
        assert isinstance(end[0]["duration_s"], float)
        assert end[0]["level"] == "info" and end[0]["logger"] == "tenant_pipelines"


def test_metrics_match_the_audit_records_after_a_success_and_a_failure(
    tmp_path: Path,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    migrations = failing_migrations(tmp_path)
    # No template: a clone would carry the flagged revision from before FAIL was set.
    s = make_settings(tmp_path / "data", migrations_dir=migrations, tenant_pg_template=False)
    for k, v in s.env().items():
        monkeypatch.setenv(k, v)
    registry.upgrade(s)
    t = Tenants(s)
    try:
        ok = t.create()
        assert provision(s, instance, ok.id).success
        (migrations / "FAIL").touch()
        bad = t.create()
        assert not provision(s, instance, bad.id).success
        text = telemetry.metrics_text(s).decode()
        samples = metric_samples(text)
        assert samples[("provision_duration_seconds_count", (("outcome", "completed"),))] == 1
        assert samples[("provision_duration_seconds_count", (("outcome", "failed"),))] == 1
        assert samples[("provision_step_failures_total", (("step", "tenant_migrations"),))] == 1
        assert (
            samples[("provision_step_duration_seconds_count", (("step", "tenant_database"),))] == 2
        )
        assert (
            samples[("provision_step_duration_seconds_count", (("step", "tenant_migrations"),))]
            == 2
        )
        assert (
            samples[("provision_step_duration_seconds_count", (("step", "tenant_verified"),))] == 1
        )
        assert samples[("active_tenants", ())] == 1
        assert samples[("tenants_by_status", (("status", "failed"),))] == 1
        assert samples[("tenants_by_status", (("status", "active"),))] == 1
        # Buckets are cumulative and end at the count.
        le = [
            v
            for (name, labels), v in sorted(samples.items())
            if name == "provision_step_duration_seconds_bucket"
            and ("step", "tenant_migrations") in labels
        ]
        assert max(le) == 2
        assert_metrics_match_records(text, s)
    finally:
        t.cleanup()
        registry.engine(s).dispose()


def upgrade_control_to(settings: Settings, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(settings.migrations_dir / "control"))
    with registry.engine(settings).begin() as conn:
        cfg.attributes["connection"] = conn
        cfg.attributes["version_table"] = "alembic_version_control"
        command.upgrade(cfg, revision)


def synthetic_trail(tenant_id: str) -> list[dict[str, Any]]:
    """Audit rows of several provisionings, odd ones included, with chosen timestamps."""
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rows: list[dict[str, Any]] = []

    def row(event: str, corr: str | None, seconds: float, **details: Any) -> None:
        rows.append(
            {
                "tenant_id": tenant_id,
                "event": event,
                "actor": "test",
                "correlation_id": corr,
                "at": t0 + dt.timedelta(seconds=seconds),
                "details": details,
            }
        )

    for i, (total, outcome) in enumerate(
        [(0.4, "completed"), (7.25, "completed"), (45.0, "failed"), (4000.0, "cancelled")]
    ):
        corr, start = f"c{i}" + "0" * 30, i * 10_000.0
        row("requested", corr, start - 1)
        row("started", corr, start)
        row("step_succeeded", corr, start + 0.1, step="tenant_validated", duration_s=0.0123)
        row("step_failed", corr, start + 0.2, step="tenant_database", duration_s=2.5)
        row("step_failed", corr, start + 0.3, step="tenant_database")  # no duration
        row("started", corr, start + 0.5)  # a run retry: the first 'started' counts
        row(outcome, corr, start + total)
        row("failed", corr, start + total + 1)  # a second outcome is not counted again
    row("failed", "n" * 32, 50_000.0)  # launch refused: never started, not timed
    row("step_succeeded", None, 50_001.0, step="tenant_cache", duration_s="fast")  # malformed
    row("step_succeeded", None, 50_002.0, duration_s=1.0)  # no step
    return rows


def test_rollup_buckets_are_the_collectors_buckets() -> None:
    path = DEFAULT_MIGRATIONS_DIR / "control" / "versions" / "0003_metrics_rollup.py"
    spec = importlib.util.spec_from_file_location("rollup_revision", path)
    assert spec and spec.loader
    revision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(revision)
    assert revision.STEP_BUCKETS == telemetry.STEP_BUCKETS
    assert revision.PROVISION_BUCKETS == telemetry.PROVISION_BUCKETS


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_rollup_equals_a_recount_of_the_audit_rows_before_and_after_the_upgrade(
    tmp_path: Path, backend: str
) -> None:
    with contextlib.ExitStack() as stack:
        overrides: dict[str, Any] = {}
        if backend == "postgresql":
            overrides["control_url"] = stack.enter_context(
                pg_database(f"tp_ctl_{uuid.uuid4().hex[:10]}")
            )
        s = make_settings(tmp_path / "data", **overrides)
        stack.callback(registry._engines.pop, s.control_url, None)
        stack.callback(registry.engine(s).dispose)
        upgrade_control_to(s, "control_0002")
        with registry.engine(s).begin() as conn:
            conn.execute(registry.audit_events.insert(), synthetic_trail("before"))
        registry.upgrade(s)  # control_0003 folds the existing rows in
        assert_metrics_match_records(telemetry.metrics_text(s).decode(), s)
        with registry.engine(s).begin() as conn:
            for r in synthetic_trail("after"):  # one insert per row: the trigger's path
                conn.execute(registry.audit_events.insert(), [r])
        text = telemetry.metrics_text(s).decode()
        assert_metrics_match_records(text, s)
        samples = metric_samples(text)
        assert samples[("provision_duration_seconds_count", (("outcome", "completed"),))] == 4
        assert samples[("provision_duration_seconds_count", (("outcome", "cancelled"),))] == 2
        assert samples[("provision_step_failures_total", (("step", "tenant_database"),))] == 16
        assert (
            samples[
                (
                    "provision_step_duration_seconds_bucket",
                    (("le", "2.5"), ("step", "tenant_database")),
                )
            ]
            == 8
        )
        assert ("provision_step_duration_seconds_count", (("step", "tenant_cache"),)) not in samples


def test_a_row_the_rollup_cannot_take_is_still_audited(
    settings: Settings, pg_settings: Settings
) -> None:
    # PostgreSQL: a 100-character step overflows metrics_rollup.label (64): the trigger's
    # error becomes a server warning. SQLite: a details text that is not JSON is skipped.
    registry.audit(
        pg_settings, "t_long", "step_failed", "system", None, {"step": "x" * 100, "duration_s": 1.0}
    )
    assert [e["event"] for e in registry.audit_trail(pg_settings, "t_long")] == ["step_failed"]
    assert "x" * 100 not in telemetry.read_metrics(pg_settings).step_failures  # it did fail
    with registry.engine(settings).begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO audit_events (tenant_id, event, actor, correlation_id, at, details) "
            "VALUES ('t_bad', 'step_failed', 'system', NULL, '2026-01-01 00:00:00', 'not json')"
        )
        assert (
            conn.exec_driver_sql(
                "SELECT count(*) FROM audit_events WHERE tenant_id = 't_bad'"
            ).scalar_one()
            == 1
        )


def test_concurrent_audit_writers_are_all_counted(pg_settings: Settings) -> None:
    def write(worker: int) -> None:
        for i in range(25):
            registry.audit(
                pg_settings,
                f"w{worker}",
                "step_succeeded",
                "system",
                None,
                {"step": "tenant_cache", "attempt": 1, "duration_s": 0.02 * i},
            )

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    samples = metric_samples(telemetry.metrics_text(pg_settings).decode())
    assert samples[("provision_step_duration_seconds_count", (("step", "tenant_cache"),))] == 200
    assert_metrics_match_records(telemetry.metrics_text(pg_settings).decode(), pg_settings)


# --- a real service: across the run-worker boundary ------------------------------------------


class Mailbox:
    """An SMTP server's message store (aiosmtpd handler)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.content.decode("utf-8", errors="replace"))
        return "250 OK"

    def token_for(self, email: str) -> str | None:
        for message in self.messages:
            if f"To: {email}" in message:
                match = re.search(r"^\s{4}([A-Za-z0-9_-]{40,})\s*$", message, re.MULTILINE)
                if match:
                    return match.group(1)
        return None


@dataclass
class Observed:
    """A served instance with everything a secrets search needs to know."""

    served: Served
    home: Path
    migrations: Path
    trace_file: Path
    db_password: str
    db_role: str
    smtp_password: str
    mailbox: Mailbox
    token: str
    answers: list[str] = field(default_factory=list)

    def client(self, admin: bool = True) -> httpx.Client:
        """An HTTP client (a platform admin's unless ``admin`` is False) that keeps answers."""

        def keep(response: httpx.Response) -> None:
            response.read()
            self.answers.append(response.text)

        return httpx.Client(
            base_url=self.served.url,
            headers={"Authorization": f"Bearer {self.token}"} if admin else {},
            timeout=60,
            event_hooks={"response": [keep]},
        )

    def settled(self) -> None:
        """Wait until no tenant of this service is requested or provisioning."""

        def idle() -> bool:
            counts = registry.status_counts(self.served.settings)
            return not counts.get("requested") and not counts.get("provisioning")

        wait_for(idle, timeout=180, interval=0.5, what="no provisioning in flight")

    def spans(self) -> list[dict[str, Any]]:
        if not self.trace_file.exists():
            return []
        return [json.loads(line) for line in self.trace_file.read_text().splitlines() if line]

    def instance(self) -> DagsterInstance:
        return DagsterInstance.from_config(str(self.home))

    def wait_status(self, tenant_id: str, *statuses: str, timeout: float = 180) -> dict[str, Any]:
        with self.client() as c:

            def done() -> dict[str, Any] | None:
                body = c.get(f"/api/tenants/{tenant_id}").json()["tenant"]
                return body if body["status"] in statuses else None

            return wait_for(done, timeout=timeout, interval=0.5, what=f"{tenant_id} {statuses}")


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    root = tmp_path_factory.mktemp("observed")
    data_dir = root / "data"
    smtp_user, smtp_password = "mailer", "smtp-" + secrets.token_urlsafe(12)
    mailbox = Mailbox()

    def authenticator(_s: Any, _ss: Any, _e: Any, _m: Any, data: Any) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login == smtp_user.encode()
            and (data.password == smtp_password.encode())
        )
        return AuthResult(success=ok)

    smtp = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=free_port(),
        authenticator=authenticator,
        auth_require_tls=False,
    )
    smtp.start()
    migrations = failing_migrations(root)
    trace_file = root / "spans.jsonl"
    try:
        with pg_role() as (role, password), pg_database(f"tp_ctl_{uuid.uuid4().hex[:10]}") as url:
            env = serve_env(
                data_dir,
                control_url=url,
                tenant_pg_url=f"postgresql+psycopg://{role}:{password}@127.0.0.1:5432/postgres",
                migrations_dir=str(migrations),
                # The FAIL flag must fail the migrations step, not hide in a template build.
                tenant_pg_template="0",
                smtp_host="127.0.0.1",
                smtp_port=str(smtp.port),
                smtp_user=smtp_user,
                smtp_password=smtp_password,
                trace_file=str(trace_file),
            )
            env["OTEL_SERVICE_NAME"] = "tenant-pipelines-test"
            served = Served(data_dir, env, free_port()).start()
            token = auth.create_api_token(served.settings, uid("obs"), "test")
            try:
                yield Observed(
                    served,
                    data_dir / "dagster",
                    migrations,
                    trace_file,
                    password,
                    role,
                    smtp_password,
                    mailbox,
                    token,
                )
            finally:
                served.stop()
                for tenant in registry.list_tenants(served.settings, limit=10_000)[0]:
                    with contextlib.suppress(Exception):
                        provider_for(served.settings, tenant).drop()
                registry.engine(served.settings).dispose()
    finally:
        smtp.stop()


def test_request_trace_context_reaches_the_run_worker_step_spans(
    observed: Observed, span_exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the API does for POST /api/tenants: a request span, its traceparent in the run tags.
    settings = observed.served.settings
    for k, v in {**observed.served.env, **settings.env()}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DAGSTER_HOME", str(observed.home))
    incoming = "00-" + uuid.uuid4().hex + "-" + uuid.uuid4().hex[:16] + "-01"
    tags = telemetry.trace_tags({"traceparent": incoming}, "POST /api/tenants")
    request_span = tags[telemetry.TRACEPARENT_TAG].split("-")[2]
    req = registry.TenantRequest(id=uid(), name="Traced", admin_email="a@traced.example.com")
    with observed.instance() as instance, runs.workspace(instance) as ctx:
        tenant = runs.create_tenant(ctx, settings, req, "test", extra_tags=tags)
    observed.wait_status(tenant.id, "active", "failed")
    assert registry.get_tenant(settings, tenant.id).status == "active"

    recorded = [s for s in span_exporter.get_finished_spans() if s.name == "POST /api/tenants"]
    assert any(f"{s.get_span_context().span_id:016x}" == request_span for s in recorded)

    def traced() -> list[dict[str, Any]] | None:
        xs = [x for x in observed.spans() if x["trace_id"] == incoming[3:35]]
        names = {x["name"] for x in xs if "step" in x["attributes"]}
        return xs if names == set(STEP_NAMES) else None

    spans = wait_for(traced, timeout=30, what="the worker's spans")
    steps = {s["name"]: s for s in spans if s["attributes"].get("tenant.id") == tenant.id}
    assert set(steps) == set(STEP_NAMES)
    worker_pids = {s["pid"] for s in steps.values()}
    assert os.getpid() not in worker_pids
    for s in steps.values():
        assert s["parent_span_id"] == request_span and s["parent_is_remote"]
        assert s["attributes"]["correlation.id"] == tenant.correlation_id
        assert s["attributes"]["attempt"] == 1 and s["attributes"]["outcome"] == "success"
        assert s["service"] == "tenant-pipelines-test"
    modules = sorted(
        (s for s in spans if s["parent_span_id"] == steps["tenant_migrations"]["span_id"]),
        key=lambda s: s["start_ns"],
    )
    assert [m["name"] for m in modules] == [
        "migrate identity",
        "migrate tenant_settings",
        "migrate auditing",
    ]


def test_failure_then_retry_leaves_no_secret_in_logs_audit_api_or_event_log(
    observed: Observed,
) -> None:
    srv = observed.served
    tenant_id = uid()
    email = f"admin@{tenant_id.replace('_', '-')}.example.com"
    admin_password = "admin-" + secrets.token_urlsafe(16)
    (observed.migrations / "FAIL").touch()
    with observed.client() as c:
        created = c.post(
            "/api/tenants", json={"id": tenant_id, "name": "Leaky", "admin_email": email}
        )
        assert created.status_code == 202, created.text
        first_correlation = created.json()["correlation_id"]
        failed = observed.wait_status(tenant_id, "failed")
        assert "auditing" in failed["status_reason"]
        assert f"{observed.db_role}:***@" in failed["status_reason"]
        (observed.migrations / "FAIL").unlink()
        retried = c.post(f"/api/tenants/{tenant_id}/retry")
        assert retried.status_code == 202, retried.text
        observed.wait_status(tenant_id, "active")
        token = wait_for(lambda: observed.mailbox.token_for(email), timeout=30, what="email")
        with observed.client(admin=False) as user:
            reset = user.post(
                f"/api/t/{tenant_id}/auth/reset-password",
                json={"token": token, "new_password": admin_password},
            )
            assert reset.status_code == 200, reset.text
            login = user.post(
                f"/api/t/{tenant_id}/auth/login", json={"email": email, "password": admin_password}
            )
            assert login.status_code == 200, login.text
        for path in (
            f"/api/tenants/{tenant_id}",
            f"/api/tenants/{tenant_id}/provisioning",
            f"/api/tenants/{tenant_id}/audit",
            f"/api/tenants/{tenant_id}/health",
            "/api/tenants?status=active",
            "/health",
            "/health/ready",
            "/metrics",
        ):
            assert c.get(path).status_code == 200, path
    trail = registry.audit_trail(srv.settings, tenant_id)
    step_failed = next(e for e in trail if e["event"] == "step_failed")
    assert f"{observed.db_role}:***@127.0.0.1" in step_failed["details"]["error"]
    assert step_failed["correlation_id"] == first_correlation

    # The worker's spans: the failed run and the retry are one trace each (the trace the API
    # request started, carried in the run's tags), the failure recorded where it happened.
    spans = [x for x in observed.spans() if x["attributes"].get("tenant.id") == tenant_id]
    by_run: dict[str, list[dict[str, Any]]] = {}
    for x in spans:
        by_run.setdefault(x["attributes"]["dagster.run_id"], []).append(x)
    assert len(by_run) == 2
    traces = [{x["trace_id"] for x in run_spans} for run_spans in by_run.values()]
    assert all(len(t) == 1 for t in traces)
    assert traces[0] != traces[1]
    failed_step = next(x for x in spans if x["attributes"]["outcome"] == "failed")
    assert failed_step["name"] == "tenant_migrations" and failed_step["status"] == "ERROR"
    assert failed_step["attributes"]["correlation.id"] == first_correlation
    module = next(
        x
        for x in observed.spans()
        if x["parent_span_id"] == failed_step["span_id"] and x["name"] == "migrate auditing"
    )
    assert module["status"] == "ERROR"
    assert f"{observed.db_role}:***@" in module["events"][0]["attributes"]["exception.message"]

    cli = subprocess.run(
        [sys.executable, "-m", "tenant_pipelines.cli", "audit", tenant_id, "--json"],
        cwd=REPO,
        env={**srv.env, "DAGSTER_HOME": str(observed.home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr

    haystacks: dict[str, str] = {
        "api answers": "\n".join(observed.answers),
        "tenantctl audit": cli.stdout + cli.stderr,
        "spans": json.dumps(observed.spans()),
    }
    with registry.engine(srv.settings).connect() as conn:
        md = sa.MetaData()
        md.reflect(bind=conn)
        for table in md.sorted_tables:
            rows = conn.execute(sa.select(table)).all()
            haystacks[f"control plane {table.name}"] = "\n".join(repr(tuple(r)) for r in rows)
    tenant = registry.get_tenant(srv.settings, tenant_id)
    tenant_url = provider_for(srv.settings, tenant).url()
    tenant_engine = sa.create_engine(tenant_url)
    try:
        with tenant_engine.connect() as conn:
            md = sa.MetaData()
            md.reflect(bind=conn)
            for table in md.sorted_tables:
                rows = conn.execute(sa.select(table)).all()
                haystacks[f"tenant {table.name}"] = "\n".join(repr(tuple(r)) for r in rows)
    finally:
        tenant_engine.dispose()
    with observed.instance() as instance:
        records = []
        for run in instance.get_runs():
            records.extend(serialize_value(e) for e in instance.all_logs(run.run_id))
            records.append(serialize_value(run))
        haystacks["dagster event log"] = "\n".join(records)
    # Every byte the service left on disk: its log (service, daemon, code server and run
    # workers), Dagster's SQLite storage, compute logs, the span file.
    for path in srv.data_dir.rglob("*"):
        if path.is_file():
            haystacks[f"file {path.relative_to(srv.data_dir)}"] = path.read_bytes().decode(
                "utf-8", errors="replace"
            )
    # The secret-bearing error really went through every channel, masked.
    assert f"{observed.db_role}:***@" in haystacks["file serve.log"]
    assert f"{observed.db_role}:***@" in haystacks["dagster event log"]
    assert f"{observed.db_role}:***@" in haystacks["spans"]
    secrets_to_find = {
        "database password": observed.db_password,
        "reset token": token,
        "admin password": admin_password,
        "smtp password": observed.smtp_password,
    }
    hits = [
        f"{what} in {where}"
        for what, secret in secrets_to_find.items()
        for where, text in haystacks.items()
        if secret in text
    ]
    assert hits == []


def test_worker_json_logs_and_event_log_carry_step_fields_for_every_step(
    observed: Observed,
) -> None:
    tenant_id = uid()
    with observed.client() as c:
        created = c.post(
            "/api/tenants",
            json={"id": tenant_id, "name": "Logged", "admin_email": "a@logged.example.com"},
        )
        assert created.status_code == 202, created.text
    observed.wait_status(tenant_id, "active")
    tenant = registry.get_tenant(observed.served.settings, tenant_id)
    log_lines = []
    for raw in (observed.served.data_dir / "serve.log").read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            line = json.loads(raw)
            if isinstance(line, dict) and line.get("tenant_id") == tenant_id:
                log_lines.append(line)
    started = [x for x in log_lines if x.get("event") == "step_started"]
    finished = [x for x in log_lines if x.get("event") == "step_finished"]
    assert [x["step"] for x in started] == [x["step"] for x in finished]
    assert {x["step"] for x in finished if x["outcome"] == "success"} == set(STEP_NAMES)
    for x in finished:
        assert x["correlation_id"] == tenant.correlation_id
        assert x["run_id"] == tenant.run_id
        assert isinstance(x["duration_s"], float)
        assert re.fullmatch(r"[0-9a-f]{32}", x["trace_id"])
    with observed.instance() as instance:
        records = instance.all_logs(tenant.run_id or "")
    messages = [e.user_message for e in records if e.user_message.startswith("step ")]
    # A step's start is Dagster's own STEP_START event; the JSON line is not copied into the
    # event log (one write less per step). Its end, with the fields, is.
    assert not [m for m in messages if m.startswith("step started:")]
    started_steps = [e.step_key for e in records if e.dagster_event_type == "STEP_START"]
    assert sorted(started_steps) == sorted(STEP_NAMES)
    for step in STEP_NAMES:
        assert any(
            m.startswith("step succeeded:")
            and f"step={step} " in m
            and f"tenant_id={tenant_id}" in m
            and "outcome=success" in m
            and "duration_s=" in m
            for m in messages
        ), step


def test_metrics_endpoint_matches_records_and_survives_a_restart(observed: Observed) -> None:
    observed.settled()
    with observed.client() as c:
        before = c.get("/metrics")
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain")
    assert_metrics_match_records(before.text, observed.served.settings)
    samples = metric_samples(before.text)
    assert samples[("provision_step_failures_total", (("step", "tenant_migrations"),))] >= 1
    assert samples[("provision_duration_seconds_count", (("outcome", "failed"),))] >= 1
    observed.served.stop()
    observed.served.start()
    with observed.client() as c:
        after = c.get("/metrics")
    drop = "tenant_pipelines_metrics_read_seconds"
    assert {k: v for k, v in metric_samples(after.text).items() if k[0] != drop} == {
        k: v for k, v in samples.items() if k[0] != drop
    }
