"""Logging: readable lines on stderr, one JSON line per request on stdout.

Two streams so that a supervisor's stdout log holds nothing but JSON lines (ready for
`jq` or a log shipper) while startup lines, warnings and errors stay readable on stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

REQUEST_LOGGER = "vlserve.request"
READABLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def printable(text: str) -> str:
    """`text` on one line: control (and other unprintable) characters escaped, so that text
    from a request (a path, a header) cannot start a fake log line."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode()
                   for char in text)


class ReadableFormatter(logging.Formatter):
    """One message, one line: whatever a message quotes is escaped (a traceback after it
    stays as it is)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message.rstrip("\n"))
        return super().formatMessage(record)


class JsonLineFormatter(logging.Formatter):
    """`{"ts", "level", "logger", ...fields}`: the fields come from `extra={"json_fields"}`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "json_fields", None)
        line.update(fields if isinstance(fields, dict) else {"message": record.getMessage()})
        return json.dumps(line, default=str)


def setup_logging(level: str) -> None:
    readable = logging.StreamHandler(sys.stderr)
    readable.setFormatter(ReadableFormatter(READABLE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [readable]
    root.setLevel(level.upper())

    as_json = logging.StreamHandler(sys.stdout)
    as_json.setFormatter(JsonLineFormatter())
    requests = logging.getLogger(REQUEST_LOGGER)
    requests.handlers[:] = [as_json]
    requests.propagate = False
