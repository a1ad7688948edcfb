"""Structured logs: one line per event, key=value (logfmt) or JSON, always with study UID and job id when known.

Patient names and IDs are never passed to these helpers at INFO; handlers log UIDs only.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import warnings
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({})))


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log one event; ``fields`` become key=value pairs (None values dropped). Positional-only parameters, so
    a field may be named ``level`` or ``event`` and a dict of fields never binds to them."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": {k: v for k, v in fields.items() if v is not None}})


def _quote(v: Any) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' "=\n\t'):
        return json.dumps(s)
    return s


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {}) or {}
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [
            f"ts={ts}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"event={_quote(record.getMessage())}",
        ]
        parts += [f"{k}={_quote(v)}" for k, v in fields.items()]
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class RedactValues(logging.Filter):
    """pydicom's validation warnings quote the offending value (a malformed birth date, a name): drop it."""

    _RX = re.compile(r"(Invalid value for VR \w\w: ).*", re.S)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "Invalid value for VR" in msg:
            record.msg, record.args = self._RX.sub(r"\1<redacted>", msg), ()
        return True


def configure_logging(level: str = "INFO", fmt: str = "logfmt") -> None:
    """The only place logging is configured (called by the CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    handler.addFilter(RedactValues())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at INFO with AE titles and (for some events) dataset summaries: keep it quiet.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # its transport logs every refused connection at ERROR, twice; the sender logs the classified outcome
    logging.getLogger("pynetdicom.transport").setLevel(logging.CRITICAL)
    # highdicom logs each copied module at INFO with source UIDs; MONAI warns about deprecated defaults of
    # the bundles' transforms on every load. Neither is an event an admin acts on.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", module=r"monai\..*")
    logging.captureWarnings(True)
