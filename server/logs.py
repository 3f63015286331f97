"""What the server says: machine-readable event lines on stdout, the log on stderr.

``event(name, **fields)`` prints one JSON line on stdout: the ``listening`` line is how scripts,
the supervisor and the tests find the ports; ``stopped`` carries the drain's summary. Everything
else is logging, on stderr, set up by ``configure_logging``:

* ``--log-format text`` (the default): ``TIME LEVEL LOGGER: MESSAGE`` lines.
* ``--log-format json``: one JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
  ``message``, and, for a line logged while a request is handled, the request's ``model``,
  ``version``, ``trace_id`` and ``span_id`` where known (``REQUEST``, set by the data plane), plus
  an access line's own fields; ``exception`` holds a traceback.
* ``--access-log``: one line per inference request on the ``server.access`` logger (INFO, whatever
  ``--log-level`` says), through the same formatter.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any, Protocol

ACCESS_LOGGER = "server.access"
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RequestFields(Protocol):
    def log_fields(self) -> dict[str, Any]:
        """What is known of the request now: model, version, trace_id, span_id (each when known)."""
        ...


# The request the current task is handling (server.api.observe sets it; None outside requests).
REQUEST: ContextVar[RequestFields | None] = ContextVar("cnn_serve_request", default=None)


def event(name: str, **fields: Any) -> None:
    """One JSON line ``{"event": name, ...}`` on stdout, flushed at once.

    One ``write`` of the line with its newline: ``print`` writes the newline apart, and under
    ``PYTHONUNBUFFERED`` two workers sharing stdout could then glue two events into one line.
    """
    sys.stdout.write(json.dumps({"event": name, **fields}) + "\n")
    sys.stdout.flush()


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``static`` fields (a worker's index) go into every line."""

    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.static = static or {}

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self.static,
        }
        request = REQUEST.get()
        if request is not None:
            doc.update(request.log_fields())
        fields = getattr(record, "fields", None)  # an access line's (logging's extra=)
        if fields:
            doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def _utc(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def configure_logging(
    level: str, log_format: str = "text", access_log: bool = False, worker: int | None = None
) -> None:
    """The process's log on stderr in ``log_format``; ``worker``: the index of a ``--workers`` worker."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter({"worker": worker} if worker is not None else None))
    else:
        prefix = f"worker-{worker}[%(process)d] " if worker is not None else ""
        handler.setFormatter(logging.Formatter(TEXT_FORMAT.replace("%(name)s", prefix + "%(name)s")))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    if access_log:
        logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
