"""Helpers of the feedback store tests: unique ids, small images, and a harness that fills a store."""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select, text

from feedback.store import consent as consent_service
from feedback.store import prompts as prompts_service
from feedback.store import reactions as reactions_service
from feedback.store import responses as responses_service
from feedback.store.models import Base, Image, PromptImage
from smolcord.images import NormalizedImage, normalize_image
from smolcord.settings import Settings

TEST_DATABASE_URL = os.environ.get("SMOLCORD_TEST_DATABASE_URL") or None
GUILD = 1_000_000_000_000_000_001  # snowflakes are 64-bit: make sure nothing truncates them
CHANNEL = 2_000_000_000_000_000_002
ROLE = 3_000_000_000_000_000_003

sqlite_only = pytest.mark.skipif(TEST_DATABASE_URL is not None, reason="SQLite locking and files only")


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


# ---------------------------------------------------------------------------------- images


def png_bytes(seed: int, size: tuple[int, int] = (8, 6)) -> bytes:
    """A small PNG, different for every seed."""
    image = PILImage.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13 + 7) % 256))
    image.putpixel((0, 0), (seed % 256, (seed // 256) % 256, 255))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def make_image(seed: int, size: tuple[int, int] = (8, 6)) -> NormalizedImage:
    return normalize_image(png_bytes(seed, size), max_bytes=10 << 20, max_pixels=40_000_000, max_edge=1536)


# ---------------------------------------------------------------------------------- harness


class StoreHarness:
    """Records prompts, answers and votes through the service functions, with unique Discord ids."""

    def __init__(self, sessions: Any, settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings
        self._ids = itertools.count(10_000_000_000_000_000)

    def new_id(self) -> int:
        return next(self._ids)

    async def call(self, function: Any, **kwargs: Any) -> Any:
        """Run one service function in a fresh session."""
        async with self.sessions() as session:
            return await function(session, **kwargs)

    async def learning(self, guild_id: int = GUILD, enabled: bool = True) -> None:
        await self.call(
            consent_service.set_learning, settings=self.settings, guild_id=guild_id, enabled=enabled
        )

    async def prompt(self, question: str = "what is this?", **kwargs: Any) -> prompts_service.RecordedPrompt:
        values: dict[str, Any] = {
            "guild_id": GUILD,
            "channel_id": CHANNEL,
            "message_id": self.new_id(),
            "author_id": 42,
            "images": [make_image(1)],
        }
        values.update(kwargs)
        return await self.call(
            prompts_service.record_prompt, settings=self.settings, question=question, **values
        )

    async def answer(
        self, prompt_id: int, text: str, *, chunks: int = 1, **kwargs: Any
    ) -> tuple[int, list[int]]:
        message_ids = [self.new_id() for _ in range(chunks)]
        response_id = await self.call(
            responses_service.record_response,
            prompt_id=prompt_id,
            text=text,
            message_ids=message_ids,
            **kwargs,
        )
        return response_id, message_ids

    async def vote(self, message_id: int, user_id: int, emoji: str, roles: Any = None) -> bool:
        return await self.call(
            reactions_service.set_reaction,
            message_id=message_id,
            user_id=user_id,
            emoji=emoji,
            member_role_ids=roles,
        )

    async def count(self, model: Any) -> int:
        async with self.sessions() as session:
            return int(await session.scalar(select(func.count()).select_from(model)) or 0)

    async def orphans(self) -> list[str]:
        """Every row whose parent is gone, every image no prompt uses, every file without a row and vice versa."""
        problems = []
        async with self.sessions() as session:
            for table in Base.metadata.sorted_tables:
                for fk in table.foreign_key_constraints:
                    [element] = fk.elements
                    child, parent = element.parent, element.column
                    statement = (
                        select(func.count())
                        .select_from(table.outerjoin(parent.table, child == parent))
                        .where(child.is_not(None), parent.is_(None))
                    )
                    missing = await session.scalar(statement)
                    if missing:
                        problems.append(f"{missing} rows of {table.name}.{child.name} without a parent")
            unused = await session.scalar(
                select(func.count())
                .select_from(Image)
                .where(
                    ~select(PromptImage.image_sha256).where(PromptImage.image_sha256 == Image.sha256).exists()
                )
            )
            if unused:
                problems.append(f"{unused} images no prompt uses")
            rows = dict((await session.execute(select(Image.sha256, Image.suffix))).all())
        images_dir = self.settings.images_dir
        files = {p.stem: p for p in images_dir.glob("*/*")} if images_dir.exists() else {}
        for stem in sorted(set(files) - set(rows)):
            problems.append(f"file {files[stem].name} without a row")
        for sha in sorted(set(rows) - set(files)):
            problems.append(f"image {sha[:12]} without a file")
        return problems

    async def sql(self, statement: str, **params: Any) -> list[Any]:
        async with self.sessions() as session:
            return list((await session.execute(text(statement), params)).all())


async def empty_shared_database(engine: Any) -> None:
    """Against SMOLCORD_TEST_DATABASE_URL every test shares one database: empty it, children first."""
    from sqlalchemy import delete

    from feedback.store.models import Base

    if TEST_DATABASE_URL:
        async with engine.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                await connection.execute(delete(table))
