"""Metrics rollup: provisioning histograms kept by a trigger on audit_events.

/metrics used to aggregate every audit row at each scrape (seconds at a million rows). A
trigger now folds each new audit row into ``metrics_rollup`` in the inserting transaction, so
the rollup is exactly what the rows say, whichever process or machine wrote them; existing
rows are folded in once here. The bucket bounds must equal
``tenant_pipelines.telemetry.STEP_BUCKETS`` / ``PROVISION_BUCKETS`` (a test checks it).

Rows of ``metrics_rollup`` (metric, label, le) -> n, total:
- ("step_duration", step, "<bound>" or "+Inf") -> observations in that bucket (not cumulative)
- ("step_duration", step, "sum") -> count and sum of every step attempt's duration_s
- ("step_failures", step, "") -> failed step attempts
- ("provision_duration", outcome, ...) -> the same, for whole provisionings: the first
  completed/failed/cancelled event of a correlation id, timed from its first 'started'.

Revision ID: control_0003
Revises: control_0002
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "control_0003"
down_revision = "control_0002"
branch_labels = None
depends_on = None

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
PROVISION_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
STEP_EVENTS = ("step_succeeded", "step_failed")
OUTCOMES = ("completed", "failed", "cancelled")


def _le(bound: float) -> str:
    return str(float(bound))


def _bucket_case(value: str, bounds: tuple[float, ...]) -> str:
    whens = " ".join(f"WHEN {value} <= {float(b)!r} THEN '{_le(b)}'" for b in bounds)
    return f"CASE {whens} ELSE '+Inf' END"


def _in(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


def _sqlite_triggers() -> list[str]:
    d = "json_extract(NEW.details, '$.duration_s')"
    step = "json_extract(NEW.details, '$.step')"
    upsert_n = "ON CONFLICT (metric, label, le) DO UPDATE SET n = n + 1"
    upsert_sum = (
        "ON CONFLICT (metric, label, le) DO UPDATE SET n = n + 1, total = total + excluded.total"
    )
    first_outcome = (
        "NOT EXISTS (SELECT 1 FROM audit_events e WHERE e.tenant_id = NEW.tenant_id"
        " AND e.correlation_id = NEW.correlation_id"
        f" AND e.event IN {_in(OUTCOMES)} AND e.id < NEW.id)"
    )
    started = (
        "(SELECT max((julianday(NEW.at) - julianday(min(e.at))) * 86400.0, 0) AS d"
        " FROM audit_events e WHERE e.tenant_id = NEW.tenant_id"
        " AND e.correlation_id = NEW.correlation_id AND e.event = 'started')"
    )
    return [
        f"""CREATE TRIGGER metrics_rollup_steps AFTER INSERT ON audit_events
        WHEN NEW.event IN {_in(STEP_EVENTS)}
            AND CASE WHEN json_valid(NEW.details) THEN typeof({step}) END = 'text'
        BEGIN
            INSERT INTO metrics_rollup (metric, label, le, n, total)
            SELECT 'step_duration', {step}, {_bucket_case(d, STEP_BUCKETS)}, 1, 0
            WHERE typeof({d}) IN ('integer', 'real')
            {upsert_n};
            INSERT INTO metrics_rollup (metric, label, le, n, total)
            SELECT 'step_duration', {step}, 'sum', 1, {d}
            WHERE typeof({d}) IN ('integer', 'real')
            {upsert_sum};
            INSERT INTO metrics_rollup (metric, label, le, n, total)
            SELECT 'step_failures', {step}, '', 1, 0
            WHERE NEW.event = 'step_failed'
            {upsert_n};
        END""",
        f"""CREATE TRIGGER metrics_rollup_outcomes AFTER INSERT ON audit_events
        WHEN NEW.event IN {_in(OUTCOMES)} AND NEW.correlation_id IS NOT NULL AND {first_outcome}
        BEGIN
            INSERT INTO metrics_rollup (metric, label, le, n, total)
            SELECT 'provision_duration', NEW.event, {_bucket_case("s.d", PROVISION_BUCKETS)}, 1, 0
            FROM {started} s WHERE s.d IS NOT NULL
            {upsert_n};
            INSERT INTO metrics_rollup (metric, label, le, n, total)
            SELECT 'provision_duration', NEW.event, 'sum', 1, s.d
            FROM {started} s WHERE s.d IS NOT NULL
            {upsert_sum};
        END""",
    ]


def _postgresql_trigger() -> list[str]:
    upsert_n = "ON CONFLICT (metric, label, le) DO UPDATE SET n = r.n + 1"
    upsert_sum = (
        "ON CONFLICT (metric, label, le) DO UPDATE SET n = r.n + 1, total = r.total + EXCLUDED.total"
    )
    return [
        f"""CREATE FUNCTION metrics_rollup_audit() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            d double precision;
            lbl text;
        BEGIN
            IF NEW.event IN {_in(STEP_EVENTS)} THEN
                lbl := NEW.details ->> 'step';
                IF lbl IS NULL THEN
                    RETURN NULL;
                END IF;
                IF json_typeof(NEW.details -> 'duration_s') = 'number' THEN
                    d := (NEW.details ->> 'duration_s')::double precision;
                    INSERT INTO metrics_rollup AS r (metric, label, le, n, total)
                    VALUES ('step_duration', lbl, {_bucket_case("d", STEP_BUCKETS)}, 1, 0)
                    {upsert_n};
                    INSERT INTO metrics_rollup AS r (metric, label, le, n, total)
                    VALUES ('step_duration', lbl, 'sum', 1, d)
                    {upsert_sum};
                END IF;
                IF NEW.event = 'step_failed' THEN
                    INSERT INTO metrics_rollup AS r (metric, label, le, n, total)
                    VALUES ('step_failures', lbl, '', 1, 0)
                    {upsert_n};
                END IF;
            ELSIF NEW.event IN {_in(OUTCOMES)} AND NEW.correlation_id IS NOT NULL THEN
                IF EXISTS (
                    SELECT 1 FROM audit_events e
                    WHERE e.tenant_id = NEW.tenant_id AND e.correlation_id = NEW.correlation_id
                      AND e.event IN {_in(OUTCOMES)} AND e.id < NEW.id
                ) THEN
                    RETURN NULL;
                END IF;
                -- Not greatest(..., 0) here: it ignores NULL, and NULL means never started.
                SELECT extract(epoch FROM NEW.at - min(e.at)) INTO d
                FROM audit_events e
                WHERE e.tenant_id = NEW.tenant_id AND e.correlation_id = NEW.correlation_id
                  AND e.event = 'started';
                IF d IS NOT NULL THEN
                    d := greatest(d, 0);
                    INSERT INTO metrics_rollup AS r (metric, label, le, n, total)
                    VALUES ('provision_duration', NEW.event,
                            {_bucket_case("d", PROVISION_BUCKETS)}, 1, 0)
                    {upsert_n};
                    INSERT INTO metrics_rollup AS r (metric, label, le, n, total)
                    VALUES ('provision_duration', NEW.event, 'sum', 1, d)
                    {upsert_sum};
                END IF;
            END IF;
            RETURN NULL;
        EXCEPTION WHEN OTHERS THEN
            -- A metrics problem must never fail the audit insert (and with it a provisioning).
            RAISE WARNING 'metrics_rollup: % (audit row %)', SQLERRM, NEW.id;
            RETURN NULL;
        END
        $$""",
        "CREATE TRIGGER metrics_rollup AFTER INSERT ON audit_events"
        " FOR EACH ROW EXECUTE FUNCTION metrics_rollup_audit()",
    ]


def _bucket(value: float, bounds: tuple[float, ...]) -> str:
    return next((_le(b) for b in bounds if value <= b), "+Inf")


def _backfill(conn: Any) -> None:
    """Fold the audit rows written before this revision, in one pass, like the trigger."""
    audit = sa.table(
        "audit_events",
        sa.column("id"),
        sa.column("tenant_id"),
        sa.column("event"),
        sa.column("correlation_id"),
        sa.column("at", sa.DateTime(timezone=True)),
        sa.column("details", sa.JSON),
    )
    acc: dict[tuple[str, str, str], list[float]] = {}

    def add(metric: str, label: str, le: str, total: float = 0.0) -> None:
        slot = acc.setdefault((metric, label, le), [0, 0.0])
        slot[0] += 1
        slot[1] += total

    started: dict[tuple[str, str], Any] = {}
    finished: set[tuple[str, str]] = set()
    query = sa.select(audit).where(audit.c.event.in_((*STEP_EVENTS, *OUTCOMES, "started")))
    rows_in = conn.execute(query.order_by(audit.c.id), execution_options={"yield_per": 5000})
    for row in rows_in:
        details = row.details if isinstance(row.details, dict) else {}
        if row.event in STEP_EVENTS and isinstance(details.get("step"), str):
            d = details.get("duration_s")
            if isinstance(d, int | float) and not isinstance(d, bool):
                add("step_duration", details["step"], _bucket(float(d), STEP_BUCKETS))
                add("step_duration", details["step"], "sum", float(d))
            if row.event == "step_failed":
                add("step_failures", details["step"], "")
            continue
        if row.correlation_id is None:
            continue
        key = (row.tenant_id, row.correlation_id)
        if row.event == "started":
            started.setdefault(key, row.at)
        elif key not in finished:
            finished.add(key)
            if key in started:
                seconds = max((row.at - started[key]).total_seconds(), 0.0)
                add("provision_duration", row.event, _bucket(seconds, PROVISION_BUCKETS))
                add("provision_duration", row.event, "sum", seconds)
    rollup = sa.table(
        "metrics_rollup",
        sa.column("metric"),
        sa.column("label"),
        sa.column("le"),
        sa.column("n"),
        sa.column("total"),
    )
    rows = [
        {"metric": m, "label": label, "le": le, "n": int(n), "total": float(total)}
        for (m, label, le), (n, total) in acc.items()
    ]
    if rows:
        conn.execute(rollup.insert(), rows)


def upgrade() -> None:
    op.create_table(
        "metrics_rollup",
        sa.Column("metric", sa.String(32), primary_key=True),
        sa.Column("label", sa.String(64), primary_key=True),
        sa.Column("le", sa.String(16), primary_key=True),
        sa.Column("n", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("total", sa.Float, nullable=False, server_default="0"),
    )
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        # Writers wait here until this transaction commits: no row is folded twice or missed.
        op.execute("LOCK TABLE audit_events IN SHARE ROW EXCLUSIVE MODE")
        statements = _postgresql_trigger()
    else:
        statements = _sqlite_triggers()
    for statement in statements:
        op.execute(statement)
    _backfill(conn)


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS metrics_rollup ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS metrics_rollup_audit()")
    else:
        op.execute("DROP TRIGGER IF EXISTS metrics_rollup_steps")
        op.execute("DROP TRIGGER IF EXISTS metrics_rollup_outcomes")
    op.drop_table("metrics_rollup")
