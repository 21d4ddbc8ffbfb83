"""Preference pairs and rated answers: each rule of DESIGN.md's "Data" section, and the voter-share cap."""

import random
from collections import Counter

from test_feedback.harness import GUILD, ROLE, make_image

from feedback.store import consent as consent_service
from feedback.store import responses as responses_service
from feedback.store.pairs import build_pairs, build_rated_answers, cap_voter_share, is_heldout


async def pairs_of(store, **overrides):
    settings = store.settings.model_copy(update=overrides) if overrides else store.settings
    async with store.sessions() as session:
        pairs = await build_pairs(session, settings=settings)
    return [(pair.chosen_response_id, pair.rejected_response_id) for pair in pairs]


async def contested(store, question="what is this?", *, good_voters=(1,), bad_voters=(2,), **prompt_kwargs):
    """A prompt with a 👍 answer and a 👎 answer; returns (prompt, good id, bad id)."""
    prompt = await store.prompt(question, **prompt_kwargs)
    good, [good_message] = await store.answer(prompt.id, f"good answer to {question}")
    bad, [bad_message] = await store.answer(prompt.id, f"bad answer to {question}", regenerated=True)
    for user in good_voters:
        await store.vote(good_message, user, "👍")
    for user in bad_voters:
        await store.vote(bad_message, user, "👎")
    return prompt, good, bad


async def test_a_pair_is_a_liked_and_a_disliked_answer_to_the_same_prompt(store, settings):
    await store.learning()
    prompt = await store.prompt(images=[make_image(1), make_image(2)])
    good, [good_message] = await store.answer(prompt.id, "a cat")
    bad, [bad_message] = await store.answer(prompt.id, "a dog", regenerated=True)
    _tied, [tied_message] = await store.answer(prompt.id, "an animal", regenerated=True)
    await store.vote(good_message, 1, "👍")
    await store.vote(good_message, 1, "👍🏽")  # the same user's second thumbs-up: still +1
    await store.vote(good_message, 3, "👍")
    await store.vote(bad_message, 2, "👎")
    await store.vote(tied_message, 3, "👍")
    await store.vote(tied_message, 4, "👎")
    await store.vote(tied_message, 5, "👍")
    await store.vote(tied_message, 5, "👎")  # both: this user's vote is 0
    async with store.sessions() as session:
        [pair] = await build_pairs(session, settings=settings)
    assert (pair.chosen_response_id, pair.rejected_response_id) == (good, bad)
    assert (pair.chosen_text, pair.rejected_text) == ("a cat", "a dog")
    assert (pair.chosen_score, pair.rejected_score) == (2, -1)
    assert pair.deciders == {2}  # the chosen side has two voters: neither decides it alone
    assert pair.prompt_id == prompt.id and pair.prompt_key == prompt.key and pair.guild_id == GUILD
    assert pair.question == "what is this?" and pair.history == []
    assert [path.name[:64] for path in pair.images] == [make_image(1).sha256, make_image(2).sha256]
    assert all(path.is_file() for path in pair.images)


async def test_identical_texts_make_no_pair(store):
    await store.learning()
    prompt = await store.prompt()
    _, [liked] = await store.answer(prompt.id, "same words")
    _, [disliked] = await store.answer(prompt.id, "same words", regenerated=True)
    _, [other] = await store.answer(prompt.id, "same words", regenerated=True)
    await store.vote(liked, 1, "👍")
    await store.vote(disliked, 2, "👎")
    await store.vote(other, 3, "👎")
    assert await pairs_of(store) == []


async def test_same_images_question_and_history_is_one_prompt_across_messages(store):
    await store.learning()
    first = await store.prompt("what is this?", images=[make_image(1)])
    second = await store.prompt("what is this?", images=[make_image(1)], author_id=43)
    assert first.key == second.key
    good, [good_message] = await store.answer(first.id, "a cat")
    bad, [bad_message] = await store.answer(second.id, "a dog")
    await store.vote(good_message, 1, "👍")
    await store.vote(bad_message, 2, "👎")
    assert await pairs_of(store) == [(good, bad)]


async def test_different_history_images_or_question_is_not_the_same_prompt(store):
    await store.learning()
    base = await store.prompt("what is this?", images=[make_image(1)])
    history = [{"role": "user", "content": "hi", "images": []}, {"role": "assistant", "content": "hello"}]
    variants = [
        await store.prompt("what is this?", images=[make_image(1)], history=history),
        await store.prompt("what is this?", images=[make_image(2)]),
        await store.prompt("what is that?", images=[make_image(1)]),
        await store.prompt("what is this?", images=[make_image(1), make_image(1)]),
    ]
    assert len({base.key, *(v.key for v in variants)}) == 5
    _, [good_message] = await store.answer(base.id, "a cat")
    await store.vote(good_message, 1, "👍")
    for variant in variants:
        _, [bad_message] = await store.answer(variant.id, "a dog")
        await store.vote(bad_message, 2, "👎")
    assert await pairs_of(store) == []


async def test_only_prompts_recorded_while_learning_was_on(store):
    await contested(store, "asked while learning was off")
    await store.learning()
    assert await pairs_of(store) == []  # turning it on later does not make old prompts trainable
    _, good, bad = await contested(store, "asked while learning was on")
    assert await pairs_of(store) == [(good, bad)]


async def test_learning_turned_off_later_removes_the_guilds_pairs(store, settings):
    await store.learning()
    _, good, bad = await contested(store)
    assert await pairs_of(store) == [(good, bad)]
    await store.learning(enabled=False)
    assert await pairs_of(store) == []
    await store.learning(enabled=True)
    assert await pairs_of(store) == [(good, bad)]


async def test_learning_default_on_counts_for_guilds_without_settings(store):
    store.settings = store.settings.model_copy(update={"learning_default": True})
    _, good, bad = await contested(store)
    assert await pairs_of(store) == [(good, bad)]
    assert await pairs_of(store, learning_default=False) == []  # the operator turned the default off


async def test_never_from_dms(store):
    store.settings = store.settings.model_copy(update={"learning_default": True})
    await contested(store, guild_id=None)
    assert await pairs_of(store) == []


async def test_opted_out_authors_and_voters_do_not_count(store):
    await store.learning()
    _, good, bad = await contested(store, author_id=50, good_voters=(1,), bad_voters=(2,))
    await store.call(consent_service.opt_out, user_id=50)
    assert await pairs_of(store) == []
    await store.call(consent_service.opt_in, user_id=50)
    assert await pairs_of(store) == [(good, bad)]
    await store.call(consent_service.opt_out, user_id=2)  # the only 👎 voter
    assert await pairs_of(store) == []
    assert not await store.vote(
        (await store.call(responses_service.get_response, response_id=bad)).message_ids[0], 2, "👎"
    )


async def test_voter_role_counts_only_its_holders_at_vote_time(store, settings):
    await store.learning()
    prompt = await store.prompt()
    good, [good_message] = await store.answer(prompt.id, "a cat")
    bad, [bad_message] = await store.answer(prompt.id, "a dog")
    await store.vote(good_message, 1, "👍", roles=[ROLE])  # before the role was named: unknown eligibility
    await store.vote(bad_message, 2, "👎", roles=[ROLE])
    assert await pairs_of(store) == [(good, bad)]
    await store.call(consent_service.set_voter_role, settings=settings, guild_id=GUILD, role_id=ROLE)
    assert await pairs_of(store) == []
    await store.vote(good_message, 3, "👍", roles=[ROLE])
    await store.vote(bad_message, 4, "👎", roles=[99])  # not a holder
    assert await pairs_of(store) == []
    await store.vote(bad_message, 5, "👎", roles=[ROLE, 99])
    assert await pairs_of(store) == [(good, bad)]
    await store.call(consent_service.set_voter_role, settings=settings, guild_id=GUILD, role_id=None)
    assert await pairs_of(store) == [(good, bad)]


async def test_no_voter_decides_more_than_the_share(store):
    await store.learning()
    # user 1 alone decides the chosen side of three pairs; the fourth pair nobody decides alone
    alone = [await contested(store, f"q{i}", good_voters=(1,), bad_voters=(10 + i, 20 + i)) for i in range(3)]
    _, good, bad = await contested(store, "q3", good_voters=(30, 31), bad_voters=(32, 33))
    assert len(await pairs_of(store)) == 4
    capped = await pairs_of(store, max_voter_share=0.5)
    # 3 of 4 > 0.5: user 1 loses the fewest pairs that fit, 2: then 1 of 2 pairs
    assert len(capped) == 2 and (good, bad) in capped
    assert len({(g, b) for _, g, b in alone} & set(capped)) == 1
    assert await pairs_of(store, max_voter_share=0.5) == capped  # deterministic


async def test_voter_share_over_a_random_set_holds_and_keeps_undecided_pairs():
    rng = random.Random(4)
    items = list(range(400))
    deciders = [
        frozenset(rng.choices(range(12), weights=[30, 10] + [1] * 10, k=rng.randint(0, 2))) for _ in items
    ]
    ranks = [f"{rng.random():.12f}" for _ in items]
    for share in (0.1, 0.25, 0.5):
        kept = cap_voter_share(items, deciders=deciders, ranks=ranks, share=share)
        counts = Counter(voter for i in kept for voter in deciders[i])
        assert max(counts.values()) <= share * len(kept)
        assert all(i in kept for i in items if not deciders[i])
        assert kept == sorted(kept)
        assert kept == cap_voter_share(items, deciders=deciders, ranks=ranks, share=share)
    assert cap_voter_share(items, deciders=deciders, ranks=ranks, share=1.0) == items
    assert cap_voter_share([1], deciders=[frozenset({7})], ranks=["a"], share=0.5) == []


async def test_rated_answers_for_kto(store):
    await store.learning()
    prompt = await store.prompt()
    good, [good_message] = await store.answer(prompt.id, "a cat")
    bad, [bad_message] = await store.answer(prompt.id, "a dog")
    unrated, _ = await store.answer(prompt.id, "a fish")
    await store.vote(good_message, 1, "👍")
    await store.vote(bad_message, 2, "👎")
    async with store.sessions() as session:
        rated = await build_rated_answers(session, settings=store.settings)
    assert [(a.response_id, a.label, a.score) for a in rated] == [(good, True, 1), (bad, False, -1)]
    assert unrated not in [a.response_id for a in rated]


def test_heldout_split_is_a_fixed_hash_of_the_key():
    keys = [f"{i:064x}" for i in range(5000)]
    chosen = [key for key in keys if is_heldout(key, 0.2)]
    assert 0.17 < len(chosen) / len(keys) < 0.23
    assert chosen == [key for key in keys if is_heldout(key, 0.2)]
    assert set(chosen) <= {key for key in keys if is_heldout(key, 0.3)}  # growing the fraction only adds


async def test_deciders_are_the_voters_whose_vote_sets_a_sides_sign(store):
    await store.learning()
    prompt = await store.prompt()
    good, [good_message] = await store.answer(prompt.id, "a cat")
    bad, [bad_message] = await store.answer(prompt.id, "a dog")
    for user, emoji in [(1, "👍"), (2, "👍"), (2, "👍🏽"), (3, "👎")]:  # score +1: users 1 and 2 decide it
        await store.vote(good_message, user, emoji)
    for user, emoji in [(4, "👎"), (5, "👍"), (5, "👎")]:  # score −1: user 5's vote is 0
        await store.vote(bad_message, user, emoji)
    async with store.sessions() as session:
        [pair] = await build_pairs(session, settings=store.settings)
    assert (pair.chosen_response_id, pair.rejected_response_id) == (good, bad)
    assert (pair.chosen_score, pair.rejected_score) == (1, -1)
    assert pair.deciders == {1, 2, 4}
