"""create_app(settings): the one composition root. Everything is built and wired here,
in the lifespan, and torn down in reverse order."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.middleware import Middleware

from salon import web
from salon.accounts.service import AccountService
from salon.api import accounts as account_routes
from salon.api import conversations as conversation_routes
from salon.api import metrics as metrics_routes
from salon.api import openai as openai_routes
from salon.api import personalization as personalization_routes
from salon.api.context import Services
from salon.api.errors import HANDLERS
from salon.api.middleware import ObservabilityMiddleware
from salon.backends.embeddings import (
    Embedder,
    HashingEmbedder,
    MiniLM,
    default_embedder,
)
from salon.backends.hidden_states import LlamaHiddenStates
from salon.backends.layer_slice import first_layers
from salon.backends.model_files import builtin_catalog, list_models
from salon.backends.registry import BUILT_IN, BackendRegistry
from salon.chat import relay
from salon.chat.admission import Admission, Limiter, QueuePolicy, RateLimits
from salon.chat.gateway import Gateway
from salon.chat.jobs import GenerationJob, JobRunner, Publish
from salon.chat.safety import SafetyGate
from salon.chat.service import ChatLimits, ChatService, utcnow
from salon.domain import SamplingParams
from salon.errors import ConfigError, SalonError
from salon.observability.metrics import Metrics
from salon.observability.tracing import Tracing, TracingMiddleware, start_tracing
from salon.personalization.memory import MemoryService
from salon.personalization.presets import SHIPPED, load_presets
from salon.personalization.service import Personalizer
from salon.safety.guard import Guard, GuardModelClassifier
from salon.safety.policy import Policy
from salon.safety.probe import PROBE_ARTEFACT, Probe, ProbeModel
from salon.settings import Settings
from salon.store.accounts import AccountStore
from salon.store.broadcast import Broadcast, RedisBroadcast
from salon.store.conversations import ConversationStore
from salon.store.counters import Counters, InMemoryCounters, RedisCounters
from salon.store.db import DATABASE_ERRORS, create_engine, migrate
from salon.store.memories import MemoryStore
from salon.store.nodes import NodeStore
from salon.store.profiles import ProfileStore

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


@asynccontextmanager
async def services(
    settings: Settings,
    progress: Progress | None = None,
    *,
    warm_up: bool = False,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
    sampling: SamplingParams | None = None,
    safety: SafetyGate | None = None,
) -> AsyncIterator[Services]:
    """Build every service on a migrated store; tear them down in reverse order.
    With `warm_up`, embedded models load in the background while requests are served.
    With `metrics`, every backend is measured into it. With `safety`, that gate is used
    whatever `settings.safety_enabled` says (evaluations), with the configured guard model
    when it has none."""
    engine = create_engine(settings.database)
    await migrate(engine)
    node = settings.node_name or f"{socket.gethostname()}:{settings.port}"
    conversations = ConversationStore(engine, node=node)
    interrupted = await conversations.mark_interrupted()
    if interrupted:
        log.info("%d generations were interrupted by the last shutdown", interrupted)
    nodes = NodeStore(engine, node)
    registry = BackendRegistry(settings, progress, metrics, tracing)
    account_store = AccountStore(engine)
    admission = _admission(settings, account_store, metrics)
    broadcast = (
        RedisBroadcast(settings.redis_url, prefix=settings.redis_key_prefix)
        if settings.redis_url
        else None
    )
    runner = JobRunner(
        conversations,
        settings.flush_interval_s,
        utcnow,
        admission,
        publish=_publisher(broadcast) if broadcast is not None else None,
    )
    limits = ChatLimits(
        max_message_chars=settings.max_message_chars,
        context_max_chars=settings.context_max_chars,
        system_prompt=settings.system_prompt,
        enforce=settings.personalization.enforce,
        extraction=settings.personalization.extraction,
        revision_budget_s=settings.personalization.revision_budget_s,
        sampling=sampling or SamplingParams(),
    )
    personalizer = _personalizer(settings, engine)
    assert personalizer.memory is not None
    await personalizer.memory.purge()
    probe = None  # the probe this function creates (and so closes): an evaluation's is its own
    if safety is None and settings.safety_enabled:
        policy = Policy.load(settings.safety_policy_file) if settings.safety_policy_file else None
        probe = load_probe(settings, metrics)
        safety = SafetyGate(policy=policy, guard=_guard(settings, registry, metrics), probe=probe)
    elif (
        safety is not None and safety.guard is None
    ):  # an evaluation's gate: the deployment's guard
        safety = safety.with_guard(_guard(settings, registry, metrics))
    if safety is not None and safety.retry_on is None and settings.safety_recovery_model:
        safety = safety.with_retry_on(registry.resolve_internal(settings.safety_recovery_model))
    if safety is not None and warm_up:
        await asyncio.to_thread(safety.warm_up)
    loading = asyncio.create_task(_warm_up(registry, personalizer)) if warm_up else None
    beating = asyncio.create_task(_beat(nodes, settings.node_timeout_s), name="node-heartbeat")
    try:
        yield Services(
            accounts=AccountService(
                account_store,
                session_days=settings.session_days,
                signup_default=settings.signup_open,
            ),
            chat=ChatService(
                conversations,
                registry,
                runner,
                limits,
                safety=safety,
                personalizer=personalizer,
                admission=admission,
                broadcast=broadcast,
            ),
            personalizer=personalizer,
            gateway=Gateway(registry, safety, admission),
            admission=admission,
            max_body_bytes=settings.max_body_bytes,
            secure_cookies=settings.secure_cookies,
            session_days=settings.session_days,
            safety_enabled=safety is not None,
        )
    finally:
        if loading is not None:
            loading.cancel()
        await personalizer.memory.close()
        await runner.drain(settings.shutdown_grace_s)
        await runner.shutdown()
        beating.cancel()
        await _leave(nodes)
        if broadcast is not None:
            await broadcast.close()
        await admission.close()
        await registry.close()
        if probe is not None:
            probe.states.close()
        await engine.dispose()


@asynccontextmanager
async def accounts(settings: Settings) -> AsyncIterator[AccountService]:
    """Accounts on a migrated store, and nothing else: what `salon users create` and
    `salon keys create` need, without the chat services' heartbeat, queues and models."""
    engine = create_engine(settings.database)
    await migrate(engine)
    try:
        yield AccountService(
            AccountStore(engine),
            session_days=settings.session_days,
            signup_default=settings.signup_open,
        )
    finally:
        await engine.dispose()


def _publisher(broadcast: Broadcast) -> Publish:
    async def publish(job: GenerationJob, start: int) -> None:
        await relay.publish(job, broadcast, start)

    return publish


async def _beat(nodes: NodeStore, timeout_s: float) -> None:
    """This node's heartbeat, and the sweep of dead nodes' generations (store/nodes.py)."""
    ttl = timedelta(seconds=timeout_s)
    while True:
        try:
            await nodes.beat(utcnow())
            await nodes.sweep(utcnow(), ttl)
        except DATABASE_ERRORS as exc:
            # A database restart: the next beat tries again; a node whose beats stay away
            # longer than the timeout has its generations taken over, which is right then.
            log.warning("node heartbeat failed: %s", type(exc).__name__)
        await asyncio.sleep(timeout_s / 6)


async def _leave(nodes: NodeStore) -> None:
    try:
        await nodes.leave()
    except DATABASE_ERRORS as exc:
        log.warning("could not remove this node's heartbeat: %s", type(exc).__name__)


def _guard(settings: Settings, registry: BackendRegistry, metrics: Metrics | None) -> Guard | None:
    """The harm gate's guard model, when one is configured (`safety_guard.model`)."""
    config = settings.safety_guard
    if config.model is None:
        return None
    route = registry.resolve_internal(config.model)
    classifier = GuardModelClassifier(
        route.backend,
        route.name,
        config.family,
        timeout_s=config.timeout_s,
        render=config.prompt,
        metrics=metrics.guard(config.model) if metrics is not None else None,
    )
    return Guard(classifier, config.mode)


def load_probe(settings: Settings, metrics: Metrics | None = None) -> Probe | None:
    """The shipped probe, when `safety_probe` allows it and its model file is prepared."""
    if settings.safety_probe == "off" or not PROBE_ARTEFACT.exists():
        return None
    model = ProbeModel.load()
    prepared = {m.name: m for m in list_models(settings.model_cache_dir) if m.prepared}
    info = prepared.get(model.model)
    if info is None:
        log.info("safety probe off: its model %s is not prepared", model.model)
        return None
    if builtin_catalog().get(model.model).sha256 != model.sha256:
        log.warning("safety probe off: it was trained on another file of %s", model.model)
        return None
    path = info.path
    if model.layers is not None:
        try:  # made once from the verified file (~20 s, ~0.6 GB beside it), then reused
            path = first_layers(info.path, model.layers)
        except (SalonError, OSError) as exc:
            log.warning(
                "safety probe off: could not cut %s after %d layers: %s",
                model.model,
                model.layers,
                exc,
            )
            return None
    threads = settings.embedded.threads or os.cpu_count() or 1
    observed = metrics.guard(f"probe:{model.model}") if metrics is not None else None
    states = LlamaHiddenStates(path, threads, model.poolings)
    return Probe(states, model, metrics=observed)


def _admission(settings: Settings, store: AccountStore, metrics: Metrics | None) -> Admission:
    """Queues per model and the per-caller limits, counted in Redis when one is configured."""
    config = settings.limits
    if config.fallback_model is not None and config.fallback_model not in settings.models:
        raise ConfigError(f"limits.fallback_model {config.fallback_model!r} is not in models")
    counters: Counters = (
        RedisCounters(settings.redis_url, prefix=settings.redis_key_prefix)
        if settings.redis_url
        else InMemoryCounters()
    )
    defaults = RateLimits(
        user_requests_per_minute=config.user_requests_per_minute,
        user_tokens_per_day=config.user_tokens_per_day,
        key_requests_per_minute=config.key_requests_per_minute,
        key_tokens_per_day=config.key_tokens_per_day,
    )

    def policy(model_id: str) -> QueuePolicy:
        own = config.models.get(model_id)
        concurrent = own.max_concurrent if own and own.max_concurrent is not None else None
        queue = own.max_queue if own and own.max_queue is not None else config.max_queue
        timeout = own.queue_timeout_s if own and own.queue_timeout_s else config.queue_timeout_s
        wait = own.max_wait_s if own and own.max_wait_s else config.max_wait_s
        if concurrent is None:
            concurrent = _default_concurrency(settings, model_id)
        return QueuePolicy(concurrent, queue, timeout, wait)

    return Admission(
        Limiter(counters, defaults, store),
        policy,
        metrics=metrics,
        fallback_model=config.fallback_model,
    )


def _default_concurrency(settings: Settings, model_id: str) -> int:
    """`limits.max_concurrent`, else by provider: the embedded engine's slots, 4 for the
    others; a route adds up its targets' (each target serves its share)."""
    if settings.limits.max_concurrent is not None:
        return settings.limits.max_concurrent
    route = settings.routes.get(model_id)
    targets = route.targets if route else [model_id]
    providers = [target.partition(":")[0] for target in targets]
    total = 0
    for provider in providers:
        config = settings.providers.get(provider) or BUILT_IN.get(provider)
        total += settings.embedded.slots if config and config.kind == "embedded" else 4
    return total


def _personalizer(settings: Settings, engine: AsyncEngine) -> Personalizer:
    config = settings.personalization

    def embedder() -> Embedder:
        choice = config.embedder
        if choice == "hashing":
            return HashingEmbedder()
        if choice == "minilm":
            return default_embedder()
        if choice.startswith("hf:"):
            return MiniLM.from_hub(choice[3:], settings.model_cache_dir / "embeddings")
        return MiniLM.load(Path(choice))

    memory = MemoryService(
        MemoryStore(engine),
        embedder,
        utcnow,
        undo_window=timedelta(minutes=config.undo_minutes),
    )
    return Personalizer(
        ProfileStore(engine),
        memory,
        utcnow,
        operator_prompt=settings.system_prompt,
        presets=load_presets(config.personalities_file or SHIPPED),
    )


async def _warm_up(registry: BackendRegistry, personalizer: Personalizer) -> None:
    if personalizer.memory is not None:
        try:
            await personalizer.memory.warm_up()
        except SalonError as exc:
            log.error("memory search is unavailable: %s", exc.message)
    try:
        await registry.warm_up()
    except SalonError as exc:
        # The first message will try again and show the error to the user.
        log.error("could not load a model: %s", exc.message)


def create_app(
    settings: Settings, progress: Progress | None = None, *, tracing: Tracing | None = None
) -> Starlette:
    """`tracing`: one built by the caller (tests: an in-memory exporter) instead of from
    `settings.tracing`; either way the app shuts it down with itself."""
    metrics = Metrics()  # its own registry: one per app, nothing global
    # Enabled without the optional packages: a ConfigError now, which names what to install.
    tracing = tracing or start_tracing(settings.tracing)
    middleware = [Middleware(ObservabilityMiddleware, metrics=metrics)]
    if tracing is not None:  # inside: the request id is set when its span starts
        middleware.append(Middleware(TracingMiddleware, tracing=tracing))
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    if token is None and settings.host not in LOOPBACK:
        log.warning("GET /metrics is open on %s; set metrics_token to protect it", settings.host)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            async with services(
                settings, progress, warm_up=True, metrics=metrics, tracing=tracing
            ) as built:
                app.state.services = built
                yield
        finally:
            if tracing is not None:  # the last spans go out (bounded by the export timeout)
                await asyncio.to_thread(tracing.shutdown)

    routes = [
        # The OpenAI-compatible routes first: they are the hot path, and Starlette matches
        # routes in order.
        *openai_routes.routes(),
        *account_routes.routes(),
        *conversation_routes.routes(),
        *personalization_routes.routes(),
        *metrics_routes.routes(metrics, token),
        *web.routes(),
    ]
    return Starlette(
        routes=routes,
        exception_handlers=HANDLERS,
        lifespan=lifespan,
        middleware=middleware,
    )
