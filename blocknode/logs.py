"""The node's log: the stdlib `logging`, configured once by `serve`.

Every line carries the time (UTC, ISO 8601, milliseconds), the level, the node
id and the logger name:

    2025-01-31T12:00:00.123Z INFO node1 blocknode.workers.scrub: scrub complete: 1200 blocks checked, 0 corrupt

With ``log_format = "json"`` each line is one JSON object instead, for log
shippers (keys ``time``, ``level``, ``node``, ``logger``, ``message``, plus
``exception`` when there is a traceback):

    {"time": "2025-01-31T12:00:00.123Z", "level": "INFO", "node": "node1", "logger": "blocknode.workers.scrub", "message": "scrub complete: ..."}

What goes out at which level: INFO for the node's life cycle (start with its
addresses and paths, stop) and the outcome of background work (scrub and
repair finished, blocks deleted by the GC, corrupt blocks found and healed);
WARNING for what needs a look; ERROR for a failure of the node's own work.
Nothing per request is logged at INFO.

Modules log through ``logging.getLogger(__name__)`` and never configure
logging themselves; a node built in-process (tests) logs wherever the host
program configured logging.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
DEFAULT_LEVEL = "info"
DEFAULT_FORMAT = "text"

# The handler `configure_logging` installs on the root logger, so that a second
# call replaces it instead of doubling every line.
_HANDLER_NAME = "blocknode"


def _timestamp(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``TIME LEVEL NODE LOGGER: MESSAGE`` (a traceback, if any, on the lines after)."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {self.node_id} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, node, logger, message (+ exception)."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "node": self.node_id,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


def configure_logging(node_id: str, *, level: str = DEFAULT_LEVEL, fmt: str = DEFAULT_FORMAT,
                      stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record at `level` or above to `stream` (default: stderr).

    Installs one handler on the root logger (replacing the one an earlier call
    installed) and sets the root level, so the INFO lines of the node's modules
    are no longer dropped by Python's default WARNING threshold. Python
    warnings (e.g. the pure fast path's) go to the same log. Returns the handler.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.name = _HANDLER_NAME
    handler.setFormatter(JsonFormatter(node_id) if fmt == "json" else TextFormatter(node_id))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.name == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    return handler


__all__ = ["DEFAULT_FORMAT", "DEFAULT_LEVEL", "FORMATS", "LEVELS", "JsonFormatter", "TextFormatter",
           "configure_logging"]
