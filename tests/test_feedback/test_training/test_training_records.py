"""Training runs with the pairs they used, new pairs before the next run, adapter history, stats."""

import pytest
from test_feedback.harness import GUILD

from feedback.store import adapters as adapters_service
from feedback.store import consent as consent_service
from feedback.store import runs as runs_service
from feedback.store import stats as stats_service
from feedback.store.errors import UnknownRun
from feedback.store.pairs import build_pairs, build_rated_answers, is_heldout


async def contested(store, question, *, version=None):
    prompt = await store.prompt(question)
    _, [good] = await store.answer(prompt.id, f"good {question}", adapter_version=version)
    _, [bad] = await store.answer(prompt.id, f"bad {question}", adapter_version=version, regenerated=True)
    await store.vote(good, 1, "👍")
    await store.vote(bad, 2, "👎")


async def test_runs_record_their_pairs_and_new_pairs_count_from_the_last_success(store, settings):
    await store.learning()
    for i in range(3):
        await contested(store, f"q{i}")
    stats = await store.call(stats_service.store_stats, settings=settings)
    assert (stats.pairs, stats.new_pairs, stats.pairs_needed, stats.last_run) == (3, 3, 1, None)

    async with store.sessions() as session:
        pairs = await build_pairs(session, settings=settings)
    run_id = await store.call(
        runs_service.start_training_run, method="dpo", examples=pairs, heldout_fraction=0.5
    )
    run = await store.call(runs_service.get_training_run, run_id=run_id)
    assert (run.status, run.pairs, run.finished_at) == ("running", 3, None)
    assert run.heldout == sum(is_heldout(p.prompt_key, 0.5) for p in pairs)
    used = await store.call(runs_service.run_pair_ids, run_id=run_id)
    assert [(c, r) for c, r, _ in used] == [(p.chosen_response_id, p.rejected_response_id) for p in pairs]

    # a run that is still running (or failed) does not count as the last run
    assert (await store.call(stats_service.store_stats, settings=settings)).new_pairs == 3
    finished = await store.call(
        runs_service.finish_training_run,
        run_id=run_id,
        status="succeeded",
        metrics={"heldout_accuracy": 0.75},
        adapter_version="v1",
    )
    assert finished.finished_at is not None and finished.metrics == {"heldout_accuracy": 0.75}
    stats = await store.call(stats_service.store_stats, settings=settings)
    assert (stats.pairs, stats.new_pairs, stats.pairs_needed, stats.last_run.id) == (3, 0, 4, run_id)

    await contested(store, "q3")
    stats = await store.call(stats_service.store_stats, settings=settings)
    assert (stats.pairs, stats.new_pairs, stats.pairs_needed) == (4, 1, 3)
    async with store.sessions() as session:
        fresh = await runs_service.new_pairs(session, pairs=await build_pairs(session, settings=settings))
    assert [p.question for p in fresh] == ["q3"]


async def test_kto_runs_record_rated_answers_and_bad_calls_fail_plainly(store, settings):
    await store.learning()
    await contested(store, "q")
    async with store.sessions() as session:
        rated = await build_rated_answers(session, settings=settings)
    run_id = await store.call(
        runs_service.start_training_run, method="kto", examples=rated, heldout_fraction=0.2
    )
    used = await store.call(runs_service.run_pair_ids, run_id=run_id)
    assert [(c is None, r is None) for c, r, _ in used] == [(False, True), (True, False)]
    with pytest.raises(UnknownRun):
        await store.call(runs_service.finish_training_run, run_id=10**6, status="failed")
    with pytest.raises(ValueError):
        await store.call(runs_service.finish_training_run, run_id=run_id, status="running")
    with pytest.raises(ValueError):
        await store.call(runs_service.start_training_run, method="ppo", heldout_fraction=0.2)
    failed = await store.call(runs_service.finish_training_run, run_id=run_id, status="failed", error="OOM")
    assert (failed.status, failed.error) == ("failed", "OOM")
    assert await store.call(runs_service.last_training_run) is None
    assert (await store.call(runs_service.last_training_run, statuses=["failed"])).id == run_id


async def test_adapter_history(store):
    run_id = await store.call(runs_service.start_training_run, method="dpo", heldout_fraction=0.2)
    await store.call(adapters_service.record_adapter, version="v1", run_id=run_id, metrics={"accuracy": 0.6})
    await store.call(adapters_service.promote_adapter, version="v1")
    await store.call(adapters_service.record_adapter, version="v2")
    await store.call(adapters_service.reject_adapter, version="v2")
    await store.call(adapters_service.record_adapter, version="v3")
    await store.call(adapters_service.promote_adapter, version="v3")
    history = {a.version: a for a in await store.call(adapters_service.list_adapters)}
    assert {v: a.status for v, a in history.items()} == {
        "v1": "superseded",
        "v2": "rejected",
        "v3": "promoted",
    }
    assert history["v1"].run_id == run_id and history["v1"].metrics == {"accuracy": 0.6}
    await store.call(adapters_service.record_rollback, from_version="v3", to_version="v1")
    history = {a.version: a for a in await store.call(adapters_service.list_adapters)}
    assert history["v3"].status == "rolled_back" and history["v3"].rolled_back_at is not None
    assert history["v1"].status == "promoted"
    await store.call(
        adapters_service.record_rollback, from_version="v1", to_version=None
    )  # back to the base model
    assert {a.status for a in await store.call(adapters_service.list_adapters)} == {"rolled_back", "rejected"}


async def test_stats_count_prompts_votes_and_thumbs_up_share_per_version(store, settings):
    await store.learning()
    await contested(store, "q0", version=None)
    await contested(store, "q1", version="v1")
    prompt = await store.prompt("q2", guild_id=None)
    _, [message] = await store.answer(prompt.id, "dm answer", adapter_version="v1")
    await store.vote(message, 3, "👍")
    await store.vote(message, 3, "👍🏼")  # one user, one vote
    await store.vote(message, 4, "👍")
    stats = await store.call(stats_service.store_stats, settings=settings)
    assert (stats.prompts, stats.trainable_prompts, stats.responses, stats.votes) == (3, 2, 5, 6)
    by_version = {v.adapter_version: (v.up, v.down, v.up_share) for v in stats.by_adapter}
    assert by_version == {None: (1, 1, 0.5), "v1": (3, 1, 0.75)}
    assert (await store.call(consent_service.get_guild_settings, settings=settings, guild_id=GUILD)).learning
    other = await store.call(consent_service.get_guild_settings, settings=settings, guild_id=5)
    assert (other.learning, other.explicit) == (False, False)
