"""Consent: users' opt-out and forget-me status, guilds' learning and voter role."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from feedback.store.db import (
    dialect_insert,
    transaction,
)
from feedback.store.models import (
    GuildSettings,
    OptedOutUser,
    utcnow,
)

if TYPE_CHECKING:
    from smolcord.settings import Settings

__all__ = [
    "FORGOTTEN",
    "OPTED_OUT",
    "GuildConsent",
    "get_guild_settings",
    "get_user_status",
    "opt_in",
    "opt_out",
    "set_learning",
    "set_voter_role",
]


OPTED_OUT = "opted_out"


FORGOTTEN = "forgotten"


@dataclass(frozen=True)
class GuildConsent:
    """A guild's learning consent and voter role (`explicit`: its admins set them; else the defaults)."""

    guild_id: int
    learning: bool
    voter_role_id: int | None
    explicit: bool


async def opt_out_reason(session: AsyncSession, user_id: int) -> str | None:
    """A user's opt-out status, in the caller's transaction (None: not opted out)."""
    return await session.scalar(select(OptedOutUser.reason).where(OptedOutUser.user_id == user_id))


async def guild_consent(session: AsyncSession, settings: Settings, guild_id: int) -> GuildConsent:
    """A guild's consent, in the caller's transaction (the defaults if never set)."""
    row = await session.get(GuildSettings, guild_id)
    if row is None:
        return GuildConsent(guild_id, settings.learning_default, None, explicit=False)
    return GuildConsent(guild_id, row.learning, row.voter_role_id, explicit=True)


async def get_user_status(session: AsyncSession, *, user_id: int) -> str | None:
    """ "opted_out", "forgotten", or None for a user whose data may be used."""
    async with transaction(session):
        return await opt_out_reason(session, user_id)


async def opt_out(session: AsyncSession, *, user_id: int) -> bool:
    """Keep a user's prompts and votes out of training from now on; False if they already were."""
    async with transaction(session):
        insert = dialect_insert(session, OptedOutUser).values(
            user_id=user_id, reason=OPTED_OUT, since=utcnow()
        )
        result = await session.execute(insert.on_conflict_do_nothing(index_elements=["user_id"]))
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def opt_in(session: AsyncSession, *, user_id: int) -> bool:
    """Let a user's new prompts and votes reach training again (also ends "forgotten"); False if nothing changed."""
    async with transaction(session):
        result = await session.execute(delete(OptedOutUser).where(OptedOutUser.user_id == user_id))
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def get_guild_settings(session: AsyncSession, *, settings: Settings, guild_id: int) -> GuildConsent:
    """A guild's learning consent and voter role (the defaults if its admins never set them)."""
    async with transaction(session):
        return await guild_consent(session, settings, guild_id)


async def _upsert_guild(
    session: AsyncSession, settings: Settings, guild_id: int, **values: Any
) -> GuildConsent:
    async with transaction(session):
        row: dict[str, Any] = {
            "guild_id": guild_id,
            "learning": settings.learning_default,
            "voter_role_id": None,
        }
        row.update(values, updated_at=utcnow())
        insert = dialect_insert(session, GuildSettings).values(**row)
        await session.execute(
            insert.on_conflict_do_update(
                index_elements=["guild_id"], set_={**values, "updated_at": insert.excluded.updated_at}
            )
        )
        return await guild_consent(session, settings, guild_id)


async def set_learning(
    session: AsyncSession, *, settings: Settings, guild_id: int, enabled: bool
) -> GuildConsent:
    """Turn a guild's learning on or off (off also keeps what was recorded while on out of training)."""
    return await _upsert_guild(session, settings, guild_id, learning=bool(enabled))


async def set_voter_role(
    session: AsyncSession, *, settings: Settings, guild_id: int, role_id: int | None
) -> GuildConsent:
    """Name the role whose holders' votes count in a guild (None: everyone's)."""
    return await _upsert_guild(session, settings, guild_id, voter_role_id=role_id)
