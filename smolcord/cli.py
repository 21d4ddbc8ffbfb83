"""The `smolcord` command line: one subcommand per part, each imported only when it runs."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from smolcord.settings import Settings, get_settings

Handler = Callable[[argparse.Namespace, Settings], int]


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


def _adapters(args: argparse.Namespace, settings: Settings) -> int:
    from smolcord.registry import AdapterRegistry, RegistryError

    registry = AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir)
    if args.action == "rollback":
        try:
            now = registry.rollback(args.version)
        except (RegistryError, KeyError) as exc:
            print(f"rollback refused: {exc}", file=sys.stderr)
            return 1
        print(f"current is now {now or 'base'}")
        print("(a running worker picks this up on POST /v1/adapters/load or at its next start)")
        return 0
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
    log = logging.getLogger("smolcord.worker")

    def ready(*_: object) -> None:  # run_app calls this once the socket listens, after the model loaded
        log.info("worker ready on http://%s:%d serving %s", host, port, settings.model)

    try:
        web.run_app(init_app(settings), host=host, port=port, print=ready)
    except OSError as exc:  # a model that is neither a folder nor reachable on the hub; a port in use
        print(f"smolcord worker: {exc}", file=sys.stderr)
        return 1
    return 0


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
    import asyncio

    import discord

    from bot.main import TOKEN_HELP, run_bot
    from feedback.store.db import upgrade_to_head

    if settings.discord_token is None:
        print(TOKEN_HELP, file=sys.stderr)
        return 2
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
    import asyncio

    import discord

    from bot.main import TOKEN_HELP

    if settings.discord_token is None:
        print(TOKEN_HELP, file=sys.stderr)
        return 2
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

    from bot.app import SmolcordBot
    from feedback.store.db import create_engine, sessionmaker
    from smolcord.worker_client import WorkerClient

    assert settings.discord_token is not None
    token = settings.discord_token.get_secret_value()
    # Logging in runs setup_hook, whose sync-if-changed targets the dev guild: make that the guild
    # asked for here, so `--guild` never also syncs globally (or the other way round).
    settings = settings.model_copy(update={"dev_guild_id": guild_id})
    engine = create_engine(settings.db_url)  # the cogs need a store to be built; nothing connects to it
    try:
        async with aiohttp.ClientSession() as http:
            bot = SmolcordBot(
                settings=settings,
                http_session=http,
                sessions=sessionmaker(engine),
                worker=WorkerClient(http, settings.worker_url),
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
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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

    p = add("tiny-model", _tiny_model, "build a local checkpoint for tests, demos and benchmarks")
    p.add_argument("dir", type=Path)
    p.add_argument("--arch", choices=["tiny", "smolvlm-256m", "smolvlm-2b"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = get_settings()
    except ValueError as exc:  # pydantic's ValidationError: say which setting is wrong, no traceback
        print(f"smolcord: bad settings:\n{exc}", file=sys.stderr)
        return 2
    return int(args.handler(args, settings) or 0)


if __name__ == "__main__":
    sys.exit(main())
