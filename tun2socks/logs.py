"""Logging to stderr as text or JSON lines, quiet by default, with registered secrets masked.

Structured fields travel in ``extra``; ``kv()`` builds it::

    log = logging.getLogger(__name__)
    log.info("flow opened", extra=kv(flow=7, dst="93.184.216.34:80"))

text (the default)::

    2026-11-27T17:00:00.123Z info tun2socks.relay: flow opened flow=7 dst=93.184.216.34:80

json, one object per line (a field named like a base key gets a trailing ``_``)::

    {"ts": "2026-11-27T17:00:00.123Z", "level": "info", "logger": "tun2socks.relay",
     "msg": "flow opened", "flow": 7, "dst": "93.184.216.34:80"}

In text, a value that is empty or holds spaces, quotes or '=' is written as a JSON string.
Every finished line goes through ``redact()``, which replaces each value given to
``register_secret()`` (the proxy password) by ``***``. That is a last line of defence: code
must still never log a secret.
"""

import json
import logging
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import quote

from tun2socks.config import LogConfig

SUMMARY_LOGGER = "tun2socks.summary"  # tun2socks.observe.startup logs there

__all__ = [
    "SUMMARY_LOGGER",
    "JsonFormatter",
    "TextFormatter",
    "kv",
    "redact",
    "register_secret",
    "setup",
]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_MASK = "***"

_secrets: tuple[str, ...] = ()
_secrets_lock = threading.Lock()


def kv(**fields: object) -> dict[str, object]:
    """The ``extra`` argument that attaches structured fields to one log record."""
    return {"fields": fields}


def register_secret(value: str) -> None:
    """Mask ``value`` in every line written from now on (also its escaped spellings)."""
    global _secrets
    if not value:
        return
    spellings = {
        value,
        quote(value, safe=""),  # as it appears inside a URL
        json.dumps(value, ensure_ascii=False)[1:-1],  # inside a JSON string
        repr(value)[1:-1],  # inside a repr()
    }
    with _secrets_lock:
        # Longest first, so a secret that contains another is masked whole.
        _secrets = tuple(sorted(set(_secrets) | spellings, key=len, reverse=True))


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> Mapping[str, object]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


def _text_value(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """``TIME level logger: message key=value ...``, then any traceback on following lines."""

    def format(self, record: logging.LogRecord) -> str:
        fields = "".join(f" {key}={_text_value(value)}" for key, value in _fields(record).items())
        line = (
            f"{_timestamp(record)} {record.levelname.lower()} {record.name}: "
            f"{record.getMessage()}{fields}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the fields, and exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            entry[f"{key}_" if key in entry else key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _StderrHandler(logging.Handler):
    """Writes to the current ``sys.stderr`` (not the one at set-up), masking secrets."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = redact(self.format(record))
            stream = sys.stderr
            stream.write(text + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def setup(log: LogConfig) -> None:
    """Send all logging to stderr in ``log.format`` at ``log.level``; calling again replaces it."""
    root = logging.getLogger()
    for existing in root.handlers[:]:  # ours, however many a caller's save/restore left
        if isinstance(existing, _StderrHandler):
            root.removeHandler(existing)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if log.format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(_LEVELS[log.level])
    # The start-up summary and the proxy's comings and goings (info lines on this logger) show
    # at the default level, warning, too; log.level error silences them.
    summary_level = min(_LEVELS[log.level], logging.INFO) if log.level != "error" else logging.ERROR
    logging.getLogger(SUMMARY_LOGGER).setLevel(summary_level)
