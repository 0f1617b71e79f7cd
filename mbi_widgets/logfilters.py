"""Keeping secrets out of logs: redacting filters on the loggers of the HTTP and OAuth libraries we drive.

At DEBUG, requests-oauthlib logs token requests and answers whole (access and refresh tokens, the
platform's secret key, device codes), urllib3 logs request lines (a callback URL carries the
Connect code and state) and uvicorn's access log records every query string. A filter on a
logger sees its records before any handler, so redacting there keeps them out of every
destination (console, files, pytest's caplog) while the rest of each message stays useful.
"""
from __future__ import annotations

import logging
import threading

from mbi_widgets.redaction import redact_text

#: Loggers (and their children) whose messages may carry secrets.
SECRET_BEARING = ("requests_oauthlib", "oauthlib", "urllib3", "stripe", "uvicorn.error", "mbi_widgets")
#: uvicorn's access log; its formatter unpacks exactly five arguments, so they are redacted in place.
ACCESS_LOG = "uvicorn.access"

_install_lock = threading.Lock()


class RedactingFilter(logging.Filter):
    """Replaces a record's message (and formatted traceback) with a redacted copy; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging report it as it would
            return True
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return True


class AccessLogFilter(logging.Filter):
    """Redacts the request line's query values (code, state, user_code, ...) in uvicorn's access records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_text(arg) if isinstance(arg, str) else arg for arg in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact_text(record.msg)
        return True


def _loggers_under(prefix: str) -> list[logging.Logger]:
    names = [name for name in list(logging.root.manager.loggerDict) if name.startswith(f"{prefix}.")]
    return [logging.getLogger(prefix), *(logging.getLogger(name) for name in names)]


def _add_once(logger: logging.Logger, kind: type[logging.Filter]) -> None:
    if not any(isinstance(existing, kind) for existing in logger.filters):
        logger.addFilter(kind())


def install_log_redaction() -> None:
    """Adds the filters to every logger that exists under `SECRET_BEARING` and to uvicorn's access log.

    Idempotent. A logger filter does not apply to its children's records, so each existing child
    gets one; modules call this after importing the libraries whose loggers it must cover.
    """
    with _install_lock:
        for prefix in SECRET_BEARING:
            for logger in _loggers_under(prefix):
                _add_once(logger, RedactingFilter)
        _add_once(logging.getLogger(ACCESS_LOG), AccessLogFilter)
