"""The SQL counts of feedback.store.stats agree with the pairs feedback.store.pairs builds, rule for rule."""

import random

from test_feedback.harness import GUILD, ROLE, make_image

from feedback.store import consent as consent_service
from feedback.store import runs as runs_service
from feedback.store.pairs import build_pairs, is_heldout
from feedback.store.stats import count_pairs

OTHER_GUILD = GUILD + 1  # learning off there
ROLE_GUILD = GUILD + 2  # learning on, with a voter role


async def _random_store(store, rng: random.Random) -> None:
    """Prompts in three guilds and DMs, some asked twice (same key), answers with repeated texts, votes."""
    await store.learning()
    await store.learning(ROLE_GUILD)
    await store.call(
        consent_service.set_voter_role, settings=store.settings, guild_id=ROLE_GUILD, role_id=ROLE
    )
    await store.call(consent_service.opt_out, user_id=13)
    texts = ["a cat", "a dog", "a cow", "a hen"]
    for n in range(40):
        guild = rng.choice([GUILD, GUILD, OTHER_GUILD, ROLE_GUILD, None])
        question = f"question {rng.randrange(12)}"  # repeats: answers of one key across prompts
        prompt = await store.prompt(
            question, guild_id=guild, author_id=rng.choice([41, 42, 13]), images=[make_image(n % 3)]
        )
        for _ in range(rng.randrange(1, 5)):
            _, [message] = await store.answer(prompt.id, rng.choice(texts), regenerated=True)
            for voter in rng.sample(range(1, 15), rng.randrange(0, 6)):
                roles = [ROLE] if rng.random() < 0.7 else []
                await store.vote(message, voter, rng.choice(["👍", "👎", "👍🏽"]), roles)


async def _counts(store, settings):
    async with store.sessions() as session:
        pairs = await build_pairs(session, settings=settings)
        fresh = await runs_service.new_pairs(session, pairs=pairs)
    async with store.sessions() as session:
        counted = await count_pairs(session, settings=settings)
    built = (len(pairs), len(fresh), sum(is_heldout(p.prompt_key, settings.heldout_fraction) for p in pairs))
    return pairs, built, (counted.pairs, counted.new_pairs, counted.heldout_pairs)


async def test_counts_match_the_built_pairs(store, settings):
    """Every consent rule, duplicate texts, keys shared by prompts, new pairs and the held-out split."""
    settings = settings.model_copy(update={"heldout_fraction": 0.5})  # max_voter_share is 1: no cap
    for seed in range(3):
        await _random_store(store, random.Random(seed))
        pairs, built, counted = await _counts(store, settings)
        assert built[0] >= 5 and built[2] > 0, built  # the store gives the counts something to do
        assert counted == built
        # a successful run that used some of the pairs: those are no longer new
        used = pairs[: len(pairs) // 2]
        run_id = await store.call(
            runs_service.start_training_run, method="dpo", examples=used, heldout_fraction=0.5
        )
        await store.call(runs_service.finish_training_run, run_id=run_id, status="succeeded")
        _, built, counted = await _counts(store, settings)
        assert built[1] == built[0] - len(used)
        assert counted == built
