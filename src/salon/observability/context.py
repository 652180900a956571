"""The request id of the work in progress, carried by a context variable: set by the HTTP
middleware, inherited by the tasks a request starts (generation jobs), read by the logs."""

from __future__ import annotations

import os
import re
from contextvars import ContextVar

request_id: ContextVar[str | None] = ContextVar("salon_request_id", default=None)

# What a client may send as X-Request-ID: short, and nothing that could forge a log line or
# a header.
_VALID = re.compile(r"[A-Za-z0-9._:\-]{1,64}")


def valid_request_id(value: str | None) -> str | None:
    """`value` if it is a usable request id, else None."""
    if value and _VALID.fullmatch(value):
        return value
    return None


def new_request_id() -> str:
    return os.urandom(12).hex()
