"""How the long-running processes (node, gateway) log: plain lines, or one JSON object a line.

Text is for a terminal; ``--log-format json`` is for log shippers (journald, Loki, Fluent Bit,
a container runtime), which then need no pattern to split a line into time, level, logger and
message. A traceback stays inside its record (``exception``), so a record is always one line.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, and ``exception`` when it carries one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text") -> None:
    """The process's one log handler (stderr), at ``level``, in ``fmt`` (one of
    :data:`LOG_FORMATS`)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def json_logging() -> bool:
    """Whether the process logs JSON: then lines meant for the operator go through logging too,
    so that every line on stderr parses."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
