"""Metrics (Prometheus), request ids and structured logs. Nothing here holds global state
except the request-id context variable: the metrics live in a `Metrics` object that the
composition root builds, with its own `CollectorRegistry`."""
