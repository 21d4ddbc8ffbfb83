"""REST routes for messages and reactions: create, edit, delete, bulk delete, history, reactions and their users."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .protocol import (
    EDITABLE_FLAGS,
    FLAG_LOADING,
    FLAG_SUPPRESS_EMBEDS,
    FLAG_SUPPRESS_NOTIFICATIONS,
    MAX_CONTENT,
    DiscordError,
    emoji_key,
    json_response,
    now_iso,
    unknown,
)
from .records import FakeMessage
from .rest import Rest


class Messages(Rest):
    """What the bot does to messages over REST, validated and echoed over the gateway as on Discord."""

    # ----------------------------------------------------------------- REST: messages

    def _validate_message_body(
        self, body: dict[str, Any], uploads: list[tuple[str, bytes, str]], *, editing: bool = False
    ) -> None:
        content = body.get("content")
        if content is not None and len(str(content)) > MAX_CONTENT:
            raise DiscordError.form(
                "content", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_CONTENT} or fewer in length."
            )
        if len(body.get("embeds") or []) > 10:
            raise DiscordError.form("embeds", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        if len(uploads) > 10:
            raise DiscordError.form("files", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        for _, data, _ in uploads:
            if len(data) > self.attachment_size_limit:
                raise DiscordError(413, 40005, "Request entity too large")
        empty = not (content or body.get("embeds") or uploads or body.get("sticker_ids") or body.get("poll"))
        empty = empty and not body.get("components")
        if empty and not editing:
            raise DiscordError(400, 50006, "Cannot send an empty message")

    def _uploaded_attachments(
        self, body: dict[str, Any], uploads: list[tuple[str, bytes, str]], channel: dict[str, Any]
    ) -> list[dict[str, Any]]:
        described = {int(a["id"]): a for a in body.get("attachments") or [] if str(a.get("id", "")).isdigit()}
        attachments = []
        for index, (filename, data, content_type) in enumerate(uploads):
            extra = described.get(index, {})
            attachment = self.attachment(filename, data, content_type=content_type)
            if extra.get("description"):
                attachment["description"] = extra["description"]
            attachments.append(attachment)
        return attachments

    async def _create_message(self, request: web.Request) -> web.Response:
        channel = self._rest_channel(request)
        body, uploads = await self._read_body(request)
        self._validate_message_body(body, uploads)
        reference = body.get("message_reference")
        if reference is not None:
            target = self._messages.get(int(reference.get("message_id") or 0))
            if target is None or target.deleted:
                if reference.get("fail_if_not_exists", True):
                    raise DiscordError.form(
                        "message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message"
                    )
                reference = None
            else:
                reference = self._reference_json(target.id, channel)
        flags = int(body.get("flags") or 0) & (FLAG_SUPPRESS_EMBEDS | FLAG_SUPPRESS_NOTIFICATIONS)
        message = self._build_message(
            channel,
            self.bot_user,
            content=str(body.get("content") or ""),
            attachments=self._uploaded_attachments(body, uploads, channel),
            embeds=body.get("embeds") or [],
            components=body.get("components") or [],
            reference=reference,
            allowed_mentions=body.get("allowed_mentions"),
            flags=flags,
            tts=bool(body.get("tts")),
            nonce=body.get("nonce"),
        )
        message.body = body
        message.files = [(name, data) for name, data, _ in uploads]
        self._store(message)
        self._emit_message("MESSAGE_CREATE", message)
        self._record("message_create", self._message_json(message, for_rest=False), message=message)
        return json_response(self._message_json(message))

    def _apply_edit(
        self, message: FakeMessage, body: dict[str, Any], uploads: list[tuple[str, bytes, str]]
    ) -> None:
        if message.author_id != self.bot_user.id:
            raise DiscordError(403, 50005, "Cannot edit a message authored by another user")
        self._validate_message_body(body, uploads, editing=True)
        data = message.data
        if "content" in body:
            data["content"] = str(body["content"] or "")
        if "embeds" in body:
            data["embeds"] = body["embeds"] or []
        if "components" in body:
            data["components"] = body["components"] or []
        if body.get("flags") is not None:
            data["flags"] = (data.get("flags", 0) & ~EDITABLE_FLAGS) | (int(body["flags"]) & EDITABLE_FLAGS)
        if "attachments" in body:
            keep = {str(a.get("id")) for a in body["attachments"] or []}
            data["attachments"] = [a for a in data["attachments"] if a["id"] in keep]
        if uploads:
            data["attachments"] = data["attachments"] + self._uploaded_attachments(body, uploads, {})
            message.files.extend((name, blob) for name, blob, _ in uploads)
        data["flags"] = data.get("flags", 0) & ~FLAG_LOADING
        guild = self.guilds.get(message.guild_id) if message.guild_id else None
        allowed = body.get("allowed_mentions", message.allowed_mentions)
        self._set_mentions(data, guild, allowed)
        if not (data["content"] or data["embeds"] or data["attachments"] or data["components"]):
            raise DiscordError(400, 50006, "Cannot send an empty message")
        data["edited_timestamp"] = now_iso()
        message.edits.append(body)
        message.history.append(data["content"])

    async def _edit_message(self, request: web.Request) -> web.Response:
        message = self._rest_message(request)
        body, uploads = await self._read_body(request)
        self._apply_edit(message, body, uploads)
        self._emit_message("MESSAGE_UPDATE", message)
        self._record("message_update", self._message_json(message, for_rest=False), message=message)
        return json_response(self._message_json(message))

    async def _get_message(self, request: web.Request) -> web.Response:
        message = self._rest_message(request)
        if message.ephemeral:
            raise unknown("Message", 10008)
        return json_response(self._message_json(message))

    async def _delete_message(self, request: web.Request) -> web.Response:
        message = self._rest_message(request)
        self._delete(message)
        self._record("message_delete", {"id": message.id, "channel_id": message.channel_id}, message=message)
        return web.Response(status=204)

    async def _bulk_delete_route(self, request: web.Request) -> web.Response:
        channel_id = int(self._rest_channel(request)["id"])
        body, _ = await self._read_body(request)
        ids = body.get("messages") or []
        if not 2 <= len(ids) <= 100:
            raise DiscordError.form(
                "messages", "BASE_TYPE_BAD_LENGTH", "Must be between 2 and 100 in length."
            )
        messages = [self._live_message(i, channel_id) for i in ids]
        self._bulk_delete(messages)
        self._record("bulk_delete", {"ids": [m.id for m in messages], "channel_id": channel_id})
        return web.Response(status=204)

    async def _history(self, request: web.Request) -> web.Response:
        channel_id = int(self._rest_channel(request)["id"])
        limit = min(max(int(request.query.get("limit", 50)), 1), 100)
        messages = self.messages_in(channel_id)  # oldest first
        if "before" in request.query:
            before = int(request.query["before"])
            chosen = [m for m in messages if m.id < before][-limit:]
        elif "after" in request.query:
            after = int(request.query["after"])
            chosen = [m for m in messages if m.id > after][:limit]
        elif "around" in request.query:
            around = int(request.query["around"])
            older = [m for m in messages if m.id < around][-(limit // 2) :] if limit > 1 else []
            newer = [m for m in messages if m.id >= around][: limit - len(older)]
            chosen = older + newer
        else:
            chosen = messages[-limit:]
        # Discord answers newest first whatever the query.
        return json_response([self._message_json(m) for m in reversed(chosen)])

    # ----------------------------------------------------------------- REST: reactions

    def _reaction_target(self, request: web.Request) -> tuple[FakeMessage, str]:
        message = self._rest_message(request)
        return message, emoji_key(request.match_info["emoji"])

    async def _put_reaction(self, request: web.Request) -> web.Response:
        message, key = self._reaction_target(request)
        if request.match_info["user"] != "@me":
            raise web.HTTPNotFound()
        if self._add_reaction(message, self.bot_user, key):
            data = {
                "message_id": message.id,
                "channel_id": message.channel_id,
                "emoji": key,
                "user_id": self.bot_user.id,
            }
            self._record("reaction_add", data, message=message)
        return web.Response(status=204)

    async def _delete_reaction(self, request: web.Request) -> web.Response:
        message, key = self._reaction_target(request)
        user = request.match_info["user"]
        user_id = self.bot_user.id if user == "@me" else int(user)
        if self._remove_reaction(message, user_id, key):
            data = {
                "message_id": message.id,
                "channel_id": message.channel_id,
                "emoji": key,
                "user_id": user_id,
            }
            self._record("reaction_remove", data, message=message)
        return web.Response(status=204)

    async def _clear_emoji_route(self, request: web.Request) -> web.Response:
        message, key = self._reaction_target(request)
        self._clear_emoji(message, key)
        self._record("reaction_clear_emoji", {"message_id": message.id, "emoji": key}, message=message)
        return web.Response(status=204)

    async def _clear_reactions_route(self, request: web.Request) -> web.Response:
        message = self._rest_message(request)
        self._clear_reactions(message)
        self._record("reaction_clear", {"message_id": message.id}, message=message)
        return web.Response(status=204)

    async def _reaction_users(self, request: web.Request) -> web.Response:
        message, key = self._reaction_target(request)
        limit = min(max(int(request.query.get("limit", 25)), 1), 100)
        after = int(request.query.get("after", 0))
        ids = sorted(u for u in message.reactions.get(key, []) if u > after)[:limit]
        return json_response([self.users[u].to_json() for u in ids if u in self.users])
