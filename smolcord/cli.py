"""The `smolcord` command line: one subcommand per part, each imported only when it runs."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from smolcord.settings import MissingDiscordToken, Settings, get_settings

Handler = Callable[[argparse.Namespace, Settings], int]

# At DEBUG these libraries log what users wrote: discord.py every gateway payload and REST body,
# aiosqlite every statement with its parameters. `-v` keeps them at INFO; only `-vv` (for debugging
# the Discord connection itself) lets them log at DEBUG, message content included.
CONTENT_LOGGERS = ("discord", "aiosqlite")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(verbosity: int) -> None:
    """INFO; -v: DEBUG for smolcord and the libraries that log no content; -vv: DEBUG everywhere."""
    logging.basicConfig(format=LOG_FORMAT)
    logging.getLogger().setLevel(logging.DEBUG if verbosity else logging.INFO)
    for name in CONTENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)


class NotBuiltYet(SystemExit):
    """A subcommand whose part has not landed yet: says so and exits non-zero."""

    def __init__(self, command: str, issue: int) -> None:
        print(f"smolcord {command}: not built yet (tracked in issue #{issue}).", file=sys.stderr)
        super().__init__(2)


def _tiny_model(args: argparse.Namespace, settings: Settings) -> int:
    from model.tiny import build_tiny_model

    out = build_tiny_model(args.dir, arch=args.arch, seed=args.seed)
    print(f"wrote a {args.arch} checkpoint to {out}")
    return 0


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    from smolcord.simulate.loop import SimulationConfig, run

    # A canary splits users: it needs enough of them for its arm, and traffic for its votes.
    users = args.users if args.users is not None else 60 if args.canary else 12
    questions = args.questions if args.questions is not None else 96 if args.canary else 48
    if args.canary and users < 50:
        print(
            "smolcord simulate: --canary needs --users 50 or more (its arm is a share of them)",
            file=sys.stderr,
        )
        return 2
    if not 0 <= args.bystanders < users:
        print(
            f"smolcord simulate: --bystanders must be between 0 and {users - 1} (the other users)",
            file=sys.stderr,
        )
        return 2
    if args.scenario is not None and not args.canary:
        print("smolcord simulate: --scenario is a canary scenario: add --canary", file=sys.stderr)
        return 2
    config = SimulationConfig(
        rounds=args.rounds, users=users, questions=questions, eval_questions=args.eval_questions,
        rule=args.rule, noise=args.noise, method=args.method, seed=args.seed, out=args.out, model=args.model,
        bystanders=args.bystanders, canary=args.canary, scenario=args.scenario or "honest",
    )  # fmt: skip
    return run(config)


def _adapters(args: argparse.Namespace, settings: Settings) -> int:
    from smolcord.registry import AdapterRegistry

    registry = AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir)
    if args.action == "rollback":
        return _rollback(settings, registry, args.version)
    current = registry.current()
    versions = registry.versions()
    if not versions:
        print("no adapter versions yet: the worker serves the base model")
    for version in versions:
        metrics = registry.metrics(version)
        mark = "*" if version == current else " "
        status = metrics.get("status", "")
        accuracy = metrics.get("heldout_accuracy")
        extra = f" heldout_accuracy={accuracy:.3f}" if isinstance(accuracy, int | float) else ""
        print(f"{mark} {version} {status}{extra}")
    return 0


def _rollback(settings: Settings, registry: Any, version: str | None) -> int:
    """What `/smolcord rollback` does (feedback.store.adapters.roll_back): registry, store, worker."""
    import asyncio

    import aiohttp

    from feedback.store.adapters import RollbackRefused, roll_back
    from feedback.store.db import create_engine, sessionmaker, upgrade_to_head
    from smolcord.worker_client import WorkerClient

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.db_url)  # before the event loop starts: Alembic runs one of its own

    async def run() -> str:
        engine = create_engine(settings.db_url)
        token = settings.worker_token.get_secret_value() if settings.worker_token else None
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
                worker = WorkerClient(http, settings.worker_url, token=token, model=settings.worker_model)
                done = await roll_back(
                    settings=settings,
                    registry=registry,
                    sessions=sessionmaker(engine),
                    worker=worker,
                    version=version,
                )
        finally:
            await engine.dispose()
        return done.describe().replace("**", "")

    try:
        print(asyncio.run(run()))
    except RollbackRefused as exc:
        print(f"smolcord adapters rollback: {exc}", file=sys.stderr)
        return 1
    return 0


def _db(args: argparse.Namespace, settings: Settings) -> int:
    from feedback.store.commands import db_upgrade

    return db_upgrade(settings)


def _export(args: argparse.Namespace, settings: Settings) -> int:
    from feedback.store.commands import export

    return export(settings, args.out, args.kind)


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from aiohttp import web

    from model.app import init_app

    if args.model:
        settings = settings.model_copy(update={"model": args.model})
    default_host, default_port = settings.worker_host_port
    host, port = args.host or default_host, args.port or default_port
    if (
        settings.worker_token is None
        and not (args.allow_open or settings.worker_allow_open)
        and not _loopback(host)
    ):
        print(
            f"smolcord worker: refusing to listen on {host} without SMOLCORD_WORKER_TOKEN: anyone who "
            "reaches it could use it. Set a token (the bot, `smolcord ask` and training send it), or "
            "pass --allow-open (SMOLCORD_WORKER_ALLOW_OPEN=true) if the network is yours alone.",
            file=sys.stderr,
        )
        return 2
    log = logging.getLogger("smolcord.worker")

    def ready(*_: object) -> None:  # run_app calls this once the socket listens, after the model loaded
        log.info("worker ready on http://%s:%d serving %s", host, port, settings.model)

    try:
        web.run_app(init_app(settings), host=host, port=port, print=ready)
    except OSError as exc:  # a model that is neither a folder nor reachable on the hub; a port in use
        print(f"smolcord worker: {exc}", file=sys.stderr)
        return 1
    return 0


def _loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback one (a name that does not resolve is not)."""
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    addresses = {ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos}
    return bool(addresses) and all(address.is_loopback for address in addresses)


def _ask(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from smolcord.images import ImageError, normalize_for, to_data_url
    from smolcord.worker_client import WorkerBusy, WorkerDown, WorkerError

    content: list[dict[str, object]] = []
    if str(args.image) != "-":
        try:
            image = normalize_for(settings, args.image.read_bytes())
        except OSError as exc:
            print(f"smolcord ask: cannot read {args.image}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        except ImageError as exc:
            print(f"smolcord ask: {args.image}: {exc.message}", file=sys.stderr)
            return 1
        content.append({"type": "image_url", "image_url": {"url": to_data_url(image)}})
    content.append({"type": "text", "text": args.question})
    url = args.worker or settings.worker_url
    token = settings.worker_token.get_secret_value() if settings.worker_token else None
    try:
        asyncio.run(_stream_answer(url, token, [{"role": "user", "content": content}]))
    except WorkerDown:
        print(f"smolcord ask: no worker answers at {url} (start one with `smolcord worker`)", file=sys.stderr)
        return 1
    except WorkerBusy as exc:
        wait = f"; try again in {exc.retry_after:g} s" if exc.retry_after else ""
        print(f"smolcord ask: the worker is busy{wait}", file=sys.stderr)
        return 1
    except WorkerError as exc:  # WorkerTimeout and the worker's own refusals
        print(f"smolcord ask: {exc}", file=sys.stderr)
        return 1
    return 0


async def _stream_answer(url: str, token: str | None, messages: list[dict[str, object]]) -> None:
    import aiohttp

    from smolcord.worker_client import WorkerClient

    async with aiohttp.ClientSession() as session:
        client = WorkerClient(session, url, token=token)
        ended_with_newline = True
        async for item in client.stream_chat(messages):
            if isinstance(item, str):
                sys.stdout.write(item)
                sys.stdout.flush()
                ended_with_newline = item.endswith("\n")
        if not ended_with_newline:
            sys.stdout.write("\n")


def _train(args: argparse.Namespace, settings: Settings) -> int:
    from feedback.training.config import RunArguments
    from feedback.training.job import run

    method = args.method or settings.train_method
    options = RunArguments(method, dry_run=args.dry_run, force=args.force, progress=args.progress)
    return run(settings, options)


def _bot(args: argparse.Namespace, settings: Settings) -> int:
    settings.require_discord_token()  # before anything is imported or migrated
    import asyncio

    import discord

    from bot.main import run_bot
    from feedback.store.db import upgrade_to_head

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.db_url)  # before the event loop starts: Alembic runs one of its own
    try:
        asyncio.run(run_bot(settings))
    except discord.LoginFailure:
        print(
            "smolcord bot: Discord refused DISCORD_TOKEN; reset it in the developer portal", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _sync(args: argparse.Namespace, settings: Settings) -> int:
    settings.require_discord_token()  # before anything is imported
    import asyncio

    import discord

    guild_id = args.guild if args.guild is not None else settings.dev_guild_id
    try:
        count = asyncio.run(_sync_commands(settings, guild_id))
    except discord.LoginFailure:
        print(
            "smolcord sync: Discord refused DISCORD_TOKEN; reset it in the developer portal", file=sys.stderr
        )
        return 1
    except discord.HTTPException as exc:
        print(f"smolcord sync: Discord refused the sync ({exc.status}: {exc.text})", file=sys.stderr)
        return 1
    print(f"synced {count} commands to {f'guild {guild_id}' if guild_id else 'every guild (global)'}")
    return 0


async def _sync_commands(settings: Settings, guild_id: int | None) -> int:
    """Log in (REST only, no gateway), load the cogs, register their commands, log out."""
    import aiohttp

    from bot.answering import Answerer
    from bot.app import SmolcordBot
    from feedback.store.db import create_engine, sessionmaker
    from smolcord.worker_client import WorkerClient

    token = settings.require_discord_token()
    # Logging in runs setup_hook, whose sync-if-changed targets the dev guild: make that the guild
    # asked for here, so `--guild` never also syncs globally (or the other way round).
    settings = settings.model_copy(update={"dev_guild_id": guild_id})
    engine = create_engine(settings.db_url)  # the cogs need a store to be built; nothing connects to it
    try:
        async with aiohttp.ClientSession() as http:
            sessions = sessionmaker(engine)
            worker = WorkerClient(
                http,
                settings.worker_url,
                token=settings.worker_token.get_secret_value() if settings.worker_token else None,
            )
            bot = SmolcordBot(
                settings=settings,
                http_session=http,
                sessions=sessions,
                worker=worker,
                answerer=Answerer(settings=settings, sessions=sessions, worker=worker),
            )
            async with bot:
                await bot.login(token)
                return await bot.sync_commands(guild_id)
    finally:
        await engine.dispose()


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from smolcord.supervisor import run

    return run(settings)


def _not_built(command: str, issue: int) -> Handler:
    def handler(args: argparse.Namespace, settings: Settings) -> int:
        raise NotBuiltYet(command, issue)

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smolcord", description="A Discord assistant that sees images and learns from votes."
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v: debug logging, without message content; -vv: also discord.py's and aiosqlite's debug "
        "logs, which contain message content (gateway payloads, REST bodies, SQL parameters)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    add("run", _run, "migrate, then worker + bot on this machine")

    p = add("worker", _worker, "the model worker alone")
    p.add_argument("--model", help="hub id or local folder (default: SMOLCORD_MODEL)")
    p.add_argument("--host", help="default: the host of SMOLCORD_WORKER_URL")
    p.add_argument("--port", type=int, help="default: the port of SMOLCORD_WORKER_URL")
    p.add_argument(
        "--allow-open",
        action="store_true",
        help="listen beyond loopback without SMOLCORD_WORKER_TOKEN (SMOLCORD_WORKER_ALLOW_OPEN=true)",
    )

    add("bot", _bot, "the Discord bot alone (needs DISCORD_TOKEN)")

    p = add("db", _db, "the feedback store's migrations")
    p.add_argument("action", choices=["upgrade"], help="upgrade: Alembic upgrade to head")

    p = add("sync", _sync, "register slash commands with Discord")
    p.add_argument("--guild", type=int, help="sync to this guild only (default: SMOLCORD_DEV_GUILD_ID)")

    p = add("ask", _ask, "one question to a running worker, answer on stdout")
    p.add_argument("image", type=Path, help="an image file, or - for none")
    p.add_argument("question")
    p.add_argument("--worker", help="worker URL (default: SMOLCORD_WORKER_URL)")

    p = add("export", _export, "the current preference data, in trl's column format")
    p.add_argument("out", type=Path, help="OUT.jsonl")
    p.add_argument("--kind", choices=["pairs", "unpaired"], default="pairs")

    p = add("train", _train, "one training run: pairs → candidate → gate → promote")
    p.add_argument("--method", choices=["dpo", "kto", "sft+dpo"], help="default: SMOLCORD_TRAIN_METHOD (dpo)")
    p.add_argument("--dry-run", action="store_true", help="print what it would train on; train nothing")
    p.add_argument("--force", action="store_true", help="promote even if the gate says no")
    p.add_argument(
        "--progress",
        choices=["json", "bar", "none"],
        help="json: JSON lines on stdout (exit codes and fields: python -m feedback.training --help); "
        "default: a bar on a terminal",
    )

    p = add("adapters", _adapters, "the adapter registry")
    p.add_argument("action", nargs="?", choices=["list", "rollback"], default="list")
    p.add_argument("version", nargs="?", help="rollback target (default: the previous version)")

    p = add("simulate", _simulate, "a simulated community voting by a hidden rule, night after night")
    p.add_argument("--rounds", type=int, default=6, help="nights (default 6)")
    p.add_argument("--users", type=int, help="simulated users (default 12; 60 with --canary)")
    p.add_argument("--questions", type=int, help="questions asked each round (default 48; 96 with --canary)")
    p.add_argument(
        "--eval-questions", type=int, default=64, help="the fixed evaluation set, scored each round"
    )
    p.add_argument("--rule", choices=["colour", "shape", "short", "random"], default="colour")
    p.add_argument("--noise", type=float, default=0.0, help="each vote flipped with this probability")
    p.add_argument(
        "--bystanders", type=int, default=0,
        help="other users who also vote on every answer (by the rule, with the noise; never 🔁): default 0",
    )  # fmt: skip
    p.add_argument("--method", choices=["dpo", "kto", "sft+dpo"], default="dpo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=Path("simulation"), help="data, models, worker log, report.png"
    )
    p.add_argument(
        "--model", type=Path, help="a local checkpoint as the base (default: a warm-started tiny model)"
    )
    p.add_argument(
        "--canary", action="store_true",
        help="a gated candidate first serves a sticky share of users; their live votes decide (SMOLCORD_CANARY)",
    )  # fmt: skip
    p.add_argument(
        "--scenario", choices=["honest", "minority"],
        help="with --canary: everyone votes by the rule (honest), or a 🔁-heavy minority that likes wrong "
        "colours makes the pairs (minority)",
    )  # fmt: skip

    p = add("tiny-model", _tiny_model, "build a local checkpoint for tests, demos and benchmarks")
    p.add_argument("dir", type=Path)
    p.add_argument("--arch", choices=["tiny", "smolvlm-256m", "smolvlm-2b"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        settings = get_settings()
    except ValueError as exc:  # pydantic's ValidationError: say which setting is wrong, no traceback
        print(f"smolcord: bad settings:\n{exc}", file=sys.stderr)
        return 2
    try:
        return int(args.handler(args, settings) or 0)
    except MissingDiscordToken as exc:  # `bot`, `sync` and `run` need one: say how to get it
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
