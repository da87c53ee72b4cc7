"""structlog setup: JSON lines off a terminal, readable console on one, secrets always redacted."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_QUERY_SECRET_RE = re.compile(
    r"(?i)((?:accesskey|token|password|x-goog-signature|signature|x-goog-credential|x-amz-credential|x-amz-security-token)=)[^&\s\"'<>]+"
)
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_JSON_SECRET_RE = re.compile(r'(?i)("(?:token|password|accesskey)"\s*:\s*")[^"]*"')

_known_secrets: set[str] = set()


def register_secret(secret: str) -> None:
    """Remember a secret so any log line or stored error containing it is redacted."""
    if secret and len(secret) >= 4:
        _known_secrets.add(secret)


def redact(text: str) -> str:
    """Remove credentials from a string: query parameters, Bearer tokens and known secrets.

    Each pattern runs only where its literal part occurs (``=``, ``"``, "bearer" in any case):
    most strings logged (ids, paths, event names) have none, and the three searches were most
    of a log line's CPU (about 11 µs per string, 50 µs per line; measured)."""
    if "=" in text:
        text = _QUERY_SECRET_RE.sub(r"\1REDACTED", text)
    if "bearer" in text.lower():
        text = _BEARER_RE.sub(r"\1REDACTED", text)
    if '"' in text:
        text = _JSON_SECRET_RE.sub(r'\1REDACTED"', text)
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, "REDACTED")
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value(v) for v in value]
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    return value


def redact_processor(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the last step before rendering, so nothing escapes it."""
    return {k: _redact_value(v) for k, v in event_dict.items()}


class LogSink:
    """The stream logs go to, which never raises into the pipeline: a daemon whose stderr broke
    must go on archiving and still stop on SIGTERM, not fail each task that logs (a backfill
    ended with exit 1 and ``demo | head`` hung, deaf to SIGTERM). A line that cannot be written
    is dropped; once the stream is gone for good (the reader of a pipe gone, journald restarted,
    the stream closed) every later one is too, while after another error (a full disk under a
    redirect) the next line is tried again."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return int(self.stream.write(text))
            except (OSError, ValueError) as exc:
                self._failed(exc)
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (OSError, ValueError) as exc:
                self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        self.broken = isinstance(exc, (BrokenPipeError, ConnectionResetError, ValueError))

    def isatty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog once per process. ``fmt``: auto | json | console."""
    stream = LogSink(stream or sys.stderr)
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
