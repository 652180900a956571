"""Turns configured `provider:model` ids into backends. Several models can be active at
once; each provider's backend is built once and shared by its models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from salon.backends.base import TextBackend
from salon.backends.fakes import FakeBackend
from salon.backends.instrumented import InstrumentedBackend
from salon.backends.openai_http import OpenAIHttpBackend
from salon.errors import ConfigError, UnknownModel
from salon.observability.metrics import Metrics
from salon.settings import ProviderSettings, Settings

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


class BackendRegistry:
    def __init__(
        self,
        settings: Settings,
        progress: Progress | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._progress = progress
        self._metrics = metrics
        self._backends: dict[str, TextBackend] = {}  # as built, unwrapped
        self._measured: dict[str, TextBackend] = {}
        self._routes: dict[str, ModelRoute] = {}
        for model_id in settings.models:
            provider, _, name = model_id.partition(":")
            backend = self._backend(provider)
            self._routes[model_id] = ModelRoute(
                model_id, provider, name, backend, self._config(provider).shares_personal_data
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
        return self._measured[provider]

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
        )

    async def warm_up(self) -> None:
        """Load the embedded models now rather than on the first message."""
        for route in self._routes.values():
            load = getattr(self._backends[route.provider], "load", None)
            if load is not None:
                await load(route.name, self._progress)

    async def close(self) -> None:
        for backend in self._backends.values():
            await backend.close()
