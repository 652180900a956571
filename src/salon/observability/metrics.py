"""salon's Prometheus metrics, on a registry of their own (no import-time global state):
the composition root builds one `Metrics` and hands it to the backend registry, the HTTP
middleware and the /metrics route.

Hot-path rule: the labelled children are looked up once per (backend, model) or
(method, route, status) and cached, so a chunk costs a clock read and one observe."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

# Seconds. Time to first token spans a cached prompt on a GPU to a cold CPU model.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 5)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 300)
# A guard model's answer is a few tokens, bounded by its timeout (3 s by default).
GUARD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10)


class FastHistogram:
    """One labelled histogram, observed per chunk: a bisect and two additions, no lock
    (prometheus_client's takes one per observation, ~1.8 µs). Written and scraped on the
    event loop's thread only."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class FastHistograms(Collector):
    """A family of `FastHistogram`s by label values, exposed as a Prometheus histogram."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], bounds: Sequence[float]
    ):
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        self.bounds = tuple(bounds)
        self.children: dict[tuple[str, ...], FastHistogram] = {}

    def child(self, *values: str) -> FastHistogram:
        found = self.children.get(values)
        if found is None:
            found = self.children[values] = FastHistogram(self.bounds)
        return found

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, child in list(self.children.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*self.bounds, float("inf")), child.counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric(list(values), buckets, child.sum)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labels)


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    """The children of one backend + model, looked up once."""

    backend: str
    model: str
    ttft: FastHistogram
    itl: FastHistogram
    completion_tokens: Counter
    in_flight: Gauge
    _requests: Counter
    _up: Gauge  # the parents: a backend's health appears once it has been observed
    _last_error: Gauge

    def outcome(self, outcome: str) -> None:
        self._requests.labels(self.backend, self.model, outcome).inc()

    def healthy(self) -> None:
        self._up.labels(self.backend).set(1)

    def failed(self) -> None:
        self._up.labels(self.backend).set(0)
        self._last_error.labels(self.backend).set(time.time())


@dataclass(frozen=True, slots=True)
class RouteMetrics:
    """A router's metrics (salon.backends.router): breaker state per target and failovers.
    Both change rarely (a state change, a failed attempt), so children are looked up per call."""

    route: str
    _breaker: Gauge
    _failovers: Counter

    def breaker(self, target: str, state: int) -> None:
        self._breaker.labels(self.route, target).set(state)

    def failover(self, target: str) -> None:
        self._failovers.labels(self.route, target).inc()


@dataclass(frozen=True, slots=True)
class QueueMetrics:
    """One model's admission queue (salon.chat.admission): set on every change, which is
    per request, not per chunk."""

    model: str
    depth: Gauge
    in_flight: Gauge
    _refused: Counter

    def refused(self, reason: str) -> None:
        self._refused.labels(self.model, reason).inc()


@dataclass(frozen=True, slots=True)
class GuardMetrics:
    """The harm gate's guard model (salon.safety.guard): one observation per consultation,
    which is per gray (or every) user turn, not per chunk."""

    model: str
    _consultations: Counter
    _duration: Histogram

    def consulted(self, outcome: str, seconds: float) -> None:
        self._consultations.labels(self.model, outcome).inc()
        self._duration.labels(self.model).observe(seconds)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        model = ("backend", "model")
        self._ttft = FastHistograms(
            "salon_backend_time_to_first_token_seconds",
            "From the call to the backend to its first text chunk.",
            model,
            TTFT_BUCKETS,
        )
        self._itl = FastHistograms(
            "salon_backend_inter_token_latency_seconds",
            "Between two consecutive text chunks of one stream.",
            model,
            ITL_BUCKETS,
        )
        r.register(self._ttft)
        r.register(self._itl)
        self._tokens = Counter(
            "salon_backend_completion_tokens",
            "Completion tokens produced (the backend's usage; chunks when it reports none).",
            model,
            registry=r,
        )
        self._requests = Counter(
            "salon_backend_requests",
            "Backend streams by outcome: ok, cancelled, or the error code.",
            (*model, "outcome"),
            registry=r,
        )
        self._in_flight = Gauge(
            "salon_backend_in_flight", "Backend streams in progress.", model, registry=r
        )
        self._up = Gauge(
            "salon_backend_up",
            "1 after the backend's last stream started or ended well, 0 after it failed "
            "(passive: absent until the backend is used).",
            ("backend",),
            registry=r,
        )
        self._last_error = Gauge(
            "salon_backend_last_error_timestamp_seconds",
            "Unix time of the backend's last failure (transport, 5xx, timeout).",
            ("backend",),
            registry=r,
        )
        self._http_requests = Counter(
            "salon_http_requests",
            "HTTP requests by method, route template and status.",
            ("method", "route", "status"),
            registry=r,
        )
        self._http_duration = Histogram(
            "salon_http_request_duration_seconds",
            "From the request to the end of the response (the whole stream for SSE).",
            ("method", "route"),
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self._route_breaker = Gauge(
            "salon_route_breaker_state",
            "A route target's circuit breaker: 0 closed, 1 half-open, 2 open (skipped).",
            ("route", "target"),
            registry=r,
        )
        self._route_failovers = Counter(
            "salon_route_failovers",
            "Attempts of a route that failed before the first token (the next target was tried).",
            ("route", "target"),
            registry=r,
        )
        self._queue_depth = Gauge(
            "salon_queue_depth", "Requests waiting for a generation slot.", ("model",), registry=r
        )
        self._queue_in_flight = Gauge(
            "salon_queue_in_flight", "Generation slots in use.", ("model",), registry=r
        )
        self._refused = Counter(
            "salon_admission_refused",
            "Requests refused before generating, by reason: queue_full, queue_timeout, "
            "rate_limit, quota.",
            ("model", "reason"),
            registry=r,
        )
        self._guard_consultations = Counter(
            "salon_safety_guard_consultations",
            "Guard model consultations of the harm gate by outcome: safe, unsafe, or timeout, "
            "error, unparseable (no verdict: the embedded classifier's was used).",
            ("model", "outcome"),
            registry=r,
        )
        self._guard_duration = Histogram(
            "salon_safety_guard_duration_seconds",
            "From asking the guard model to its verdict (or to giving up on it).",
            ("model",),
            buckets=GUARD_BUCKETS,
            registry=r,
        )
        self._models: dict[tuple[str, str], ModelMetrics] = {}
        self._http: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def model(self, backend: str, model: str) -> ModelMetrics:
        found = self._models.get((backend, model))
        if found is None:
            found = ModelMetrics(
                backend,
                model,
                self._ttft.child(backend, model),
                self._itl.child(backend, model),
                self._tokens.labels(backend, model),
                self._in_flight.labels(backend, model),
                self._requests,
                self._up,
                self._last_error,
            )
            self._models[(backend, model)] = found
        return found

    def queue(self, model: str) -> QueueMetrics:
        return QueueMetrics(
            model,
            self._queue_depth.labels(model),
            self._queue_in_flight.labels(model),
            self._refused,
        )

    def guard(self, model: str) -> GuardMetrics:
        return GuardMetrics(model, self._guard_consultations, self._guard_duration)

    def route(self, route: str) -> RouteMetrics:
        return RouteMetrics(route, self._route_breaker, self._route_failovers)

    def http(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._http.get(key)
        if children is None:
            children = (
                self._http_requests.labels(method, route, str(status)),
                self._http_duration.labels(method, route),
            )
            self._http[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
