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

    add("run", _not_built("run", 8), "migrate, then worker + bot on this machine")

    p = add("worker", _not_built("worker", 3), "the model worker alone")
    p.add_argument("--model", help="hub id or local folder (default: SMOLCORD_MODEL)")
    p.add_argument("--host", help="default: the host of SMOLCORD_WORKER_URL")
    p.add_argument("--port", type=int, help="default: the port of SMOLCORD_WORKER_URL")

    add("bot", _not_built("bot", 5), "the Discord bot alone (needs DISCORD_TOKEN)")

    p = add("db", _not_built("db", 4), "the feedback store's migrations")
    p.add_argument("action", choices=["upgrade"], help="upgrade: Alembic upgrade to head")

    p = add("sync", _not_built("sync", 5), "register slash commands with Discord")
    p.add_argument("--guild", type=int, help="sync to this guild only (default: SMOLCORD_DEV_GUILD_ID)")

    p = add("ask", _not_built("ask", 3), "one question to a running worker, answer on stdout")
    p.add_argument("image", type=Path, help="an image file, or - for none")
    p.add_argument("question")
    p.add_argument("--worker", help="worker URL (default: SMOLCORD_WORKER_URL)")

    p = add("export", _not_built("export", 4), "the current preference data, in trl's column format")
    p.add_argument("out", type=Path, help="OUT.jsonl")
    p.add_argument("--kind", choices=["pairs", "unpaired"], default="pairs")

    p = add("train", _not_built("train", 6), "one training run: pairs → candidate → gate → promote")
    p.add_argument("--method", choices=["dpo", "kto"], default="dpo")
    p.add_argument("--dry-run", action="store_true", help="print what it would train on; train nothing")
    p.add_argument("--force", action="store_true", help="promote even if the gate says no")

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
