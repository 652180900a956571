"""The exception tree. Every error a user can cause or meet is one of these.

    SalonError                       (status 500, code "internal_error")
    ├── InvalidRequest               400 invalid_request_error
    │   └── ContextTooLong           400 context_length_exceeded
    ├── Unauthenticated              401 invalid_api_key / unauthenticated
    ├── PermissionDenied             403 permission_denied
    ├── NotFound                     404 not_found
    │   └── UnknownModel             404 model_not_found
    ├── Conflict                     409 conflict
    ├── PayloadTooLarge              413 payload_too_large
    ├── RateLimited                  429 rate_limit_exceeded  (requests per minute)
    │   └── QuotaExceeded            429 quota_exceeded       (completion tokens per day)
    ├── Overloaded                   503 overloaded           (a model's queue is full or slow)
    ├── ConfigError                  500 configuration_error  (raised at start-up)
    └── BackendError                 502 backend_error
        ├── BackendUnavailable       503 backend_unavailable   (cannot connect, 5xx)
        └── BackendTimeout           504 backend_timeout

The HTTP layer maps this tree to responses in exactly one place (`salon.api.errors`);
nothing else matches on messages or status codes.
"""

from __future__ import annotations


class SalonError(Exception):
    status = 500
    code = "internal_error"

    def __init__(
        self, message: str, *, param: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        # When trying again makes sense, and not before (sent as Retry-After).
        self.retry_after_s = retry_after_s


class InvalidRequest(SalonError):
    status = 400
    code = "invalid_request_error"


class ContextTooLong(InvalidRequest):
    code = "context_length_exceeded"


class Unauthenticated(SalonError):
    status = 401
    code = "unauthenticated"


class PermissionDenied(SalonError):
    status = 403
    code = "permission_denied"


class NotFound(SalonError):
    status = 404
    code = "not_found"


class UnknownModel(NotFound):
    code = "model_not_found"


class Conflict(SalonError):
    status = 409
    code = "conflict"


class PayloadTooLarge(SalonError):
    status = 413
    code = "payload_too_large"


class RateLimited(SalonError):
    """The caller (a user or an API key) is over its own limit: its fault, so 429."""

    status = 429
    code = "rate_limit_exceeded"


class QuotaExceeded(RateLimited):
    code = "quota_exceeded"


class Overloaded(SalonError):
    """salon itself is at capacity for a model (queue full, or the wait ran out): not the
    caller's fault, so 503. Not a BackendError: a router must not fail over on it."""

    status = 503
    code = "overloaded"


class ConfigError(SalonError):
    code = "configuration_error"


class BackendError(SalonError):
    status = 502
    code = "backend_error"


class BackendUnavailable(BackendError):
    status = 503
    code = "backend_unavailable"


class BackendTimeout(BackendError):
    status = 504
    code = "backend_timeout"
