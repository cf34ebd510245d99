"""Scrubbing, structured logs, traces and metrics.

One scrubbing function serves logs, audit rows, API answers, spans and Dagster's event log: it
masks passwords in URLs and key=value pairs, bearer tokens, and every value registered as a
secret in this process (database passwords, SMTP password, issued reset tokens).

Traces: the OpenTelemetry SDK is set up lazily in whichever process first needs a tracer (the
service for the request span, each run worker for the step spans), with exporters chosen by the
standard ``OTEL_*`` variables. A run's trace context travels in the run tag
:data:`TRACEPARENT_TAG`.

Metrics: :class:`ControlPlaneCollector` derives every metric at scrape time from durable
records in the control plane (audit events and the tenants table), so the numbers are the same
whichever process or machine ran the steps, and survive restarts. See docs/observability.md.
"""

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

_URL_PASSWORD = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]+)(?=@)")
_KV_SECRET = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|secret|token|api[_-]?key|authorization)\b\s*[=:]\s*)"
    r"(?P<q>['\"]?)(?P<val>[^\s'\",;&]+)",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")
# An Authorization header's credentials, whatever the scheme ("Basic dXNlcjpwdw==").
_AUTH_HEADER = re.compile(
    r"(?P<key>\bauthorization\s*[=:]\s*)(?P<q>['\"]?)(?:[A-Za-z]+\s+)?[^\s'\",;&]+",
    re.IGNORECASE,
)
MASK = "***"

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever :func:`scrub` sees it from now on (in this process)."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _secrets.add(value)


def register_settings_secrets(settings: Any) -> None:
    """Register every secret a :class:`~tenant_pipelines.settings.Settings` holds.

    Database passwords are masked inside URLs anyway; registering them also masks them
    where a driver quotes them bare.
    """
    for name in ("control_url", "tenant_pg_url", "mssql_url"):
        url = getattr(settings, name, "")
        if url:
            with contextlib.suppress(Exception):
                register_secret(sa.make_url(url).password)
    register_secret(getattr(settings, "smtp_password", ""))
    register_secret(getattr(settings, "secret_key", ""))


def scrub(text: str) -> str:
    """Return ``text`` with every known kind of secret masked."""
    if not text:
        return text
    text = _URL_PASSWORD.sub(lambda m: m.group("pre") + MASK, text)
    text = _AUTH_HEADER.sub(lambda m: m.group("key") + m.group("q") + MASK, text)
    text = _BEARER.sub(lambda m: m.group(1) + " " + MASK, text)
    text = _KV_SECRET.sub(lambda m: m.group("key") + m.group("q") + MASK, text)
    with _secrets_lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def scrub_obj(value: Any) -> Any:
    """:func:`scrub` applied to every string inside a JSON-like value."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {str(k): scrub_obj(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_obj(v) for v in value]
    return value


# --- logs ------------------------------------------------------------------------------------


class ScrubFilter(logging.Filter):
    """Logging filter that scrubs the rendered message, its arguments and its traceback.

    Installed on the package logger itself (not only on a handler), so every handler of that
    logger sees the scrubbed record: the JSON handler on stderr and the handler Dagster adds
    for ``managed_python_loggers``, which writes the record into the run's event log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
        if record.exc_info:
            # The traceback text (messages of chained exceptions included) is rendered once,
            # scrubbed, and kept as exc_text, which every stdlib formatter prints instead.
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_text = scrub(formatted)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text)
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            record.fields = scrub_obj(dict(fields))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields given as ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            out.update(scrub_obj(dict(fields)))
        if record.exc_info:
            out["error"] = scrub(self.formatException(record.exc_info).splitlines()[-1])
        elif record.exc_text:
            out["error"] = scrub(record.exc_text.splitlines()[-1])
        return json.dumps(out, default=str)


LOGGER_NAME = "tenant_pipelines"
_logger_lock = threading.Lock()


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler on whatever ``sys.stderr`` is when a record is emitted.

    Binding the stream at creation would keep writing to a replaced stream (test capture,
    a daemonized process re-opening its standard streams).
    """

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def get_logger() -> logging.Logger:
    """The package logger, with the scrubbing filter installed on it (idempotent)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(f, ScrubFilter) for f in logger.filters):
        with _logger_lock:
            if not any(isinstance(f, ScrubFilter) for f in logger.filters):
                logger.addFilter(ScrubFilter())
    return logger


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the package logger, scrubbed (idempotent).

    The handler goes first in the logger's list: Dagster's managed-logger handler rewrites a
    record's message in place when it handles it, and the JSON line must show ours.
    """
    logger = get_logger()
    with _logger_lock:
        if any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
            return
        handler = StderrHandler()
        handler.setFormatter(JsonFormatter())
        handler.addFilter(ScrubFilter())
        logger.handlers.insert(0, handler)
        if logger.level == logging.NOTSET or logger.level > logging.getLevelName(level):
            logger.setLevel(level)


def json_only(level: int, message: str, fields: Mapping[str, Any]) -> None:
    """Log to the JSON stream only, not to Dagster's event log.

    For lines Dagster records as its own events already (a step's start is its STEP_START):
    every record of a managed logger costs one more event-log write in the run.
    """
    logger = get_logger()
    if not logger.isEnabledFor(level):
        return
    record = logger.makeRecord(
        logger.name, level, __file__, 0, message, (), None, extra={"fields": dict(fields)}
    )
    if logger.filter(record):
        for handler in logger.handlers:
            if isinstance(handler.formatter, JsonFormatter):
                handler.handle(record)


def kv(fields: Mapping[str, Any]) -> str:
    """``key=value`` pairs, for log messages that must carry their fields as text.

    Dagster's event log keeps only a record's message, not its ``extra`` fields, so step log
    messages repeat the fields this way.
    """
    parts = []
    for key, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


# --- traces ----------------------------------------------------------------------------------

TRACEPARENT_TAG = "tenant_pipelines/traceparent"
TRACE_FILE_ENV = "TP_TRACE_FILE"
SERVICE_NAME = "tenant-pipelines"
TRACER_NAME = "tenant_pipelines"

_provider: TracerProvider | None = None
_provider_lock = threading.Lock()
_propagator = TraceContextTextMapPropagator()


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON object per line to a file.

    Enabled with ``TP_TRACE_FILE`` (or ``OTEL_TRACES_EXPORTER=file``). Meant for tests and
    local debugging: it lets a test read the spans a run-worker process produced.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_to_dict(s), default=str) + "\n" for s in spans)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            # One write per batch: O_APPEND keeps concurrent writers' lines whole.
            os.write(fd, lines.encode())
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    """A finished span as plain JSON-able data (ids in hex, as in W3C traceparent)."""
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}" if ctx else None,
        "span_id": f"{ctx.span_id:016x}" if ctx else None,
        "parent_span_id": f"{parent.span_id:016x}" if parent else None,
        "parent_is_remote": bool(parent and parent.is_remote),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "status_description": span.status.description,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
        "links": [
            {"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
            for link in span.links
        ],
        "service": span.resource.attributes.get("service.name"),
        "pid": os.getpid(),
    }


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    """Which exporters the ``OTEL_*`` variables ask for; none unless something is set."""
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if raw:
        names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    elif environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        names = ["otlp"]
    else:
        names = []
    if environ.get(TRACE_FILE_ENV) and "file" not in names:
        names.append("file")
    return [n for n in names if n != "none"]


def _processors(environ: Mapping[str, str]) -> list[SpanProcessor]:
    out: list[SpanProcessor] = []
    for name in _exporter_names(environ):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # Endpoint, headers, timeout and compression come from OTEL_EXPORTER_OTLP_*.
            out.append(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            out.append(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif name == "file" and environ.get(TRACE_FILE_ENV):
            out.append(SimpleSpanProcessor(JsonLinesSpanExporter(environ[TRACE_FILE_ENV])))
        else:
            get_logger().warning(
                "unsupported trace exporter ignored",
                extra={"fields": {"exporter": name}},
            )
    return out


def tracer_provider() -> TracerProvider:
    """The process's SDK tracer provider, created on first use from ``OTEL_*`` variables.

    An SDK provider installed by someone else (``opentelemetry-instrument``) is reused. The
    provider flushes at interpreter exit, which is how a run worker's last spans get out.
    """
    global _provider
    if _provider is not None:
        return _provider
    with _provider_lock:
        if _provider is not None:
            return _provider
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            _provider = current
            return _provider
        resource = Resource.create()
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        provider = TracerProvider(resource=resource)
        for processor in _processors(os.environ):
            provider.add_span_processor(processor)
        trace.set_tracer_provider(provider)
        # set_tracer_provider refuses a second provider; use what is really global.
        installed = trace.get_tracer_provider()
        _provider = installed if isinstance(installed, TracerProvider) else provider
        return _provider


def tracer() -> trace.Tracer:
    """The package tracer."""
    return tracer_provider().get_tracer(TRACER_NAME)


def flush(timeout_millis: int = 1000) -> None:
    """Push buffered spans out now (a run's last step: the worker exits soon after)."""
    with contextlib.suppress(Exception):
        tracer_provider().force_flush(timeout_millis)


def traceparent(span: Span) -> str | None:
    """The W3C ``traceparent`` header value of ``span`` (None when it is not recording)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def trace_tags(
    headers: Mapping[str, str] | None = None,
    name: str = "tenant.request",
    attributes: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Run tags that make a provisioning run's step spans children of this request.

    Records a span for the request (a child of the caller's ``traceparent`` header when there
    is one) and returns ``{TRACEPARENT_TAG: <that span's traceparent>}`` for the run's tags.
    Called by the API before it launches a run: ``runs.create_tenant(..., extra_tags=...)``.
    """
    carrier = {k.lower(): v for k, v in (headers or {}).items() if k.lower() == "traceparent"}
    parent = _propagator.extract(carrier) if carrier else None
    span = tracer().start_span(
        name, context=parent, kind=trace.SpanKind.SERVER, attributes=dict(attributes or {})
    )
    try:
        value = traceparent(span)
    finally:
        span.end()
    return {TRACEPARENT_TAG: value} if value else {}


def _run_span_context(run_id: str) -> SpanContext:
    # A run launched without a traceparent (CLI, sensor) still gets one trace: its id is the
    # run's UUID, and every step span hangs under the same synthetic parent span id.
    digest = hashlib.sha256(run_id.encode()).digest()
    trace_id = int(run_id.replace("-", ""), 16) if len(run_id.replace("-", "")) == 32 else 0
    if not trace_id:
        trace_id = int.from_bytes(digest[8:24], "big")
    return SpanContext(
        trace_id=trace_id,
        span_id=int.from_bytes(digest[:8], "big") or 1,
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )


def run_parent(
    run_id: str, tag_value: str | None, inherited: bool
) -> tuple[otel_context.Context, list[Link]]:
    """The parent context of a run's step spans, and links to add to them.

    ``tag_value`` is the run's :data:`TRACEPARENT_TAG`. ``inherited`` says the tag was copied
    from a parent run by a re-execution: such a run gets a trace of its own, linked to the
    parent's, so each run stays one trace.
    """
    links: list[Link] = []
    if tag_value:
        extracted = _propagator.extract({"traceparent": tag_value})
        span_ctx = trace.get_current_span(extracted).get_span_context()
        if span_ctx.is_valid:
            if not inherited:
                return extracted, links
            links.append(Link(span_ctx, {"link.reason": "re-execution of the parent run"}))
    parent = NonRecordingSpan(_run_span_context(run_id))
    return trace.set_span_in_context(parent), links


def _record_error(span: Span, message: str, error_type: str) -> None:
    # Never span.record_exception(exc): it stores str(exc) and the stack unscrubbed.
    span.add_event("exception", {"exception.type": error_type, "exception.message": message})
    span.set_status(Status(StatusCode.ERROR, message))


@dataclass
class StepSpan:
    """A step's span and how the step ended; the step wrapper fills in the outcome."""

    span: Span
    outcome: str | None = None

    def succeeded(self) -> None:
        self.outcome = "success"
        self.span.set_attribute("outcome", "success")

    def failed(self, message: str, error_type: str, *, retrying: bool = False) -> None:
        """Record a scrubbed failure; ``retrying`` marks a transient one Dagster retries."""
        self.outcome = "retrying" if retrying else "failed"
        self.span.set_attribute("outcome", self.outcome)
        _record_error(self.span, scrub(message), error_type)

    def cancelled(self) -> None:
        self.outcome = "cancelled"
        self.span.set_attribute("outcome", "cancelled")
        _record_error(self.span, "run terminated", "DagsterExecutionInterruptedError")

    @property
    def trace_id(self) -> str:
        return f"{self.span.get_span_context().trace_id:032x}"


@contextlib.contextmanager
def step_span(
    step: str,
    *,
    run_id: str,
    tag_value: str | None,
    inherited: bool,
    attributes: Mapping[str, str | int],
) -> Iterator[StepSpan]:
    """A span for one attempt of one step, current for the body (so module spans nest)."""
    parent, links = run_parent(run_id, tag_value, inherited)
    span = tracer().start_span(
        step,
        context=parent,
        attributes={"step": step, "dagster.run_id": run_id, **attributes},
        links=links,
    )
    holder = StepSpan(span)
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield holder
    except BaseException as exc:
        if holder.outcome is None:
            holder.failed(_describe(exc), type(exc).__name__)
        raise
    finally:
        otel_context.detach(token)
        span.end()


@contextlib.contextmanager
def child_span(name: str, attributes: Mapping[str, str | int] | None = None) -> Iterator[Span]:
    """A child of the current span; a failure inside is recorded on it, scrubbed."""
    with tracer().start_as_current_span(
        name,
        attributes=dict(attributes or {}),
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            _record_error(span, scrub(_describe(exc)), type(exc).__name__)
            raise


@contextlib.contextmanager
def module_span(module: str) -> Iterator[dict[str, Any]]:
    """The per-module span of the migrations step (``migrate.apply``'s ``on_module`` hook).

    ``apply`` fills the yielded dict with the module's revisions before and after.
    """
    info: dict[str, Any] = {}
    with child_span(f"migrate {module}", {"module": module}) as span:
        try:
            yield info
        finally:
            for key in ("before", "after"):
                span.set_attribute(f"migration.{key}", str(info.get(key) or "base"))
            if "before" in info and "after" in info:
                span.set_attribute("migration.changed", info["before"] != info["after"])


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# --- metrics ---------------------------------------------------------------------------------

PROVISION_BUCKETS: tuple[float, ...] = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
STEP_BUCKETS: tuple[float, ...] = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)


@dataclass
class HistogramData:
    """Cumulative bucket counts (le -> count), observation count and sum, for one label set."""

    buckets: dict[float, int] = field(default_factory=dict)
    count: int = 0
    total: float = 0.0


@dataclass
class MetricsSnapshot:
    """Everything /metrics exposes, read from the control plane in one go."""

    provision: dict[str, HistogramData]
    steps: dict[str, HistogramData]
    step_failures: dict[str, int]
    statuses: dict[str, int]
    active: int


# Kept by the trigger of control-plane revision control_0003 (migrations/control/versions/
# 0003_metrics_rollup.py), in the same transaction as each audit insert.
metrics_rollup = sa.Table(
    "metrics_rollup",
    sa.MetaData(),
    sa.Column("metric", sa.String(32), primary_key=True),
    sa.Column("label", sa.String(64), primary_key=True),
    sa.Column("le", sa.String(16), primary_key=True),
    sa.Column("n", sa.BigInteger, nullable=False),
    sa.Column("total", sa.Float, nullable=False),
)


def _histograms(
    rows: Iterable[Any], metric: str, bounds: Sequence[float]
) -> dict[str, HistogramData]:
    """Cumulative histograms from the rollup's per-bucket counts and ``sum`` rows."""
    per_bucket: dict[str, dict[str, int]] = {}
    out: dict[str, HistogramData] = {}
    for row in rows:
        if row.metric != metric:
            continue
        if row.le == "sum":
            out.setdefault(row.label, HistogramData())
            out[row.label].count = int(row.n)
            out[row.label].total = float(row.total)
        else:
            per_bucket.setdefault(row.label, {})[row.le] = int(row.n)
    for label, h in out.items():
        counts = per_bucket.get(label, {})
        running = 0
        for bound in bounds:
            running += counts.get(_le(bound), 0)
            h.buckets[bound] = running
    return out


def read_metrics(settings: Any) -> MetricsSnapshot:
    """Every metric value: the rollup table (a few dozen rows) and tenant counts by status.

    ``settings`` is a :class:`tenant_pipelines.settings.Settings`.
    """
    from . import registry

    t = registry.tenants
    with registry.engine(settings).connect() as conn:
        rollup = conn.execute(sa.select(metrics_rollup)).all()
        statuses = {
            str(s): int(n)
            for s, n in conn.execute(sa.select(t.c.status, sa.func.count()).group_by(t.c.status))
        }
        active = int(
            conn.execute(
                sa.select(sa.func.count()).where(t.c.status == "active", t.c.is_active.is_(True))
            ).scalar_one()
        )
    for status in registry.STATUSES:
        statuses.setdefault(status, 0)
    return MetricsSnapshot(
        provision=_histograms(rollup, "provision_duration", PROVISION_BUCKETS),
        steps=_histograms(rollup, "step_duration", STEP_BUCKETS),
        step_failures={r.label: int(r.n) for r in rollup if r.metric == "step_failures"},
        statuses=statuses,
        active=active,
    )


def _histogram_family(
    name: str, doc: str, label: str, data: Mapping[str, HistogramData], bounds: Sequence[float]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=[label])
    for key in sorted(data):
        h = data[key]
        buckets: list[tuple[str, float]] = [(_le(b), float(h.buckets.get(b, 0))) for b in bounds]
        buckets.append(("+Inf", float(h.count)))
        family.add_metric([key], buckets, h.total)
    return family


def _le(bound: float) -> str:
    return str(float(bound))


class ControlPlaneCollector(Collector):
    """Prometheus collector that reads the control plane at every scrape."""

    def __init__(self, settings: Any, read: Callable[[Any], MetricsSnapshot] = read_metrics):
        self.settings = settings
        self._read = read
        self.last_scrape_s = 0.0

    def describe(self) -> Iterable[Metric]:
        # Nothing at registration time: describing would need a database round trip.
        return []

    def collect(self) -> Iterable[Metric]:
        started = time.perf_counter()
        snap = self._read(self.settings)
        yield _histogram_family(
            "provision_duration_seconds",
            "Whole provisionings, first 'started' to completed/failed/cancelled, by outcome.",
            "outcome",
            snap.provision,
            PROVISION_BUCKETS,
        )
        yield _histogram_family(
            "provision_step_duration_seconds",
            "Duration of every step attempt (succeeded or failed), by step.",
            "step",
            snap.steps,
            STEP_BUCKETS,
        )
        failures = CounterMetricFamily(
            "provision_step_failures", "Failed step attempts, by step.", labels=["step"]
        )
        for key in sorted(snap.step_failures):
            failures.add_metric([key], float(snap.step_failures[key]))
        yield failures
        yield GaugeMetricFamily(
            "active_tenants", "Tenants that are provisioned and serving.", value=float(snap.active)
        )
        by_status = GaugeMetricFamily(
            "tenants_by_status", "Tenants in each catalog status.", labels=["status"]
        )
        for key in sorted(snap.statuses):
            by_status.add_metric([key], float(snap.statuses[key]))
        yield by_status
        self.last_scrape_s = time.perf_counter() - started
        yield GaugeMetricFamily(
            "tenant_pipelines_metrics_read_seconds",
            "Time this scrape spent reading the control plane.",
            value=self.last_scrape_s,
        )


def metrics_text(settings: Any) -> bytes:
    """The Prometheus text exposition of every metric (a fresh read of the control plane)."""
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry(auto_describe=False)
    reg.register(ControlPlaneCollector(settings))
    return generate_latest(reg)
