"""Application commands: the bot's command sync over REST, and finding a registered command."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from .messages import Messages
from .protocol import DiscordError, id_of, json_response, unknown
from .records import FakeGuild


class Commands(Messages):
    """The registered application commands (global and per guild) and the routes that change them."""

    def command(self, name: str, *, guild: Any = None) -> dict[str, Any]:
        """A registered application command (global when ``guild`` is None)."""
        for command in self.commands.get(None if guild is None else id_of(guild), []):
            if command["name"] == name:
                return command
        raise KeyError(f"no command {name!r} registered for guild {guild!r}")

    def _find_command(self, root: str, guild: FakeGuild | None) -> tuple[dict[str, Any], int | None]:
        if guild is not None:
            for command in self.commands.get(guild.id, []):
                if command["name"] == root and command.get("type", 1) == 1:
                    return command, guild.id
        for command in self.commands.get(None, []):
            if command["name"] == root and command.get("type", 1) == 1:
                return command, None
        known = {str(k): [c["name"] for c in v] for k, v in self.commands.items()}
        raise LookupError(f"/{root} is not registered (registered: {known}); did the bot sync its commands?")

    # ----------------------------------------------------------------- REST: application commands

    def _command_scope(self, request: web.Request) -> int | None:
        if int(request.match_info["application_id"]) != self.application_id:
            raise unknown("Application", 10002)
        guild_id = request.match_info.get("guild_id")
        if guild_id is None:
            return None
        if int(guild_id) not in self.guilds:
            raise unknown("Guild", 10004)
        return int(guild_id)

    def _validate_command(self, command: dict[str, Any]) -> None:
        name, description = command.get("name", ""), command.get("description", "")
        if not re.fullmatch(r"[-_\w]{1,32}", name) or name != name.lower():
            raise DiscordError.form(
                "name", "APPLICATION_COMMAND_INVALID_NAME", f"Invalid command name {name!r}"
            )
        if command.get("type", 1) == 1 and not 1 <= len(description) <= 100:
            raise DiscordError.form(
                "description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
            )
        if len(command.get("options") or []) > 25:
            raise DiscordError.form("options", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")

    def _register_command(
        self, scope: int | None, body: dict[str, Any], existing: list[dict[str, Any]]
    ) -> dict[str, Any]:
        self._validate_command(body)
        previous = next(
            (c for c in existing if c["name"] == body["name"] and c.get("type", 1) == body.get("type", 1)),
            None,
        )
        command = {
            "type": 1,
            "options": [],
            "default_member_permissions": None,
            "nsfw": False,
            "contexts": None,
            "integration_types": [0],
            **body,
            "id": previous["id"] if previous else str(self._ids.next()),
            "application_id": str(self.application_id),
            "version": str(self._ids.next()),
        }
        if scope is not None:
            command["guild_id"] = str(scope)
        return command

    async def _commands(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        existing = self.commands.get(scope, [])
        if request.method == "GET":
            return json_response(existing)
        body, _ = await self._read_body(request)
        if request.method == "PUT":
            if not isinstance(body, list):
                raise DiscordError.form("_root", "BASE_TYPE_LIST", "Must be a list.")
            if len({(c.get("name"), c.get("type", 1)) for c in body}) != len(body):
                raise DiscordError.form(
                    "_root", "APPLICATION_COMMANDS_DUPLICATE_NAME", "Duplicate command name."
                )
            self.commands[scope] = [self._register_command(scope, c, existing) for c in body]
        else:
            command = self._register_command(scope, body, existing)
            self.commands[scope] = [c for c in existing if c["id"] != command["id"]] + [command]
            self._record("commands_sync", {"guild_id": scope, "commands": [command]})
            return json_response(command, status=201)
        self._record("commands_sync", {"guild_id": scope, "commands": self.commands[scope]})
        return json_response(self.commands[scope])

    async def _command(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        existing = self.commands.get(scope, [])
        command = next((c for c in existing if c["id"] == request.match_info["command_id"]), None)
        if command is None:
            raise unknown("application command", 10063)
        if request.method == "GET":
            return json_response(command)
        if request.method == "DELETE":
            self.commands[scope] = [c for c in existing if c is not command]
            self._record("commands_sync", {"guild_id": scope, "commands": self.commands[scope]})
            return web.Response(status=204)
        if request.method == "PATCH":
            body, _ = await self._read_body(request)
            command.update(body)
            self._validate_command(command)
            self._record("commands_sync", {"guild_id": scope, "commands": self.commands[scope]})
            return json_response(command)
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "PATCH", "DELETE"])
