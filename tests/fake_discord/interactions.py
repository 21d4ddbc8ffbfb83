"""Interactions: slash commands and component clicks sent to the bot, and its responses, edits and follow-ups."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web

from .commands import Commands
from .protocol import (
    ALL_PERMISSIONS,
    BOT_PERMISSIONS,
    CALLBACK_DEFERRED_MESSAGE,
    CALLBACK_DEFERRED_UPDATE,
    CALLBACK_MESSAGE,
    CALLBACK_UPDATE,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    FLAG_SUPPRESS_EMBEDS,
    FLAG_SUPPRESS_NOTIFICATIONS,
    INTERACTION_COMMAND,
    INTERACTION_COMPONENT,
    KNOWN_CALLBACKS,
    MESSAGE_CHAT_INPUT,
    MESSAGE_REPLY,
    DiscordError,
    json_response,
    unknown,
)
from .records import FakeGuild, FakeInteraction, FakeMessage, FakeUser


class Interactions(Commands):
    """Interactions the test sends, and the callback and webhook routes the bot answers them on."""

    # ----------------------------------------------------------------- test-driven

    async def invoke_command(
        self,
        name: str,
        user: FakeUser,
        options: Mapping[str, Any] | None = None,
        *,
        guild: FakeGuild | None = None,
        channel: Any = None,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """``user`` runs a registered slash command (INTERACTION_CREATE).  ``name`` may name a
        subcommand ("group sub").  Option values are converted by the registered option types:
        attachments take ``fake.attachment(...)`` objects or ``(filename, data)``, users FakeUser,
        roles a role object or name, channels a channel object.  Without ``guild`` it runs in the
        user's DM with the bot.  Like Discord's client the fake refuses unknown commands and options
        but, unlike it, does not hide commands by default_member_permissions: the bot must check."""
        self._mark = len(self.actions)
        root, *path = name.split()
        command, registered_guild = self._find_command(root, guild)
        schema = command.get("options", [])
        resolved: dict[str, dict[str, Any]] = {}
        options_json = self._options_json(schema, path, dict(options or {}), guild, resolved, name)
        data: dict[str, Any] = {
            "id": command["id"],
            "name": root,
            "type": command.get("type", 1),
            "options": options_json,
        }
        if resolved:
            data["resolved"] = resolved
        if registered_guild is not None:
            data["guild_id"] = str(registered_guild)
        return await self._dispatch_interaction(INTERACTION_COMMAND, data, user, guild, channel, locale)

    async def click(
        self, message: Any, custom_id: str, user: FakeUser, *, values: Iterable[str] = ()
    ) -> FakeInteraction:
        """``user`` clicks a button (or picks select ``values``) on one of the bot's messages."""
        self._mark = len(self.actions)
        msg = self._live_message(message)
        component = self._find_component(msg.data.get("components", []), custom_id)
        if component is None:
            raise KeyError(f"message {msg.id} has no component {custom_id!r}")
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component["type"]}
        if component["type"] != 2:
            data["values"] = list(values)
        guild = self.guilds.get(msg.guild_id) if msg.guild_id else None
        return await self._dispatch_interaction(
            INTERACTION_COMPONENT, data, user, guild, msg.channel_id, "en-US", target=msg
        )

    # ----------------------------------------------------------------- building interactions

    def _options_json(
        self,
        schema: list[dict[str, Any]],
        path: list[str],
        values: dict[str, Any],
        guild: FakeGuild | None,
        resolved: dict[str, dict[str, Any]],
        full_name: str,
    ) -> list[dict[str, Any]]:
        if path:
            sub = next((o for o in schema if o["name"] == path[0] and o["type"] in (1, 2)), None)
            if sub is None:
                raise LookupError(f"/{full_name}: no subcommand {path[0]!r}")
            inner = self._options_json(sub.get("options", []), path[1:], values, guild, resolved, full_name)
            return [{"name": sub["name"], "type": sub["type"], "options": inner}]
        if any(o["type"] in (1, 2) for o in schema):
            raise LookupError(f"/{full_name} needs a subcommand")
        by_name = {o["name"]: o for o in schema}
        unknown = set(values) - set(by_name)
        if unknown:
            raise LookupError(f"/{full_name} has no options {sorted(unknown)}; it has {sorted(by_name)}")
        missing = [o["name"] for o in schema if o.get("required") and o["name"] not in values]
        if missing:
            raise LookupError(f"/{full_name}: required options missing: {missing}")
        out = []
        for name, value in values.items():
            option_type = by_name[name]["type"]
            out.append(
                {
                    "name": name,
                    "type": option_type,
                    "value": self._option_value(option_type, value, guild, resolved),
                }
            )
        return out

    def _option_value(
        self, option_type: int, value: Any, guild: FakeGuild | None, resolved: dict[str, dict[str, Any]]
    ) -> Any:
        if option_type == 11:  # attachment
            attachment = dict(value) if isinstance(value, Mapping) else self.attachment(value[0], value[1])
            resolved.setdefault("attachments", {})[attachment["id"]] = attachment
            return attachment["id"]
        if option_type in (6, 9) and isinstance(value, FakeUser):  # user / mentionable
            resolved.setdefault("users", {})[str(value.id)] = value.to_json()
            if guild is not None and value.id in guild.members:
                member = {
                    **(self._member_partial(guild, value.id) or {}),
                    "permissions": str(self.permissions_of(guild, value)),
                }
                resolved.setdefault("members", {})[str(value.id)] = member
            return str(value.id)
        if option_type in (8, 9):  # role
            if guild is None:
                raise LookupError("role options need a guild")
            role = guild.roles[self._role_id(guild, value)]
            resolved.setdefault("roles", {})[role["id"]] = role
            return role["id"]
        if option_type == 7:  # channel
            channel = self._channel(value)
            resolved.setdefault("channels", {})[channel["id"]] = {
                **{k: channel[k] for k in ("id", "type", "name") if k in channel},
                "permissions": str(ALL_PERMISSIONS),
            }
            return channel["id"]
        return value

    def _find_component(self, components: list[dict[str, Any]], custom_id: str) -> dict[str, Any] | None:
        for component in components:
            if component.get("custom_id") == custom_id:
                return component
            children = list(component.get("components", []))
            if "accessory" in component:
                children.append(component["accessory"])
            found = self._find_component(children, custom_id)
            if found is not None:
                return found
        return None

    async def _dispatch_interaction(
        self,
        kind: int,
        data: dict[str, Any],
        user: FakeUser,
        guild: FakeGuild | None,
        channel: Any,
        locale: str,
        target: FakeMessage | None = None,
    ) -> FakeInteraction:
        interaction_id = self._ids.next()
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": kind,
            "data": data,
            "token": secrets.token_urlsafe(32),
            "version": 1,
            "locale": locale,
            "entitlements": [],
            "entitlement_sku_ids": [],
            # *trap*: discord.py 2.7 reads attachment_size_limit from every interaction.
            "attachment_size_limit": self.attachment_size_limit,
        }
        if guild is not None:
            channel_json = self._channel(channel) if channel is not None else guild.channel()
            if user.id not in guild.members:
                self.add_member(guild, user)
            permissions = self.permissions_of(guild, user)
            payload.update(
                guild_id=str(guild.id),
                guild={"id": str(guild.id), "locale": "en-US", "features": []},
                guild_locale="en-US",
                channel_id=channel_json["id"],
                channel={**channel_json, "permissions": str(permissions)},
                member={**guild.members[user.id], "permissions": str(permissions)},
                app_permissions=str(self.permissions_of(guild, self.bot_user)),
                authorizing_integration_owners={"0": str(guild.id)},
                context=0,
            )
        else:
            channel_json = self._channel(channel) if channel is not None else self.dm_channel(user)
            payload.update(
                channel_id=channel_json["id"],
                channel={**channel_json, "permissions": str(BOT_PERMISSIONS)},
                user=user.to_json(),
                app_permissions=str(BOT_PERMISSIONS),
                authorizing_integration_owners={"0": "0"},
                context=1,
            )
        if target is not None:
            payload["message"] = self._message_json(target, for_rest=False)
        interaction = FakeInteraction(
            id=interaction_id,
            token=payload["token"],
            payload=payload,
            fake=self,
            created_at=asyncio.get_running_loop().time(),
            target=target,
        )
        self._interactions[interaction_id] = interaction
        self._emit("INTERACTION_CREATE", payload)
        await self.flush()
        return interaction

    def _interaction_by_token(self, application_id: int, token: str) -> FakeInteraction:
        if application_id == self.application_id:
            for interaction in self._interactions.values():
                if interaction.token == token:
                    return interaction
        raise unknown("Webhook", 10015)

    def _interaction_message(
        self,
        interaction: FakeInteraction,
        body: dict[str, Any],
        uploads: list[tuple[str, bytes, str]],
        *,
        loading: bool,
    ) -> FakeMessage:
        channel = self._channel(interaction.payload["channel_id"])
        flags = int(body.get("flags") or 0) & (
            FLAG_EPHEMERAL | FLAG_SUPPRESS_EMBEDS | FLAG_SUPPRESS_NOTIFICATIONS
        )
        if loading:
            flags |= FLAG_LOADING
        else:
            self._validate_message_body(body, uploads)
        is_command = interaction.payload["type"] == INTERACTION_COMMAND
        message = self._build_message(
            channel,
            self.bot_user,
            content="" if loading else body.get("content") or "",
            attachments=self._uploaded_attachments(body, uploads, channel),
            embeds=body.get("embeds") or [],
            components=body.get("components") or [],
            allowed_mentions=body.get("allowed_mentions"),
            flags=flags,
            webhook_id=self.application_id,
            tts=bool(body.get("tts")),
            message_type=MESSAGE_CHAT_INPUT if is_command else MESSAGE_REPLY,
            interaction=interaction,
        )
        message.body = body
        message.files = [(name, data) for name, data, _ in uploads]
        self._store(message)
        return message

    # ----------------------------------------------------------------- REST: interactions and webhooks

    async def _interaction_callback(self, request: web.Request) -> web.Response:
        interaction = self._interactions.get(int(request.match_info["interaction_id"]))
        if interaction is None or interaction.token != request.match_info["token"]:
            raise unknown("interaction", 10062)
        body, uploads = await self._read_body(request)
        if interaction.callbacks:
            raise DiscordError(400, 40060, "Interaction has already been acknowledged.")
        elapsed = asyncio.get_running_loop().time() - interaction.created_at
        if elapsed > self.interaction_deadline:
            self._record(
                "interaction_expired",
                {"interaction_id": interaction.id, "elapsed": elapsed},
                interaction=interaction,
            )
            raise unknown("interaction", 10062)
        callback_type = body.get("type")
        if callback_type not in KNOWN_CALLBACKS:
            raise DiscordError.form(
                "type", "BASE_TYPE_CHOICES", f"Value must be one of {sorted(KNOWN_CALLBACKS)}."
            )
        data = body.get("data") or {}
        message: FakeMessage | None = None
        if callback_type in (CALLBACK_MESSAGE, CALLBACK_DEFERRED_MESSAGE):
            loading = callback_type == CALLBACK_DEFERRED_MESSAGE
            message = self._interaction_message(interaction, data, uploads, loading=loading)
            interaction.original = message
        elif callback_type in (CALLBACK_UPDATE, CALLBACK_DEFERRED_UPDATE):
            if interaction.target is None:
                raise DiscordError(400, 40043, "This interaction type cannot be used with this callback type")
            message = interaction.original = interaction.target
            if callback_type == CALLBACK_UPDATE:
                self._apply_edit(message, data, uploads)
        interaction.callbacks.append(body)
        interaction.callback_delay = elapsed
        if message is not None and callback_type in (CALLBACK_MESSAGE, CALLBACK_DEFERRED_MESSAGE):
            self._emit_message("MESSAGE_CREATE", message)
        elif message is not None and callback_type == CALLBACK_UPDATE:
            self._emit_message("MESSAGE_UPDATE", message)
        self._record(
            "interaction_callback",
            {"interaction_id": interaction.id, "type": callback_type, "data": data},
            message=message,
            interaction=interaction,
        )
        if message is not None and callback_type != CALLBACK_DEFERRED_UPDATE:
            kind = "message_update" if callback_type == CALLBACK_UPDATE else "message_create"
            self._record(
                kind, self._message_json(message, for_rest=False), message=message, interaction=interaction
            )
        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        # *trap*: discord.py 2.7 asks with_response=1 and builds its InteractionCallbackResponse from this.
        response: dict[str, Any] = {
            "interaction": {
                "id": str(interaction.id),
                "type": interaction.payload["type"],
                "response_message_loading": callback_type == CALLBACK_DEFERRED_MESSAGE,
                "response_message_ephemeral": bool(message is not None and message.ephemeral),
            }
        }
        if message is not None:
            response["interaction"]["response_message_id"] = str(message.id)
        resource: dict[str, Any] = {"type": callback_type}
        if message is not None and callback_type != CALLBACK_DEFERRED_UPDATE:
            resource["message"] = self._message_json(message)
        response["resource"] = resource
        return json_response(response)

    async def _webhook_execute(self, request: web.Request) -> web.Response:
        interaction = self._interaction_by_token(
            int(request.match_info["application_id"]), request.match_info["token"]
        )
        if not interaction.callbacks:
            raise unknown("Webhook", 10015)  # the token only works once the interaction is acknowledged
        body, uploads = await self._read_body(request)
        original = interaction.original
        if (
            original is not None
            and original.flags & FLAG_LOADING
            and interaction.response_type == CALLBACK_DEFERRED_MESSAGE
        ):
            # As on Discord: the first follow-up after a defer replaces the "thinking" message.
            self._apply_edit(original, body, uploads)
            message, kind, event = original, "message_update", "MESSAGE_UPDATE"
        else:
            message = self._interaction_message(interaction, body, uploads, loading=False)
            kind, event = "message_create", "MESSAGE_CREATE"
        interaction.followups.append(message)
        self._emit_message(event, message)
        self._record(
            kind, self._message_json(message, for_rest=False), message=message, interaction=interaction
        )
        if request.query.get("wait") in ("1", "true", "True"):
            return json_response(self._message_json(message))
        return web.Response(status=204)

    async def _webhook_message(self, request: web.Request) -> web.Response:
        interaction = self._interaction_by_token(
            int(request.match_info["application_id"]), request.match_info["token"]
        )
        wanted = request.match_info["message_id"]
        if wanted == "@original":
            message = interaction.original
        else:
            message = next((m for m in interaction.messages if str(m.id) == wanted), None)
        if message is None or message.deleted:
            raise unknown("Message", 10008)
        if request.method == "GET":
            return json_response(self._message_json(message))
        if request.method == "PATCH":
            body, uploads = await self._read_body(request)
            self._apply_edit(message, body, uploads)
            self._emit_message("MESSAGE_UPDATE", message)
            self._record(
                "message_update",
                self._message_json(message, for_rest=False),
                message=message,
                interaction=interaction,
            )
            return json_response(self._message_json(message))
        if request.method == "DELETE":
            self._delete(message)
            self._record(
                "message_delete", {"id": message.id, "channel_id": message.channel_id}, message=message
            )
            return web.Response(status=204)
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "PATCH", "DELETE"])
