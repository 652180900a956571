"""Configuration: `SALON_` environment variables, an optional TOML file, defaults.

Nested sections use `__` in environment variables, e.g. `SALON_EMBEDDED__THREADS=4`.
Documented in docs/configuration.md. There is no module-level instance: the composition
root (`salon.app.create_app`) and the CLI build one and pass it down.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_MODEL = "embedded:qwen2.5-coder-1.5b-instruct"


def model_id(value: str, what: str) -> str:
    """`value` when it is a `provider:model` id; else a validation error naming `what`."""
    provider, sep, name = value.partition(":")
    if not sep or not provider or not name:
        raise ValueError(f"{what} {value!r} is not of the form provider:model")
    return value


class ProviderSettings(BaseModel):
    """A named source of models. `openai` speaks the OpenAI-compatible HTTP protocol
    (vLLM, SGLang, llama.cpp server, Ollama, OpenAI itself); `fake` is the shipped test double."""

    kind: Literal["openai", "embedded", "fake"] = "openai"
    base_url: str | None = None
    api_key: SecretStr | None = None
    connect_timeout_s: float = 5.0
    # Longest silence allowed between two chunks (and before the first one).
    read_timeout_s: float = 300.0
    # Only for kind "fake": seconds between words of its slow model.
    fake_delay_s: float = 0.03
    # May salon send this provider a user's memories, custom instructions and "about you"?
    # Unset: yes for models that run here (embedded, fake), no for an OpenAI-compatible
    # endpoint, which may be a hosted API. The user's messages themselves always go.
    personal_data: bool | None = None
    # Does it continue a conversation's trailing assistant message instead of starting a new
    # one (llama.cpp server and Ollama do; vLLM and SGLang with `continue_final_message`)?
    # Unset: yes for models that run here, no for an OpenAI-compatible endpoint, which may be
    # a hosted API that ignores the prefix. Recovery uses it to start an answer for the model.
    continues_answers: bool | None = None

    @property
    def shares_personal_data(self) -> bool:
        if self.personal_data is not None:
            return self.personal_data
        return self.kind != "openai"

    @property
    def continues(self) -> bool:
        if self.continues_answers is not None:
            return self.continues_answers
        return self.kind != "openai"


class RoutePolicy(BaseModel):
    """How a route (`salon.backends.router.Router`) treats its targets. Defaults suit an
    interactive chat: a dead target costs one connection attempt, a hung one one
    `first_token_timeout_s`, and after `failures_to_open` of either it is skipped at once."""

    # A target that sends no first token within this long has failed (and the next is tried).
    first_token_timeout_s: float = Field(30.0, gt=0)
    # When the first token is this late, ask a second target too; the first to answer wins.
    hedge_after_s: float = Field(0.0, ge=0)  # 0 = off
    # Consecutive failures that open a target's circuit breaker (it is then skipped).
    failures_to_open: int = Field(3, ge=1)
    # How long an open breaker skips its target before one trial request may use it.
    cooldown_s: float = Field(15.0, ge=0)
    # Targets tried per request (failover and hedging), each at most once.
    max_attempts: int = Field(3, ge=1)
    # No new attempt starts this long after the request began.
    budget_s: float = Field(60.0, gt=0)
    # While a breaker is open, probe the target (`GET /models`) this often; 0 = off.
    probe_interval_s: float = Field(5.0, ge=0)
    probe_timeout_s: float = Field(2.0, gt=0)


class RouteSettings(RoutePolicy):
    """One logical model served by several `provider:model` targets, in order of preference."""

    targets: list[str] = Field(min_length=1)

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, value: list[str]) -> list[str]:
        for target in value:
            provider, sep, name = target.partition(":")
            if not sep or not provider or not name:
                raise ValueError(f"route target {target!r} is not of the form provider:model")
        return value


class EmbeddedSettings(BaseModel):
    threads: int | None = None  # None: all cores
    context_size: int = 8192
    # Conversations whose KV cache is kept resident (one llama.cpp slot each).
    slots: int = 1
    cache_dir: Path | None = None  # default: <data_dir>/models


class PersonalizationSettings(BaseModel):
    # Facts found in conversations are saved by high-precision rules ("rules"), by the chat
    # model in the background while it is idle ("model": for capable models — measured,
    # Qwen2.5-Coder-1.5B misses most facts and invents others, so its output is also checked
    # against the user's words), or not ("off"). Explicit requests ("remember that ...") are
    # always honoured while memory is on.
    extraction: Literal["model", "rules", "off"] = "rules"
    # The sentence-embedding model behind memory search: "minilm" (the packaged
    # all-MiniLM-L6-v2), "hashing" (no model; lexical quality only), a sentence-transformers
    # BERT folder, or "hf:<repo>" to fetch one from the Hugging Face Hub (needs network and
    # huggingface_hub), e.g. hf:sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2
    # for users who write in many languages.
    embedder: str = "minilm"
    # Check every reply against the checkable settings and repair what fails.
    enforce: bool = True
    # A failed check that only a new answer can repair gets one, if the first answer took
    # no longer than this (the revision should cost about as much again).
    revision_budget_s: float = 30.0
    # How long a deleted memory can be restored before it is erased for good.
    undo_minutes: int = 60
    personalities_file: Path | None = None  # default: the shipped presets


class SafetyGuardSettings(BaseModel):
    """An optional guard model that the harm gate consults (with `safety_enabled`), served by
    an OpenAI-compatible provider. docs/configuration.md, "Guard model"."""

    # `provider:model`, like the ids in `models` (it need not be one of them: a guard is not
    # offered to users). Unset: the embedded classifier alone.
    model: str | None = None
    # "instruct": any chat model (e.g. the embedded one) asked as a judge with salon's prompt.
    family: Literal["llama-guard-3", "wildguard", "shieldgemma", "instruct"] = "llama-guard-3"
    # "gray": only turns the embedded classifier is unsure about (harmful probability from 0.3
    # up to the policy's refusal threshold; 0.1 to 0.9 for "instruct"), so most turns cost
    # nothing more; "always": every turn.
    mode: Literal["gray", "always"] = "gray"
    # The whole consultation; past it (or on any failure) the embedded verdict stands.
    timeout_s: float = Field(3.0, gt=0)
    # Who renders the family's published prompt: "salon", sending it whole as one user message
    # (the server must use a pass-through chat template), or "server", sending the
    # conversation to the model's own chat template (Llama Guard 3 only: vLLM, SGLang, Ollama
    # ship it). Unset: "server" for llama-guard-3, "salon" for the others.
    prompt: Literal["salon", "server"] | None = None

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str | None) -> str | None:
        return None if value is None else model_id(value, "guard model")

    @model_validator(mode="after")
    def _check_prompt(self) -> SafetyGuardSettings:
        if self.prompt == "server" and self.family in ("wildguard", "shieldgemma"):
            raise ValueError(f"{self.family} has no chat template of its own: use prompt = salon")
        return self


class ModelLimits(BaseModel):
    """One model's admission limits; unset fields take the `limits` section's values."""

    max_concurrent: int | None = Field(None, ge=0)
    max_queue: int | None = Field(None, ge=0)
    queue_timeout_s: float | None = Field(None, gt=0)
    max_wait_s: float | None = Field(None, gt=0)


class LimitsSettings(BaseModel):
    """Admission control and per-caller limits (docs/architecture.md, "Admission and limits")."""

    # Generations one model runs at once. Unset: 4 for an OpenAI-compatible provider (and the
    # fakes), `embedded.slots` for the embedded one; a route adds up its targets'. 0 = no limit.
    max_concurrent: int | None = Field(None, ge=0)
    # Requests that may wait for a slot; one more is refused at once (503 overloaded).
    max_queue: int = Field(64, ge=0)
    # A request still waiting after this long is refused (503 overloaded).
    queue_timeout_s: float = Field(60.0, gt=0)
    # A request whose expected wait (average generation time × the queue ahead, per slot) is
    # longer than this is refused at once (503 overloaded, with that wait as Retry-After).
    # Unset: `queue_timeout_s`. Set it near the time to first token you promise, and the
    # queue holds only what that allows.
    max_wait_s: float | None = Field(None, gt=0)
    # Per model id (TOML, or JSON in SALON_LIMITS__MODELS).
    models: dict[str, ModelLimits] = Field(default_factory=dict)
    # Per-caller limits, 0 = unlimited. The admin changes the user_* and key_* values at run
    # time (PATCH /api/admin/settings); these are the start-up defaults.
    user_requests_per_minute: int = Field(0, ge=0)
    user_tokens_per_day: int = Field(0, ge=0)  # completion tokens, per UTC day
    key_requests_per_minute: int = Field(0, ge=0)  # per API key (the /v1 API)
    key_tokens_per_day: int = Field(0, ge=0)
    # A configured model id that serves a user whose daily tokens ran out, instead of a 429.
    fallback_model: str | None = None


class TracingSettings(BaseModel):
    """Optional OpenTelemetry tracing (docs/configuration.md, "Tracing"): spans for HTTP
    requests, generations and backend calls, exported over OTLP/HTTP. Needs the optional
    packages (`pip install 'salon[otel]'`); off, nothing of them is imported."""

    enabled: bool = False
    # A collector's OTLP/HTTP traces endpoint (protobuf): the OpenTelemetry Collector,
    # Jaeger, Tempo, ...
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    service_name: str = "salon"
    # Share of new traces that are recorded; a caller's traceparent decides for its own.
    sample_ratio: float = Field(1.0, ge=0, le=1)
    # Headers for the collector, e.g. an authorization token (TOML, or JSON in
    # SALON_TRACING__HEADERS).
    headers: dict[str, str] = Field(default_factory=dict)
    export_timeout_s: float = Field(10.0, gt=0)
    # Send W3C traceparent to OpenAI-compatible backends, so that their own spans (vLLM's,
    # for one) join salon's trace.
    propagate_to_backends: bool = True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SALON_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    data_dir: Path = Path("data")
    database_url: str | None = None  # default: SQLite in data_dir
    host: str = "127.0.0.1"
    port: int = 8000

    # Active models as `provider:model` ids; the first is the default.
    models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [DEFAULT_MODEL])
    providers: dict[str, ProviderSettings] = Field(default_factory=dict)
    # Logical model ids (listed in `models` like any other) served by several targets.
    routes: dict[str, RouteSettings] = Field(default_factory=dict)
    embedded: EmbeddedSettings = Field(default_factory=EmbeddedSettings)
    personalization: PersonalizationSettings = Field(default_factory=PersonalizationSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    # Rate-limit and quota counters shared by several salon processes, e.g.
    # redis://127.0.0.1:6379/0. Unset: counted in this process.
    redis_url: str | None = None
    # Prefix of salon's keys in that Redis (several instances may share one Redis).
    redis_key_prefix: str = "salon:"

    # This process's name among the salon nodes sharing the database (store/nodes.py).
    # Unset: the host name and `port`. No two running processes may share one.
    node_name: str | None = Field(None, min_length=1, max_length=200)
    # A node not heard from for this long is taken for dead: its running generations are
    # kept, marked incomplete. Nodes beat six times per period.
    node_timeout_s: float = Field(30.0, gt=0)

    signup_open: bool = True  # initial value; the admin changes it at run time
    session_days: int = 30
    secure_cookies: bool = False  # set behind HTTPS
    max_body_bytes: int = 2_000_000
    max_message_chars: int = 100_000
    # What enters the prompt from a conversation's history (newest first).
    context_max_chars: int = 24_000
    # The operator's instructions, above everything a user sets.
    system_prompt: str | None = None
    # How often a running generation writes its text to the store.
    flush_interval_s: float = 0.25
    # On shutdown (SIGTERM/SIGINT): stop accepting, let running generations finish for up
    # to this long, then keep what they have, marked incomplete.
    shutdown_grace_s: float = 10.0
    log_level: str = "info"
    # "json": one JSON object per line (time, level, logger, message, request_id, fields).
    log_format: Literal["text", "json"] = "text"
    # The safety layer (issue 4, docs/safety.md): harm gate, caution band, refusal recovery.
    # Opt-in: measured on the development split it does not yet meet its targets with the
    # embedded model (docs/benchmarks.md), and a deployment should choose it knowingly.
    safety_enabled: bool = False
    # The policy (thresholds, caution instruction, refusal texts) as JSON; None = shipped.
    safety_policy_file: Path | None = None
    safety_guard: SafetyGuardSettings = Field(default_factory=SafetyGuardSettings)
    # The gate's second opinion: a probe on the embedded chat model's reading of the turn
    # (safety/probe.py), asked about turns the embedded classifier does not clearly clear
    # (about half of the training prompts, a fifth of everyday ones; ~0.2-0.5 s of CPU
    # each). "auto": used when the model it was trained on is prepared in the model cache (it
    # is never downloaded for this); "off": never.
    safety_probe: Literal["auto", "off"] = "auto"
    # Recovery from a refusal of a benign turn: None re-asks the model that refused, with a
    # clarifying instruction; a `provider:model` (one of `models`, or any model of a
    # configured provider, like the guard) asks that model instead, the same way, e.g. a
    # larger one that refuses less. A turn that may carry personal data stays with the model
    # that refused when the recovery model's provider may not receive it.
    safety_recovery_model: str | None = None
    # When set, GET /metrics needs `Authorization: Bearer <metrics_token>`; unset, it is
    # open (fine on 127.0.0.1; set it when salon listens on other interfaces).
    metrics_token: SecretStr | None = None
    tracing: TracingSettings = Field(default_factory=TracingSettings)

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json

                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _check_ids(cls, value: list[str]) -> list[str]:
        for each in value:
            model_id(each, "model id")
        if not value:
            raise ValueError("at least one model must be configured")
        return value

    @field_validator("safety_recovery_model")
    @classmethod
    def _check_recovery_model(cls, value: str | None) -> str | None:
        return None if value is None else model_id(value, "recovery model")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("SALON_CONFIG_FILE")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    @property
    def database(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'salon.db').resolve()}"

    @property
    def model_cache_dir(self) -> Path:
        return self.embedded.cache_dir or self.data_dir / "models"

    @property
    def default_model(self) -> str:
        return self.models[0]
