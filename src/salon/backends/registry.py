"""Turns configured `provider:model` ids into backends. Several models can be active at
once; each provider's backend is built once and shared by its models. An id with a
`routes` entry becomes a `Router` over its targets (which share those backends too)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from salon.backends.base import TextBackend
from salon.backends.fakes import FakeBackend
from salon.backends.instrumented import InstrumentedBackend
from salon.backends.openai_http import OpenAIHttpBackend
from salon.backends.router import Probe, Router, Target, models_probe
from salon.backends.traced import TracedBackend
from salon.errors import ConfigError, UnknownModel
from salon.observability.metrics import Metrics
from salon.observability.tracing import Tracing
from salon.settings import ProviderSettings, RouteSettings, Settings

Progress = Callable[[str], None]

BUILT_IN = {
    "embedded": ProviderSettings(kind="embedded"),
    "fake": ProviderSettings(kind="fake"),
}


@dataclass(frozen=True, slots=True)
class ModelRoute:
    id: str  # provider:model, as configured
    provider: str
    name: str  # what the backend calls it
    backend: TextBackend  # measured when the registry has metrics
    # The operator's privacy rule: may personal data (memories, instructions) go to it?
    personal_data: bool = True
    # Does it continue a trailing assistant message (an answer salon starts for it)?
    continues: bool = True


class BackendRegistry:
    def __init__(
        self,
        settings: Settings,
        progress: Progress | None = None,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._settings = settings
        self._progress = progress
        self._metrics = metrics
        self._tracing = tracing
        self._backends: dict[str, TextBackend] = {}  # as built, unwrapped
        self._measured: dict[str, TextBackend] = {}
        self._routes: dict[str, ModelRoute] = {}
        self._routers: list[Router] = []
        # Each model id's (provider, model) pairs: one, or a route's targets.
        self._parts: dict[str, list[tuple[str, str]]] = {}
        for model_id in settings.models:
            provider, _, name = model_id.partition(":")
            route = settings.routes.get(model_id)
            if route is None:
                parts = [(provider, name)]
                backend = self._backend(provider)
            else:
                parts = [_split(target) for target in route.targets]
                backend = self._router(model_id, route, parts)
            if tracing is not None:  # a generation span around each request of this model
                backend = TracedBackend(backend, tracing, provider=provider, model_id=model_id)
            self._parts[model_id] = parts
            # A route may carry personal data only if every target it can fail over to may.
            personal = all(self._config(p).shares_personal_data for p, _ in parts)
            continues = all(self._config(p).continues for p, _ in parts)
            self._routes[model_id] = ModelRoute(
                model_id, provider, name, backend, personal, continues
            )

    @property
    def ids(self) -> list[str]:
        return list(self._routes)

    @property
    def default(self) -> str:
        return self._settings.default_model

    def resolve(self, model_id: str | None) -> ModelRoute:
        route = self._routes.get(model_id or self.default)
        if route is None:
            raise UnknownModel(
                f"unknown model {model_id!r}; available: {', '.join(self._routes)}",
                param="model",
            )
        return route

    def resolve_internal(self, model_id: str) -> ModelRoute:
        """A model salon consults itself (the safety guard) without offering it to users: an
        id from `models` resolves as usual (a route, say); any other `provider:model` gets its
        provider's shared backend, measured and closed with the others."""
        if model_id in self._routes:
            return self._routes[model_id]
        provider, name = _split(model_id)
        config = self._config(provider)
        return ModelRoute(
            model_id,
            provider,
            name,
            self._backend(provider),
            config.shares_personal_data,
            config.continues,
        )

    def _config(self, provider: str) -> ProviderSettings:
        config = self._settings.providers.get(provider) or BUILT_IN.get(provider)
        if config is None:
            raise ConfigError(
                f"provider {provider!r} is not configured "
                f"(set SALON_PROVIDERS__{provider.upper()}__BASE_URL)"
            )
        return config

    def _backend(self, provider: str) -> TextBackend:
        if provider not in self._backends:
            config = self._config(provider)
            built = self._build(provider, config)
            self._backends[provider] = built
            self._measured[provider] = (
                built
                if self._metrics is None
                else InstrumentedBackend(built, provider, self._metrics)
            )
            if self._tracing is not None:  # a backend-call span around each attempt
                self._measured[provider] = TracedBackend(
                    self._measured[provider], self._tracing, provider=provider
                )
        return self._measured[provider]

    def _router(self, route_id: str, route: RouteSettings, parts: list[tuple[str, str]]) -> Router:
        targets = [
            Target(f"{provider}:{name}", self._backend(provider), name, self._probe(provider))
            for provider, name in parts
        ]
        metrics = self._metrics.route(route_id) if self._metrics is not None else None
        # The targets are the shared per-provider backends: the registry closes those.
        router = Router(route_id, targets, route, metrics=metrics, close_targets=False)
        self._routers.append(router)
        return router

    def _probe(self, provider: str) -> Probe | None:
        config = self._config(provider)
        if config.kind != "openai" or not config.base_url:
            return None
        key = config.api_key.get_secret_value() if config.api_key else None
        return models_probe(config.base_url, key)

    def _build(self, provider: str, config: ProviderSettings) -> TextBackend:
        if config.kind == "fake":
            return FakeBackend(config.fake_delay_s)
        if config.kind == "embedded":
            from salon.backends.embedded import EmbeddedBackend

            return EmbeddedBackend(
                self._settings.embedded, self._settings.model_cache_dir, self._progress
            )
        if not config.base_url:
            raise ConfigError(f"provider {provider!r} needs a base_url")
        key = config.api_key.get_secret_value() if config.api_key else None
        return OpenAIHttpBackend(
            config.base_url,
            key,
            connect_timeout_s=config.connect_timeout_s,
            read_timeout_s=config.read_timeout_s,
            continues=config.continues,
            inject=self._tracing.inject
            if self._tracing is not None and self._tracing.propagate_to_backends
            else None,
        )

    async def warm_up(self) -> None:
        """Load the embedded models now rather than on the first message."""
        for parts in self._parts.values():
            for provider, name in parts:
                load = getattr(self._backends[provider], "load", None)
                if load is not None:
                    await load(name, self._progress)

    async def close(self) -> None:
        for router in self._routers:  # their probes first, then the backends they use
            await router.close()
        for backend in self._backends.values():
            await backend.close()


def _split(target: str) -> tuple[str, str]:
    provider, _, name = target.partition(":")
    return provider, name
