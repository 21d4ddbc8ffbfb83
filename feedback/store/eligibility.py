"""Which prompts may reach training now: the one consent rule, as SQL building blocks.

A prompt is eligible when its own consent holds and so does that of every turn its history quotes:

- own consent: recorded `trainable` (learning was on in its guild and its author had not opted
  out; never a DM), its guild still has learning on (a guild without settings: the default), and
  its author has not opted out or been forgotten since;
- every history turn names a source (`history_turns`: a turn whose source is unknown, such as one
  recorded before provenance existed, disqualifies the prompt), and that source prompt (the
  quoted question, or the question a quoted answer answered) has its own consent by the same rule.

A prompt that fails is left out whole: its history is never truncated to what would pass. Pair
building (feedback.store.pairs), export and the status counts all use these, so the rule lives here only.
Votes have rules of their own on top (voter opted out, voter role): see feedback.store.pairs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, Select, and_, or_, select
from sqlalchemy.orm import aliased

from feedback.store.models import GuildSettings, HistoryTurn, OptedOutUser, Prompt

if TYPE_CHECKING:
    from smolcord.settings import Settings

__all__ = ["eligible_prompt", "eligible_prompt_ids"]


def _own_consent(settings: Settings, prompt: type[Prompt], guild: type[GuildSettings]) -> ColumnElement[bool]:
    """The prompt's own consent (a condition over `prompt` outer-joined to `guild` on its guild_id)."""
    if settings.learning_default:
        learning_on = or_(guild.guild_id.is_(None), guild.learning.is_(True))
    else:
        learning_on = guild.learning.is_(True)
    return and_(
        prompt.trainable.is_(True),
        prompt.guild_id.is_not(None),
        learning_on,
        prompt.author_id.not_in(select(OptedOutUser.user_id)),
    )


def eligible_prompt(settings: Settings) -> ColumnElement[bool]:
    """The condition "this prompt may train now", over `Prompt` outer-joined to `GuildSettings` on Prompt.guild_id."""
    source, source_guild = aliased(Prompt), aliased(GuildSettings)
    consenting_sources = (
        select(source.id)
        .outerjoin(source_guild, source_guild.guild_id == source.guild_id)
        .where(_own_consent(settings, source, source_guild))  # type: ignore[arg-type]
    )
    turn = HistoryTurn
    failing_turn = (
        select(turn.prompt_id)
        .where(
            turn.prompt_id == Prompt.id,
            or_(turn.source_prompt_id.is_(None), turn.source_prompt_id.not_in(consenting_sources)),
        )
        .exists()
    )
    return and_(_own_consent(settings, Prompt, GuildSettings), ~failing_turn)


def eligible_prompt_ids(settings: Settings) -> Select[int]:
    """`SELECT prompts.id` of every prompt that may train now (to use as `X.prompt_id.in_(...)` or a subquery)."""
    return (
        select(Prompt.id)
        .outerjoin(GuildSettings, GuildSettings.guild_id == Prompt.guild_id)
        .where(eligible_prompt(settings))
    )
