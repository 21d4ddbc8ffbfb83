"""The JSON Discord sends for the world: READY, GUILD_CREATE, messages (mentions, references, hidden content)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from .protocol import (
    INTENT_GUILD_MEMBERS,
    INTENT_MESSAGE_CONTENT,
    INTERACTION_COMMAND,
    MESSAGE_DEFAULT,
    MESSAGE_REPLY,
    emoji_json,
    id_of,
    snowflake_time,
)
from .records import FakeGuild, FakeInteraction, FakeMessage, FakeUser, Session
from .state import State

_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")


class Payloads(State):
    """Builds the JSON objects Discord would send for the records in `State`."""

    def _guild_create_json(self, guild: FakeGuild, intents: int) -> dict[str, Any]:
        # Without the (privileged) members intent Discord sends only the bot's own member.
        members = [
            m
            for user_id, m in guild.members.items()
            if intents & INTENT_GUILD_MEMBERS or user_id == self.bot_user.id
        ]
        return {
            "id": str(guild.id),
            "name": guild.name,
            "icon": None,
            "owner_id": str(guild.owner_id),
            "unavailable": False,
            "large": False,
            "member_count": len(guild.members),
            "joined_at": guild.members[self.bot_user.id]["joined_at"],
            "roles": list(guild.roles.values()),
            "channels": [{k: v for k, v in c.items() if k != "guild_id"} for c in guild.channels.values()],
            "members": members,
            "threads": list(guild.threads.values()),
            "presences": [],
            "voice_states": [],
            "emojis": [],
            "stickers": [],
            "features": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "system_channel_id": None,
            "afk_channel_id": None,
            "afk_timeout": 300,
            "application_id": None,
        }

    def _ready_json(self, session: Session) -> dict[str, Any]:
        guilds = [g for g in self.guilds.values() if g.bot_present and self._in_shard(g.id, session)]
        ready: dict[str, Any] = {
            "v": 10,
            "user": {**self.bot_user.to_json(), "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.resume_gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
            "user_settings": {},
            "_trace": ["fake-discord"],
        }
        if session.shard is not None:
            ready["shard"] = session.shard
        return ready

    def _application_json(self) -> dict[str, Any]:
        return {
            "id": str(self.application_id),
            "name": self.bot_user.name,
            "icon": None,
            "description": "",
            "summary": "",
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.owner.to_json(),
            "team": None,
            "verify_key": "0" * 64,
            "flags": 0,
            "bot": self.bot_user.to_json(),
            "interactions_endpoint_url": None,
            "redirect_uris": [],
            "tags": [],
        }

    def _member_partial(self, guild: FakeGuild, user_id: int) -> dict[str, Any] | None:
        member = guild.members.get(user_id)
        return None if member is None else {k: v for k, v in member.items() if k != "user"}

    def _mention_json(self, guild: FakeGuild | None, user_id: int) -> dict[str, Any]:
        user = self.users.get(user_id) or FakeUser(id=user_id, name=f"user{user_id}")
        mention = user.to_json()
        if guild is not None and (member := self._member_partial(guild, user_id)) is not None:
            mention["member"] = member
        return mention

    def _reference_json(self, reference: Any, channel: dict[str, Any]) -> dict[str, Any]:
        target = self._messages[id_of(reference)]
        ref = {"type": 0, "message_id": str(target.id), "channel_id": str(target.channel_id)}
        if target.guild_id:
            ref["guild_id"] = str(target.guild_id)
        return ref

    def _build_message(
        self,
        channel: dict[str, Any],
        author: FakeUser,
        *,
        content: str,
        attachments: list[dict[str, Any]] | None = None,
        embeds: list[dict[str, Any]] | None = None,
        components: list[dict[str, Any]] | None = None,
        reference: dict[str, Any] | None = None,
        reply_ping: bool = True,
        extra_mentions: Iterable[int] = (),
        allowed_mentions: dict[str, Any] | None = None,
        flags: int = 0,
        webhook_id: int | None = None,
        tts: bool = False,
        nonce: Any = None,
        message_type: int | None = None,
        interaction: FakeInteraction | None = None,
    ) -> FakeMessage:
        guild = self._guild_of(channel)
        message_id = self._ids.next()
        data: dict[str, Any] = {
            "id": str(message_id),
            "channel_id": channel["id"],
            "type": message_type
            if message_type is not None
            else (MESSAGE_REPLY if reference else MESSAGE_DEFAULT),
            "content": content,
            "author": author.to_json(),
            "timestamp": snowflake_time(message_id),
            "edited_timestamp": None,
            "tts": tts,
            "attachments": attachments or [],
            "embeds": embeds or [],
            "components": components or [],
            "pinned": False,
            "flags": flags,
        }
        if guild is not None:
            data["guild_id"] = str(guild.id)
            if webhook_id is None and (member := self._member_partial(guild, author.id)) is not None:
                data["member"] = member
        if webhook_id is not None:
            data["webhook_id"] = str(webhook_id)
            if interaction is None:
                data["author"] = {
                    **author.to_json(),
                    "id": str(webhook_id),
                    "bot": True,
                    "discriminator": "0000",
                }
        if nonce is not None:
            data["nonce"] = nonce
        if interaction is not None:
            data["application_id"] = str(self.application_id)
            user = interaction.payload.get("member", {}).get("user") or interaction.payload.get("user")
            data["interaction_metadata"] = {
                "id": str(interaction.id),
                "type": interaction.payload["type"],
                "user": user,
                "authorizing_integration_owners": interaction.payload["authorizing_integration_owners"],
            }
            if interaction.payload["type"] == INTERACTION_COMMAND:
                data["interaction"] = {
                    "id": str(interaction.id),
                    "type": INTERACTION_COMMAND,
                    "name": interaction.payload["data"]["name"],
                    "user": user,
                }
        replied_author = None
        if reference is not None:
            data["message_reference"] = reference
            target = self._messages.get(int(reference["message_id"]))
            if target is not None and not target.deleted:
                data["referenced_message"] = {
                    k: v for k, v in target.data.items() if k != "referenced_message"
                }
                replied_author = target.author_id
            else:
                data["referenced_message"] = None
        self._set_mentions(
            data, guild, allowed_mentions, extra_mentions, replied_author if reply_ping else None
        )
        message = FakeMessage(data=data, history=[content], interaction=interaction)
        return message

    def _set_mentions(
        self,
        data: dict[str, Any],
        guild: FakeGuild | None,
        allowed: dict[str, Any] | None,
        extra: Iterable[int] = (),
        replied_author: int | None = None,
    ) -> None:
        """Fill mentions / mention_roles / mention_everyone the way Discord does, after allowed_mentions."""
        content = data.get("content") or ""
        users = [int(u) for u in _USER_MENTION.findall(content)] + list(extra)
        roles = [int(r) for r in _ROLE_MENTION.findall(content)]
        everyone = "@everyone" in content or "@here" in content
        if allowed is not None:
            parse = allowed.get("parse", [])
            allowed_users = {int(u) for u in allowed.get("users", [])}
            allowed_roles = {int(r) for r in allowed.get("roles", [])}
            users = [u for u in users if "users" in parse or u in allowed_users]
            roles = [r for r in roles if "roles" in parse or r in allowed_roles]
            everyone = everyone and "everyone" in parse
            # replied_user defaults to false once allowed_mentions is given.
            if not allowed.get("replied_user", False):
                replied_author = None
        if replied_author is not None:
            users.append(replied_author)
        unique = list(dict.fromkeys(users))
        data["mentions"] = [self._mention_json(guild, u) for u in unique]
        data["mention_roles"] = [str(r) for r in dict.fromkeys(roles) if guild is None or r in guild.roles]
        data["mention_everyone"] = everyone

    def _message_json(self, message: FakeMessage, *, for_rest: bool = True) -> dict[str, Any]:
        data = dict(message.data)
        data["reactions"] = [
            {
                "emoji": emoji_json(key),
                "count": len(users),
                "count_details": {"burst": 0, "normal": len(users)},
                "me": self.bot_user.id in users,
                "me_burst": False,
                "burst_colors": [],
            }
            for key, users in message.reactions.items()
            if users
        ]
        if for_rest and not self.privileged_intents & INTENT_MESSAGE_CONTENT:
            data = self._blank_unreadable(data)
        return data

    def _blank_unreadable(self, data: dict[str, Any]) -> dict[str, Any]:
        """*trap*: without the message content intent, guild messages that neither mention the bot nor
        come from it arrive with empty content, embeds, attachments and components (so do replies whose
        author turned the ping off)."""
        referenced = data.get("referenced_message")
        if referenced:
            data = {**data, "referenced_message": self._blank_unreadable(referenced)}
        if not data.get("guild_id") or int(data["author"]["id"]) == self.bot_user.id:
            return data
        if any(int(user["id"]) == self.bot_user.id for user in data.get("mentions", [])):
            return data
        blank = {**data, "content": "", "embeds": [], "attachments": [], "components": []}
        blank.pop("poll", None)
        return blank
