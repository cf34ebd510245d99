"""Scrubbing, structured logs, traces and metrics.

One scrubbing function serves logs, audit rows, API answers and Dagster's event log: it masks
passwords in URLs and key=value pairs, bearer tokens, and every value registered as a secret
in this process (database passwords, SMTP password, issued reset tokens).
"""

import json
import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

_URL_PASSWORD = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]+)(?=@)")
_KV_SECRET = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|secret|token|api[_-]?key|authorization)\b\s*[=:]\s*)"
    r"(?P<q>['\"]?)(?P<val>[^\s'\",;&]+)",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")
MASK = "***"

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever :func:`scrub` sees it from now on (in this process)."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _secrets.add(value)


def scrub(text: str) -> str:
    """Return ``text`` with every known kind of secret masked."""
    if not text:
        return text
    text = _URL_PASSWORD.sub(lambda m: m.group("pre") + MASK, text)
    text = _KV_SECRET.sub(lambda m: m.group("key") + m.group("q") + MASK, text)
    text = _BEARER.sub(lambda m: m.group(1) + " " + MASK, text)
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


class ScrubFilter(logging.Filter):
    """Logging filter that scrubs the rendered message and its arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
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
        return json.dumps(out, default=str)


LOGGER_NAME = "tenant_pipelines"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the package logger, scrubbed (idempotent)."""
    logger = get_logger()
    if any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ScrubFilter())
    logger.addHandler(handler)
    logger.setLevel(level)
