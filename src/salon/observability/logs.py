"""Structured logs: one JSON object per line, with the request id of the work in progress.
Anything that looks like a secret is masked, whatever its source."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any, Literal

from salon.observability.context import request_id

# Attributes every LogRecord has; anything else was passed with `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "request_id",
    "color_message",  # uvicorn's, with terminal escapes
}
_SECRET_KEYS = re.compile(r"authorization|cookie|password|secret|token|api_key", re.IGNORECASE)
_MASK = "[redacted]"
# Bearer credentials and salon's API keys, should one slip into a message.
_SECRET_VALUES = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+|\bsk-[A-Za-z0-9_\-]{8,}")


def _mask_text(text: str) -> str:
    return _SECRET_VALUES.sub(lambda m: (m.group(1) or "") + _MASK, text)


def _mask(key: str, value: Any) -> Any:
    if _SECRET_KEYS.search(key):
        return _MASK
    if isinstance(value, str):
        return _mask_text(value)
    if isinstance(value, dict):
        return {str(k): _mask(str(k), v) for k, v in value.items()}
    return value


class JsonFormatter(logging.Formatter):
    """time, level, logger, message, request_id, then the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _mask_text(record.getMessage()),
            "request_id": getattr(record, "request_id", None) or request_id.get(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = _mask(key, value)
        if record.exc_info:
            entry["exception"] = _mask_text(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The human format, with the request id when there is one."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = _mask_text(super().format(record))
        rid = getattr(record, "request_id", None) or request_id.get()
        return f"{line} [request_id={rid}]" if rid else line


def configure_logging(level: str, log_format: Literal["text", "json"]) -> None:
    """One handler on the root logger, used by salon and uvicorn alike."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
