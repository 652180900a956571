"""salon serve | migrate | models list|prepare | chat | eval | users create | keys create."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from salon import __version__
from salon.app import accounts, create_app, load_probe, services
from salon.domain import ChatMessage, SamplingParams, TextDelta
from salon.errors import ConfigError, SalonError
from salon.observability.logs import configure_logging
from salon.settings import Settings
from salon.store.db import create_engine, migrate

if TYPE_CHECKING:
    from salon.safety.harm import HarmClassifier
    from salon.safety.policy import Policy
    from salon.safety.probe import Probe


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
        result: int = args.run(settings, args)
        return result
    except SalonError as exc:
        print(f"salon: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salon", description=__doc__)
    parser.add_argument("--version", action="version", version=f"salon {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the web app and the API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(run=_serve)

    commands.add_parser("migrate", help="bring the database schema up to date").set_defaults(
        run=_migrate
    )

    models = commands.add_parser("models", help="embedded models").add_subparsers(
        required=True, metavar="ACTION"
    )
    models.add_parser("list", help="configured and embedded models").set_defaults(run=_models_list)
    prepare = models.add_parser("prepare", help="download, assemble and verify model files")
    prepare.add_argument("ids", nargs="*", help="embedded:<name> ids (default: configured)")
    prepare.set_defaults(run=_models_prepare)

    chat = commands.add_parser("chat", help="a streaming chat in the terminal")
    chat.add_argument("--model")
    chat.set_defaults(run=_chat)

    evals = commands.add_parser("eval", help="evaluations").add_subparsers(
        required=True, metavar="SUITE"
    )
    refusal = evals.add_parser("refusal", help="over-refusal and harmful compliance")
    refusal.add_argument(
        "--split",
        default="dev",
        help="'dev', 'heldout', 'multilingual' or a CSV with the same columns",
    )
    refusal.add_argument(
        "--pipeline", action="store_true", help="the whole chat pipeline, not the classifier alone"
    )
    refusal.add_argument("--model", help="with --pipeline: the model (default: the first)")
    subset = refusal.add_mutually_exclusive_group()
    subset.add_argument("--limit", type=int, help="with --pipeline: the first N prompts")
    subset.add_argument(
        "--per-source", type=int, help="with --pipeline: N prompts of every source and label"
    )
    refusal.add_argument(
        "--recovery", choices=["both", "on", "off"], default="both", help="with --pipeline"
    )
    refusal.add_argument("--max-tokens", type=int, default=160, help="with --pipeline")
    refusal.add_argument(
        "--gate",
        choices=["cv", "on", "off"],
        help="the harm gate: 'cv' = each prompt of the training set judged by a fold classifier "
        "that never saw it (default for --split dev: honest numbers), 'on' = the shipped "
        "classifier (default for other CSVs), 'off' = no gate, recovery or caution (the model "
        "alone; with --pipeline)",
    )
    refusal.add_argument("--policy", type=Path, help="a policy JSON (default: the configured one)")
    refusal.add_argument(
        "--caution",
        choices=["on", "off"],
        default="on",
        help="with --pipeline: the policy's caution instruction for uncertain requests",
    )
    refusal.add_argument("--out", type=Path, help="also write the report (markdown) here")
    refusal.add_argument("--answers", type=Path, help="with --pipeline: every answer, as JSONL")
    refusal.set_defaults(run=_eval_refusal)
    personal = evals.add_parser(
        "personalization", help="style adherence (with and without enforcement) and memory"
    )
    personal.add_argument("--model", help="the model the style suite runs (default: the first)")
    personal.add_argument(
        "--suite", choices=["style", "memory", "all"], default="all", help="what to run"
    )
    personal.add_argument("--depths", default="0,10,30", help="turns of chat before each case")
    personal.add_argument("--per-setting", type=int, help="prompts per setting (default: file's)")
    personal.add_argument("--limit", type=int, help="run only the first N style cases")
    personal.add_argument("--cases", type=Path, help="a style cases file of the same shape")
    personal.add_argument("--memory-cases", type=Path, help="a memory cases file")
    personal.add_argument(
        "--heldout",
        action="store_true",
        help="memory suite: also run the held-out cases (memory_cases_heldout.json)",
    )
    personal.add_argument("--out", type=Path, help="also write the report (markdown) here")
    personal.set_defaults(run=_eval_personalization)

    users = commands.add_parser("users", help="accounts").add_subparsers(
        required=True, metavar="ACTION"
    )
    create_user = users.add_parser("create", help="create an account (password on stdin)")
    create_user.add_argument("username")
    create_user.add_argument("--admin", action="store_true")
    create_user.set_defaults(run=_users_create)

    keys = commands.add_parser("keys", help="API keys").add_subparsers(
        required=True, metavar="ACTION"
    )
    create_key = keys.add_parser("create", help="print a new API key for USERNAME on stdout")
    create_key.add_argument("username")
    create_key.add_argument("--name", default="cli", help="a label for the key")
    create_key.set_defaults(run=_keys_create)
    return parser


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    configure_logging(settings.log_level, settings.log_format)
    _prepare(settings, settings.models)
    app = create_app(settings, progress)
    progress(f"salon is starting on http://{settings.host}:{settings.port}")
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Logging is configured above (text or JSON, with request ids); requests are logged
        # by salon's middleware (salon.access) instead of uvicorn's access log.
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
    )
    return 0


def _migrate(settings: Settings, _args: argparse.Namespace) -> int:
    async def run() -> None:
        engine = create_engine(settings.database)
        await migrate(engine)
        await engine.dispose()

    asyncio.run(run())
    progress("database is up to date")
    return 0


def _models_list(settings: Settings, _args: argparse.Namespace) -> int:
    from salon.backends.model_files import list_models

    configured = set(settings.models)
    for model_id in settings.models:
        marker = " (default)" if model_id == settings.default_model else ""
        print(f"{model_id}  configured{marker}")
    for entry in list_models(settings.model_cache_dir):
        model_id = f"embedded:{entry.name}"
        if model_id not in configured:
            state = "prepared" if entry.prepared else "not prepared"
            print(f"{model_id}  available, {state}")
    return 0


def _models_prepare(settings: Settings, args: argparse.Namespace) -> int:
    _prepare(settings, args.ids or settings.models, explicit=bool(args.ids))
    return 0


def _prepare(settings: Settings, model_ids: Sequence[str], explicit: bool = False) -> None:
    for model_id in model_ids:
        provider, _, name = model_id.partition(":")
        if provider == "embedded":
            from salon.backends.model_files import prepare

            path = prepare(name, settings.model_cache_dir, progress)
            progress(f"{model_id}: ready at {path}")
        elif explicit:
            progress(f"{model_id}: not an embedded model, nothing to prepare")


def _chat(settings: Settings, args: argparse.Namespace) -> int:
    _prepare(settings, [args.model or settings.default_model])
    asyncio.run(_chat_loop(settings, args.model))
    return 0


async def _chat_loop(settings: Settings, model: str | None) -> None:
    async with services(settings, progress) as built:
        model_id = model or built.gateway.default_model
        history: list[ChatMessage] = []
        progress(f"chatting with {model_id}; an empty line or Ctrl-D ends")
        while True:
            try:
                line = await asyncio.to_thread(input, "you> ")
            except EOFError:
                break
            if not line.strip():
                break
            history.append(ChatMessage("user", line))
            parts: list[str] = []
            print("salon> ", end="", flush=True)
            async for event in built.gateway.stream(model_id, history, SamplingParams()):
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                    print(event.text, end="", flush=True)
            print()
            history.append(ChatMessage("assistant", "".join(parts)))


def _eval_refusal(settings: Settings, args: argparse.Namespace) -> int:
    from salon.evals.refusal import run_refusal_eval

    if args.pipeline:
        report = asyncio.run(_refusal_pipeline(settings, args))
    else:
        gate = _gate_mode(args)
        if gate == "off":
            raise ConfigError("--gate off measures nothing without --pipeline")
        classifier = _cross_validated(settings) if gate == "cv" else None
        probe = _eval_probe(settings, gate)
        try:
            report = run_refusal_eval(
                args.split, classifier=classifier, policy=_policy(settings, args), probe=probe
            ).to_markdown()
        finally:
            if probe is not None:
                probe.states.close()
    print(report)
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    return 0


def _policy(settings: Settings, args: argparse.Namespace) -> Policy:
    """The policy evaluated: `--policy`, else the deployment's, else the shipped one."""
    from salon.safety.policy import DEFAULT_POLICY, Policy

    return Policy.load(args.policy or settings.safety_policy_file or DEFAULT_POLICY)


def _gate_mode(args: argparse.Namespace) -> str:
    mode: str = args.gate or ("cv" if str(args.split) == "dev" else "on")
    return mode


def _cross_validated(settings: Settings) -> HarmClassifier:
    """Fold classifiers for the training prompts (needs scikit-learn: the dev extra); their
    fine-tunings are kept in the data folder for the next run."""
    from salon.safety.harm import default_classifier

    try:
        from salon.safety.train import FOLD_CACHE, cross_validated_classifier
    except ImportError as exc:
        raise ConfigError(
            f"--gate cv trains fold classifiers and needs scikit-learn ({exc}); "
            "pip install 'salon[dev]', or pass --gate on"
        ) from exc
    cache = settings.data_dir / FOLD_CACHE
    progress(
        "the cross-validation fold classifiers (~20 min the first time: five fine-tunings, "
        f"kept in {cache})"
    )
    return cross_validated_classifier(default_classifier(), cache=cache)


def _eval_probe(settings: Settings, mode: str) -> Probe | None:
    """The deployment's probe (`safety_probe`); with `--gate cv`, each training prompt is
    read by the fold probe that never saw it, like the classifier."""
    probe = None if mode == "off" else load_probe(settings)
    if probe is None or mode != "cv":
        return probe
    from salon.safety.datasets import training_prompts
    from salon.safety.probe import cross_validated
    from salon.safety.train import folds

    rows = training_prompts()
    fold_of = [(rows[i].prompt, k) for k, (_, test) in enumerate(folds(rows)) for i in test]
    return cross_validated(probe, fold_of)


async def _refusal_pipeline(settings: Settings, args: argparse.Namespace) -> str:
    import tempfile
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    from salon.chat.safety import SafetyGate
    from salon.evals import refusal_pipeline as suite
    from salon.safety.datasets import read_prompts, resolve_split
    from salon.safety.refusal import default_detector

    model = args.model or settings.default_model
    _prepare(settings, [model])
    rows = suite.select(
        read_prompts(resolve_split(args.split)), limit=args.limit, per_source=args.per_source
    )
    sampling = suite.sampling(args.max_tokens)
    mode = _gate_mode(args)
    classifier = _cross_validated(settings) if mode == "cv" else None
    probe = _eval_probe(settings, mode)
    policy = _policy(settings, args)
    if args.caution == "off":
        policy = policy.without_caution()
    gate_label = {
        "cv": "on, cross-validated (each prompt judged by a fold classifier that never saw it)",
        "on": "on, the shipped classifier",
        "off": "off (the model alone)",
    }[mode]
    if mode != "off":
        gate_label += "; caution band " + ("on" if policy.cautious else "off")
        gate_label += f"; probe {probe.model.model}" if probe is not None else "; no probe"
        guard = settings.safety_guard
        if guard.model is not None:
            gate_label += f"; guard {guard.family} {guard.model} ({guard.mode})"
    # Memory extraction is not what this measures, and would double its time.
    quiet = settings.personalization.model_copy(update={"extraction": "off"})

    @asynccontextmanager
    async def open_pipeline(recover: bool) -> AsyncIterator[suite.Pipeline]:
        with tempfile.TemporaryDirectory(prefix="salon-eval-") as scratch:
            isolated = settings.model_copy(
                update={
                    "data_dir": Path(scratch),
                    "database_url": None,
                    "models": [model],
                    "personalization": quiet,
                }
            )
            gate = (
                None
                if mode == "off"
                else SafetyGate(classifier, policy, recover=recover, probe=probe)
            )
            async with services(isolated, progress, sampling=sampling, safety=gate) as built:
                yield suite.Pipeline(built.accounts, built.chat)

    try:
        report = await suite.run_pipeline_eval(
            rows,
            open_pipeline,
            default_detector(),
            model=model,
            dataset=str(args.split),
            recovery=args.recovery,
            max_tokens=args.max_tokens,
            progress=progress,
            gate=gate_label,
        )
    finally:
        if probe is not None:
            probe.states.close()
    if args.answers:
        args.answers.write_text(report.answers_jsonl(), encoding="utf-8")
    return report.to_markdown()


def _eval_personalization(settings: Settings, args: argparse.Namespace) -> int:
    parts: list[str] = []
    if args.suite in ("style", "all"):
        parts.append(asyncio.run(_style_suite(settings, args)))
    if args.suite in ("memory", "all"):
        from salon.evals.memory_suite import HELDOUT_CASES, memory_table, run_memory_suite

        parts.append(memory_table(asyncio.run(run_memory_suite(cases=args.memory_cases))))
        if args.heldout:
            heldout = memory_table(asyncio.run(run_memory_suite(cases=HELDOUT_CASES)))
            parts.append(f"Held-out cases ({HELDOUT_CASES.name}):\n\n{heldout}")
    report = "\n\n".join(parts)
    print(report)
    if args.out:
        args.out.write_text(report + "\n", encoding="utf-8")
    return 0


async def _style_suite(settings: Settings, args: argparse.Namespace) -> str:
    import tempfile

    from salon.evals import personalization as suite

    model = args.model or settings.default_model
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    cases, filler = suite.load_cases(args.cases or suite.CASES, depths, args.per_setting)
    cases = cases[: args.limit] if args.limit else cases
    with tempfile.TemporaryDirectory(prefix="salon-eval-") as scratch:
        # Memory extraction is not what this suite measures, and would double its time.
        quiet = settings.personalization.model_copy(update={"extraction": "off"})
        isolated = settings.model_copy(
            update={
                "data_dir": Path(scratch),
                "database_url": None,
                "models": [model],
                "personalization": quiet,
            }
        )
        async with services(isolated, progress, sampling=suite.SAMPLING) as built:
            pipeline = suite.Pipeline(built.accounts, built.chat, built.personalizer)
            report = await suite.run_style_suite(
                pipeline, model=model, cases=cases, filler=filler, progress=progress
            )
    summary = f"\nDrift with enforcement, first to last depth: {report.drift():+.1f} points"
    return report.table() + "\n" + summary


def _users_create(settings: Settings, args: argparse.Namespace) -> int:
    password = _read_password()

    async def run() -> None:
        async with accounts(settings) as service:
            user = await service.create_user(args.username, password, admin=args.admin)
            progress(f"created {user.role} {user.username}")

    asyncio.run(run())
    return 0


def _read_password() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("password: ")
    return sys.stdin.readline().rstrip("\n")


def _keys_create(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> str:
        async with accounts(settings) as service:
            new = await service.create_key_for(args.username, args.name)
            return new.key

    print(asyncio.run(run()))
    return 0
