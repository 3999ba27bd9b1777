"""Structured logging: one JSON object per line, level from the settings, no secrets.

Standard library only: gunicorn.conf.py names ``JsonFormatter`` for gunicorn's own
lines too, in the master, before gevent patches anything.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

#: Set in the WSGI environ of a request whose own line (or refusal count) is in the
#: request log, so that the access log (``access_log.py``) skips it: one line per request.
REQUEST_LOGGED = "smart.request_logged"

#: What a secret is replaced with (``smart.config.REDACTED``; not imported, so that
#: this module stays free of the package).
REDACTED = "***"

#: Attributes every LogRecord has; anything else a caller passed in ``extra`` is a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    """Renders a record as one JSON line: ts, level, logger, pid, msg and the extra fields.

    Every occurrence of one of ``secrets`` (``Settings.secrets``: the upstream URL's
    credentials and keys) in the line is replaced by ``REDACTED``, wherever it came
    from: a field, an exception's message, a traceback.
    """

    def __init__(self, *args: Any, secrets: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.secrets = tuple(secrets)

    def format(self, record: logging.LogRecord) -> str:
        text = self._render(record)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def _render(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(level: str, secrets: Iterable[str] = ()) -> None:
    """Send the application's logs, as JSON, to stdout (once per process).

    Under gunicorn the root logger already has a ``JsonFormatter`` (gunicorn.conf.py);
    it is kept, with these ``secrets``.
    """
    # No record needs thread or multiprocessing names (a worker is one thread of
    # greenlets), and looking them up is a quarter of the request log line's cost.
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    formatters = [h.formatter for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
    if formatters:
        for formatter in formatters:
            formatter.secrets = tuple(secrets)
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(secrets=secrets))
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _iso(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"
