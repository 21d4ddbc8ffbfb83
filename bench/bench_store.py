"""Feedback store benchmark: reaction upserts per second into SQLite, and the time to build pairs.

    python -m bench.bench_store [--responses 100000] [--reactions 300000] [--upserts 2000]

1. Upserts: `set_reaction` calls (lookup + INSERT ... ON CONFLICT + commit, one transaction
   each) into a SQLite file in WAL mode; 8 concurrent writers against 1 writer as the baseline.
2. Pairs: `build_pairs` over 100,000 responses with 300,000 reactions (goal: under 2 s), against
   a naive builder measured in the same run (one query per prompt, scores summed in Python: what
   an ORM-first implementation does).

Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select

from feedback.store import prompts as prompts_service
from feedback.store import reactions as reactions_service
from feedback.store import responses as responses_service
from feedback.store.db import create_engine, sessionmaker, upgrade_to_head
from feedback.store.models import (
    GuildSettings,
    Image,
    OptedOutUser,
    Prompt,
    PromptImage,
    Reaction,
    Response,
    ResponseMessage,
)
from feedback.store.pairs import build_pairs, cap_voter_share
from feedback.store.votes import THUMBS_DOWN, THUMBS_UP
from smolcord.settings import Settings

GUILD = 1
RESPONSES_PER_PROMPT = 4
GOAL_S = 2.0


def _settings(data_dir: Path) -> Settings:
    return Settings(_env_file=None, data_dir=data_dir, learning_default=False, max_voter_share=0.5)  # type: ignore[call-arg]


# ------------------------------------------------------------------------------ upserts


async def _seed_messages(maker: Any, settings: Settings, count: int) -> list[int]:
    async with maker() as session:
        prompt = await prompts_service.record_prompt(
            session, settings=settings, guild_id=GUILD, channel_id=1, message_id=1, author_id=1, question="q"
        )
    messages = []
    for n in range(count):
        async with maker() as session:
            message_id = 1_000 + n
            await responses_service.record_response(
                session, prompt_id=prompt.id, text=f"a{n}", message_ids=[message_id]
            )
            messages.append(message_id)
    return messages


async def _upserts(
    settings: Settings, *, writers: int, total: int, messages: list[int], offset: int
) -> float:
    """Upserts per second with `writers` concurrent writers, each doing total/writers in a row."""
    engine = create_engine(settings.db_url, pool_size=writers, max_overflow=0)
    maker = sessionmaker(engine)
    per_writer = total // writers

    async def writer(w: int) -> None:
        for i in range(per_writer):
            n = w * per_writer + i
            async with maker() as session:
                await reactions_service.set_reaction(
                    session,
                    message_id=messages[n % len(messages)],
                    user_id=offset + n,
                    emoji=THUMBS_UP if n % 3 else THUMBS_DOWN,
                )

    try:
        started = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        elapsed = time.perf_counter() - started
    finally:
        await engine.dispose()
    return per_writer * writers / elapsed


async def bench_upserts(data_dir: Path, upserts: int) -> dict[str, float]:
    settings = _settings(data_dir)
    upgrade_to_head_in_thread = asyncio.to_thread(upgrade_to_head, settings.db_url)
    await upgrade_to_head_in_thread
    engine = create_engine(settings.db_url)
    try:
        messages = await _seed_messages(sessionmaker(engine), settings, 50)
    finally:
        await engine.dispose()
    one = await _upserts(settings, writers=1, total=upserts, messages=messages, offset=0)
    eight = await _upserts(settings, writers=8, total=upserts, messages=messages, offset=10_000_000)
    return {"upserts_per_s_1_writer": one, "upserts_per_s_8_writers": eight}


# ------------------------------------------------------------------------------ pairs


async def _fill(settings: Settings, *, responses: int, reactions: int, seed: int = 0) -> dict[str, int]:
    """Bulk-insert a store with core INSERTs: prompts of 4 answers each, votes from a skewed crowd."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    prompts = responses // RESPONSES_PER_PROMPT
    voters = max(50, reactions // 15)
    # a few heavy voters, many light ones: the voter-share cap has something to do
    cumulative = list(itertools.accumulate(1.0 / (rank + 1) ** 0.8 for rank in range(voters)))
    images = [
        {"sha256": f"{n:064x}", "mime": "image/png", "suffix": ".png", "width": 8, "height": 8,
         "size_bytes": 100, "created_at": now}
        for n in range(1000)
    ]  # fmt: skip
    prompt_rows, image_rows, response_rows, message_rows = [], [], [], []
    for p in range(1, prompts + 1):
        dm = p % 20 == 0  # 5 % DMs, 10 % recorded while learning was off
        prompt_rows.append(
            {"id": p, "key": f"{rng.getrandbits(256):064x}", "guild_id": None if dm else GUILD, "channel_id": 1,
             "message_id": p, "author_id": 10**9 + p % 5000, "question": f"what is in picture {p}?",
             "history": [], "trainable": not dm and p % 10 != 0, "created_at": now}
        )  # fmt: skip
        image_rows.append(
            {"prompt_id": p, "position": 0, "image_sha256": images[p % 1000]["sha256"], "in_history": False}
        )
        for a in range(RESPONSES_PER_PROMPT):
            r = (p - 1) * RESPONSES_PER_PROMPT + a + 1
            response_rows.append(
                {"id": r, "prompt_id": p, "text": f"answer {a} to {p}", "adapter_version": "v1",
                 "sampling": {}, "requested_by": None, "regenerated": a > 0, "created_at": now}
            )  # fmt: skip
            message_rows.append({"message_id": 10**12 + r, "response_id": r, "position": 0})
    reaction_rows: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    while len(reaction_rows) < reactions:
        r = rng.randrange(1, responses + 1)
        user = (
            rng.choices(range(voters), cum_weights=cumulative)[0]
            if rng.random() < 0.3
            else rng.randrange(voters)
        )
        if (r, user) in seen:
            continue
        seen.add((r, user))
        liked = rng.random() < (0.75 if (r - 1) % RESPONSES_PER_PROMPT < 2 else 0.25)
        reaction_rows.append(
            {"response_id": r, "user_id": user, "emoji": THUMBS_UP if liked else THUMBS_DOWN,
             "voter_role_id": None, "holds_voter_role": False, "created_at": now, "updated_at": now}
        )  # fmt: skip
    engine = create_engine(settings.db_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                insert(GuildSettings), [{"guild_id": GUILD, "learning": True, "updated_at": now}]
            )
            await connection.execute(
                insert(OptedOutUser), [{"user_id": 7, "reason": "opted_out", "since": now}]
            )
            for model, rows in (
                (Image, images),
                (Prompt, prompt_rows),
                (PromptImage, image_rows),
                (Response, response_rows),
                (ResponseMessage, message_rows),
                (Reaction, reaction_rows),
            ):
                for start in range(0, len(rows), 20_000):
                    await connection.execute(insert(model), rows[start : start + 20_000])
    finally:
        await engine.dispose()
    return {
        "prompts": prompts,
        "responses": len(response_rows),
        "reactions": len(reaction_rows),
        "voters": voters,
    }


async def naive_pairs(settings: Settings, *, max_prompt_id: int) -> int:
    """The baseline: one query per prompt for its answers and votes, every rule checked in Python."""
    engine = create_engine(settings.db_url)
    count = 0
    try:
        async with sessionmaker(engine)() as session:
            learning = {g.guild_id: g.learning for g in await session.scalars(select(GuildSettings))}
            opted_out = set(await session.scalars(select(OptedOutUser.user_id)))
            groups: dict[str, list[tuple[int, str, int, frozenset[int]]]] = defaultdict(list)
            prompts = await session.scalars(
                select(Prompt).where(Prompt.id <= max_prompt_id).order_by(Prompt.id)
            )
            for prompt in prompts.all():
                if (
                    not prompt.trainable
                    or prompt.guild_id is None
                    or not learning.get(prompt.guild_id, False)
                ):
                    continue
                if prompt.author_id in opted_out:
                    continue
                rows = await session.execute(
                    select(Response.id, Response.text, Reaction.user_id, Reaction.emoji)
                    .outerjoin(Reaction, Reaction.response_id == Response.id)
                    .where(Response.prompt_id == prompt.id)
                )
                votes: dict[int, dict[int, int]] = defaultdict(dict)
                texts: dict[int, str] = {}
                for response_id, text, user_id, emoji in rows:
                    texts[response_id] = text
                    if user_id is not None and user_id not in opted_out:
                        value = 1 if emoji == THUMBS_UP else -1
                        votes[response_id][user_id] = votes[response_id].get(user_id, 0) + value
                for response_id, text in texts.items():
                    net = sum(votes[response_id].values())
                    deciders = frozenset(
                        u for u, v in votes[response_id].items() if abs(net) == 1 and v == net
                    )
                    groups[prompt.key].append((response_id, text, net, deciders))
            items, decided = [], []
            for key, answers in groups.items():
                for c_id, c_text, c_net, c_dec in answers:
                    for r_id, r_text, r_net, r_dec in answers:
                        if c_net > 0 > r_net and c_text != r_text:
                            items.append((key, c_id, r_id))
                            decided.append(c_dec | r_dec)
            kept = cap_voter_share(
                items,
                deciders=decided,
                ranks=[hashlib.sha256(f"{k}:{c}:{r}".encode()).hexdigest() for k, c, r in items],
                share=settings.max_voter_share,
            )
            count = len(kept)
    finally:
        await engine.dispose()
    return count


async def bench_pairs(
    data_dir: Path, responses: int, reactions: int, naive_fraction: float
) -> dict[str, Any]:
    settings = _settings(data_dir)
    await asyncio.to_thread(upgrade_to_head, settings.db_url)
    started = time.perf_counter()
    sizes = await _fill(settings, responses=responses, reactions=reactions)
    fill_s = time.perf_counter() - started
    engine = create_engine(settings.db_url)
    times, cpu_times = [], []
    try:
        for _ in range(3):
            async with sessionmaker(engine)() as session:
                started, cpu_started = time.perf_counter(), time.process_time()
                pairs = await build_pairs(session, settings=settings)
                times.append(time.perf_counter() - started)
                cpu_times.append(time.process_time() - cpu_started)  # this process, SQLite's thread included
    finally:
        await engine.dispose()
    # The naive builder's time grows linearly with prompts: it runs on a slice and is scaled up.
    naive_prompts = max(1, int(sizes["prompts"] * naive_fraction))
    started = time.perf_counter()
    naive_count = await naive_pairs(settings, max_prompt_id=naive_prompts)
    naive_s = (time.perf_counter() - started) * sizes["prompts"] / naive_prompts
    return {
        **sizes,
        "fill_s": fill_s,
        "pairs": len(pairs),
        "build_pairs_s": statistics.median(times),
        "build_pairs_cpu_s": statistics.median(cpu_times),
        "naive_prompts": naive_prompts,
        "naive_pairs": naive_count,
        "naive_build_s": naive_s,
    }


# ------------------------------------------------------------------------------ main


def machine_speed_s() -> float:
    """Seconds for `sum(range(10**7))` (best of 3): to compare figures across machines and loads."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        sum(range(10**7))
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_store", description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=100_000)
    parser.add_argument("--reactions", type=int, default=300_000)
    parser.add_argument("--upserts", type=int, default=2_000, help="upserts per measurement")
    parser.add_argument(
        "--naive-fraction",
        type=float,
        default=0.2,
        help="share of prompts the naive baseline runs on (then scaled)",
    )
    args = parser.parse_args(list(argv) if argv is not None else [])

    speed = machine_speed_s()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        upserts = asyncio.run(bench_upserts(Path(tmp) / "upserts", args.upserts))
        pairs = asyncio.run(
            bench_pairs(Path(tmp) / "pairs", args.responses, args.reactions, args.naive_fraction)
        )

    one, eight = upserts["upserts_per_s_1_writer"], upserts["upserts_per_s_8_writers"]
    build, naive = pairs["build_pairs_s"], pairs["naive_build_s"]
    print("feedback store (SQLite, WAL, synchronous=NORMAL)")
    print(f"{'measure':<52}{'value':>14}{'baseline':>14}{'ratio':>9}")
    print(
        f"{'reaction upserts/s, 8 concurrent writers (vs 1)':<52}{eight:>14,.0f}{one:>14,.0f}{eight / one:>8.2f}x"
    )
    print(
        f"{'build_pairs s, ' + format(pairs['responses'], ',') + ' responses / ' + format(pairs['reactions'], ',') + ' reactions':<52}"
        f"{build:>14.3f}{naive:>14.3f}{naive / build:>8.1f}x"
    )
    print(f"{'  (CPU seconds of that, SQLite thread included)':<52}{pairs['build_pairs_cpu_s']:>14.3f}")
    verdict = "meets" if build < GOAL_S else "MISSES"
    print(
        f"pairs built: {pairs['pairs']:,}; goal < {GOAL_S} s: {verdict}; naive baseline timed on "
        f"{pairs['naive_prompts']:,} of {pairs['prompts']:,} prompts and scaled; fixture bulk-inserted in {pairs['fill_s']:.1f} s"
    )
    print(f"machine speed: sum(range(10**7)) takes {speed:.3f} s here (~0.1 s on an idle desktop CPU)")
    result = {
        "bench": "store",
        **upserts,
        "upserts_ratio_8_vs_1": eight / one,
        **pairs,
        "speedup_vs_naive": naive / build,
        "goal_s": GOAL_S,
        "machine_speed_s": speed,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
