"""The feedback store's subcommands of `smolcord`: `db upgrade` and `export`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from smolcord.settings import Settings

__all__ = ["db_upgrade", "export"]


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def db_upgrade(settings: Settings) -> int:
    """`smolcord db upgrade`: create the data dir and migrate the store to head (before any event loop)."""
    from feedback.store.db import upgrade_to_head

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    revision = upgrade_to_head(settings.db_url)
    print(f"feedback store at revision {revision}: {_shown(settings.db_url)}")
    return 0


def export(settings: Settings, out: Path, kind: str) -> int:
    """`smolcord export OUT.jsonl --kind pairs|unpaired`: migrate, then write the current data in trl's columns."""
    from feedback.store import export as exporting
    from feedback.store.db import create_engine, sessionmaker, upgrade_to_head

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.db_url)

    async def run() -> exporting.ExportReport:
        engine = create_engine(settings.db_url)
        try:
            async with sessionmaker(engine)() as session:
                return await exporting.export(session, settings=settings, out=out, kind=kind)  # type: ignore[arg-type]
        finally:
            await engine.dispose()

    report = asyncio.run(run())
    noun = "pairs" if kind == "pairs" else "rated answers"
    print(
        f"wrote {report.rows} {noun} from {report.prompts} prompts to {report.path} "
        f"({report.heldout} held out, {report.rows - report.heldout} for training)"
    )
    reasons = report.left_out_line()
    if reasons:  # "0 rows" alone does not say what to change
        print(reasons)
    return 0
